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

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

import numpy as np
from omegaconf import MISSING

from engine.runtime.scheduler import Request


class ArrivalProcess(Enum):
    none = "none"  # every request is there at t = 0 (they queue for the parallel slots)
    closed = "closed"  # each request arrives when the previous one has finished: no queueing
    poisson = "poisson"
    gamma = "gamma"


@dataclass
class ArrivalConf:
    process: ArrivalProcess = ArrivalProcess.none
    rate: float = 8.0  # requests per second (poisson, gamma)
    cv: float = 2.0  # gamma: coefficient of variation of inter-arrival times (1 = poisson)


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


# Each workload is declared once: these dataclasses are both the generators and the Hydra schema of the
# workload group (harness/config.py stores them; ``_target_`` is how Hydra instantiates them).
@dataclass
class Workload:
    _target_: str = MISSING
    n_requests: int = 16
    arrival: ArrivalConf = field(default_factory=ArrivalConf)
    parallel: Optional[int] = None  # a scenario that fixes its own concurrency overrides the run's parallel
    # size the cache to what this workload needs (parallel x its longest request, in whole blocks) instead
    # of cache.size: the pool a llama.cpp user would configure for it (fit_cache_size)
    fit_cache: bool = False

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
        closed = ArrivalProcess(self.arrival.process) is ArrivalProcess.closed
        return [TimedRequest(float(t), Request(i, p, o, seed_offset=i), after_previous=closed)
                for i, (t, p, (_, o)) in enumerate(zip(times, prompts, lens))]


@dataclass
class FixedWorkload(Workload):
    _target_: str = "harness.workload.FixedWorkload"
    prompt_len: int = 64
    output_len: int = 64

    def lengths(self, rng):
        return [(self.prompt_len, self.output_len)] * self.n_requests


@dataclass
class ShareGPTWorkload(Workload):
    """Log-normal prompt and output lengths whose means are ShareGPT's (161 / 338 tokens, from the
    vLLM paper) times ``scale``; ``sigma`` is the log-space spread (ShareGPT is heavy-tailed)."""

    _target_: str = "harness.workload.ShareGPTWorkload"
    mean_prompt: float = 161.0
    mean_output: float = 338.0
    sigma: float = 0.8  # log-space spread
    scale: float = 0.25  # multiplies both means; 1.0 for the paper's lengths
    min_len: int = 4
    max_len: int = 1024

    def _draw(self, mean: float, rng) -> np.ndarray:
        mu = np.log(mean) - self.sigma**2 / 2  # E[lognormal(mu, sigma)] = exp(mu + sigma^2 / 2) = mean
        x = rng.lognormal(mu, self.sigma, self.n_requests)
        return np.clip(np.rint(x), self.min_len, self.max_len).astype(int)

    def lengths(self, rng):
        return list(zip(self._draw(self.mean_prompt * self.scale, rng).tolist(),
                        self._draw(self.mean_output * self.scale, rng).tolist()))


@dataclass
class SharedPrefixWorkload(Workload):
    """Requests share one of ``n_prefixes`` system prompts (round-robin), then a private suffix."""

    _target_: str = "harness.workload.SharedPrefixWorkload"
    n_prefixes: int = 1  # distinct system prompts, assigned round-robin
    prefix_len: int = 96
    suffix_len: int = 16
    output_len: int = 32

    def lengths(self, rng):
        return [(self.prefix_len + self.suffix_len, self.output_len)] * self.n_requests

    def prompts(self, lens, n_vocab, rng):
        prefixes = [[1] + rng.integers(3, n_vocab, self.prefix_len - 1).tolist() for _ in range(self.n_prefixes)]
        return [prefixes[i % self.n_prefixes] + rng.integers(3, n_vocab, self.suffix_len).tolist()
                for i in range(len(lens))]


@dataclass
class ChurnWorkload(Workload):
    """Uniform prompt and output lengths in wide ranges: sequences end at different times."""

    _target_: str = "harness.workload.ChurnWorkload"
    prompt_min: int = 8
    prompt_max: int = 128
    output_min: int = 8
    output_max: int = 128

    def lengths(self, rng):
        p = rng.integers(self.prompt_min, self.prompt_max + 1, self.n_requests)
        o = rng.integers(self.output_min, self.output_max + 1, self.n_requests)
        return list(zip(p.tolist(), o.tolist()))


WORKLOADS = (FixedWorkload, ShareGPTWorkload, SharedPrefixWorkload, ChurnWorkload)


def fit_cache_size(timed: list[TimedRequest], parallel: int, block_size: int) -> int:
    """The cache a workload needs so that no request is ever preempted: ``parallel`` of its longest
    requests held at once (prompt + output tokens), in whole blocks. How one sizes llama.cpp's
    ``-c`` for ``-np`` slots."""
    longest = max((len(t.request.prompt) + t.request.n_predict for t in timed), default=1)
    cells = min(parallel, max(1, len(timed))) * longest
    return -(-cells // block_size) * block_size
