"""Seeded workloads: what requests arrive when, with which prompt and output lengths.

Every workload turns (n_vocab, seed) into a list of ``TimedRequest`` (arrival time in seconds
from the start, and an engine ``Request``). Prompts are random token ids (what is measured is
memory and time, not text); outputs have a fixed length (EOS is ignored), so every allocator
runs exactly the same tokens.

Arrivals: ``none`` (all at t = 0: they queue for the ``parallel`` slots), ``closed`` (each
request arrives when the previous one has finished: service latency without queueing; the run's
driver handles it, times here are 0), ``poisson`` (exponential gaps at ``rate`` req/s) or
``gamma`` (gaps with the same mean and a coefficient of variation ``cv``: cv > 1 is burstier).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.runtime.scheduler import Request
from harness.config import ArrivalProcess


@dataclass
class TimedRequest:
    arrival_s: float
    request: Request
    after_previous: bool = False  # closed loop: arrive when everything before has finished


def arrival_times(arrival, n: int, rng: np.random.Generator) -> np.ndarray:
    process = ArrivalProcess(arrival.process)
    if process in (ArrivalProcess.none, ArrivalProcess.closed):
        return np.zeros(n)
    mean_gap = 1.0 / arrival.rate
    if process is ArrivalProcess.poisson:
        gaps = rng.exponential(mean_gap, n)
    else:  # gamma with mean mean_gap and coefficient of variation cv: shape k = 1/cv^2
        k = 1.0 / arrival.cv**2
        gaps = rng.gamma(k, mean_gap / k, n)
    gaps[0] = 0.0  # the first request starts the run
    return np.cumsum(gaps)


class Workload:
    def __init__(self, n_requests: int = 16, arrival=None, parallel: int | None = None, fit_cache: bool = False) -> None:
        self.n_requests = n_requests
        self.arrival = arrival
        self.parallel = parallel  # read by the run (harness.config.effective_parallel), not here
        self.fit_cache = fit_cache  # read by the run (fit_cache_size), not here

    def lengths(self, rng: np.random.Generator) -> list[tuple[int, int]]:
        """(prompt length, output length) per request."""
        raise NotImplementedError

    def prompts(self, lens: list[tuple[int, int]], n_vocab: int, rng: np.random.Generator) -> list[list[int]]:
        return [[1] + rng.integers(3, n_vocab, p - 1).tolist() for p, _ in lens]

    def generate(self, n_vocab: int, seed: int) -> list[TimedRequest]:
        rng = np.random.default_rng(seed)
        lens = self.lengths(rng)
        prompts = self.prompts(lens, n_vocab, rng)
        times = arrival_times(self.arrival, len(lens), rng)
        closed = self.arrival is not None and ArrivalProcess(self.arrival.process) is ArrivalProcess.closed
        return [TimedRequest(float(t), Request(i, p, o, seed_offset=i), after_previous=closed)
                for i, (t, p, (_, o)) in enumerate(zip(times, prompts, lens))]


class FixedWorkload(Workload):
    def __init__(self, prompt_len: int = 64, output_len: int = 64, **kw) -> None:
        super().__init__(**kw)
        self.prompt_len, self.output_len = prompt_len, output_len

    def lengths(self, rng):
        return [(self.prompt_len, self.output_len)] * self.n_requests


class ShareGPTWorkload(Workload):
    """Log-normal prompt and output lengths whose means are ShareGPT's (161 / 338 tokens, from the
    vLLM paper) times ``scale``; ``sigma`` is the log-space spread (ShareGPT is heavy-tailed)."""

    def __init__(self, mean_prompt: float = 161.0, mean_output: float = 338.0, sigma: float = 0.8,
                 scale: float = 0.25, min_len: int = 4, max_len: int = 1024, **kw) -> None:
        super().__init__(**kw)
        self.means = (mean_prompt * scale, mean_output * scale)
        self.sigma, self.min_len, self.max_len = sigma, min_len, max_len

    def _draw(self, mean: float, rng) -> np.ndarray:
        mu = np.log(mean) - self.sigma**2 / 2  # E[lognormal(mu, sigma)] = exp(mu + sigma^2 / 2) = mean
        x = rng.lognormal(mu, self.sigma, self.n_requests)
        return np.clip(np.rint(x), self.min_len, self.max_len).astype(int)

    def lengths(self, rng):
        return list(zip(self._draw(self.means[0], rng).tolist(), self._draw(self.means[1], rng).tolist()))


class SharedPrefixWorkload(Workload):
    """Requests share one of ``n_prefixes`` system prompts (round-robin), then a private suffix."""

    def __init__(self, n_prefixes: int = 1, prefix_len: int = 96, suffix_len: int = 16, output_len: int = 32,
                 **kw) -> None:
        super().__init__(**kw)
        self.n_prefixes, self.prefix_len, self.suffix_len, self.output_len = n_prefixes, prefix_len, suffix_len, output_len

    def lengths(self, rng):
        return [(self.prefix_len + self.suffix_len, self.output_len)] * self.n_requests

    def prompts(self, lens, n_vocab, rng):
        prefixes = [[1] + rng.integers(3, n_vocab, self.prefix_len - 1).tolist() for _ in range(self.n_prefixes)]
        return [prefixes[i % self.n_prefixes] + rng.integers(3, n_vocab, self.suffix_len).tolist()
                for i in range(len(lens))]


class ChurnWorkload(Workload):
    def __init__(self, prompt_min: int = 8, prompt_max: int = 128, output_min: int = 8, output_max: int = 128,
                 **kw) -> None:
        super().__init__(**kw)
        self.p, self.o = (prompt_min, prompt_max), (output_min, output_max)

    def lengths(self, rng):
        p = rng.integers(self.p[0], self.p[1] + 1, self.n_requests)
        o = rng.integers(self.o[0], self.o[1] + 1, self.n_requests)
        return list(zip(p.tolist(), o.tolist()))


def fit_cache_size(timed: list[TimedRequest], parallel: int, block_size: int) -> int:
    """The cache a workload needs so that no request is ever preempted: ``parallel`` of its longest
    requests held at once (prompt + output tokens), in whole blocks. How one sizes llama.cpp's
    ``-c`` for ``-np`` slots."""
    longest = max((len(t.request.prompt) + t.request.n_predict for t in timed), default=1)
    cells = min(parallel, max(1, len(timed))) * longest
    return -(-cells // block_size) * block_size
