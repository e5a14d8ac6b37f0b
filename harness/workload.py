"""Seeded workloads: what requests arrive when, with which prompt and output lengths.

Every workload turns (n_vocab, seed) into a list of ``TimedRequest`` (arrival time in seconds
from the start, and an engine ``Request``). Prompts are random token ids (what is measured is
memory and time, not text); outputs have a fixed length (EOS is ignored), so every allocator
runs exactly the same tokens.

``trace`` replays a recorded request trace instead (its own arrival times and lengths; see TraceWorkload).

Arrivals: ``none`` (all at t = 0: they queue for the ``parallel`` slots), ``closed`` (each
request arrives when the previous one has finished: service latency without queueing; the run's
driver handles it, times here are 0), ``poisson`` (exponential gaps at ``rate`` req/s) or
``gamma`` (gaps with the same mean and a coefficient of variation ``cv``: cv > 1 is burstier).
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Optional

import numpy as np
from omegaconf import MISSING

from engine.errors import ConfigError
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
    clipped: bool = False  # a trace's request longer than the model's context, shortened to fit


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

    def generate(self, n_vocab: int, seed: int, n_ctx: int | None = None) -> list[TimedRequest]:
        """The requests; ``n_ctx`` (the model's context) matters only to traces, whose lengths are not chosen."""
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


@dataclass
class TraceRow:
    arrival_s: float  # from the trace's first request, before time_scale
    prompt_len: int
    output_len: int
    hash_ids: list[int] | None = None  # Mooncake: one id per block of the prompt; equal ids, equal tokens


def _azure(r: dict) -> tuple[float, int, int]:
    t = dt.datetime.fromisoformat(r["TIMESTAMP"].strip()).replace(tzinfo=dt.timezone.utc)
    return t.timestamp(), int(r["ContextTokens"]), int(r["GeneratedTokens"])


def _burstgpt(r: dict) -> tuple[float, int, int]:
    return float(r["Timestamp"]), int(r["Request tokens"]), int(r["Response tokens"])


def _mooncake(line: str) -> tuple[float, int, int, list[int]]:
    r = json.loads(line)  # timestamp in ms
    return float(r["timestamp"]) / 1000.0, int(r["input_length"]), int(r["output_length"]), \
        [int(h) for h in r.get("hash_ids", [])]


# CSV formats by the header columns they must have, and how a row reads: (time in s, prompt, output)
_CSV_FORMATS = {"azure": ({"TIMESTAMP", "ContextTokens", "GeneratedTokens"}, _azure),
                "burstgpt": ({"Timestamp", "Request tokens", "Response tokens"}, _burstgpt)}


def read_trace(path: str | Path) -> tuple[str, list[TraceRow]]:
    """(format, rows in arrival order, times from the first request) of a trace file: the Azure LLM inference
    trace and BurstGPT (CSV, told apart by their header) or Mooncake (JSON lines). Errors name the file, the
    line and what was expected."""
    path = Path(path)
    where = f"workload.path = {str(path)!r}"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot read the trace ({e})") from None
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip()), None)
    if first is None:
        raise ConfigError(f"{where}: the trace is empty")
    raw: list[tuple] = []
    if first.lstrip().startswith("{"):
        fmt, parse, items = "mooncake", _mooncake, [(n, ln) for n, ln in enumerate(lines, 1) if ln.strip()]
    else:
        head = {c.strip() for c in next(csv.reader([first]))}
        fmt = next((f for f, (cols, _) in _CSV_FORMATS.items() if cols <= head), None)
        if fmt is None:
            raise ConfigError(f"{where}: header {sorted(head)} is not a known trace; expected the Azure LLM inference "
                              "trace (TIMESTAMP,ContextTokens,GeneratedTokens), BurstGPT (Timestamp,Model,Request "
                              "tokens,Response tokens,...) or Mooncake JSON lines")
        parse = _CSV_FORMATS[fmt][1]
        reader = csv.DictReader([ln for ln in lines if ln.strip()], skipinitialspace=True)
        reader.fieldnames = [c.strip() for c in reader.fieldnames]
        items = list(enumerate(reader, 2))
    for n, item in items:
        try:
            raw.append(parse(item))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{where}: line {n} is not a {fmt} request ({type(e).__name__}: {e})") from None
        if raw[-1][1] < 1 or raw[-1][2] < 0:
            raise ConfigError(f"{where}: line {n} has a prompt of {raw[-1][1]} and an output of {raw[-1][2]} "
                              "tokens; prompts need at least one")
    if not raw:
        raise ConfigError(f"{where}: the trace has a header and no requests")
    t0 = min(r[0] for r in raw)
    rows = [TraceRow(r[0] - t0, r[1], r[2], r[3] if len(r) > 3 else None) for r in raw]
    return fmt, sorted(rows, key=lambda r: r.arrival_s)


def read_trace_cached(path: str | Path) -> tuple[str, list[TraceRow]]:
    """read_trace, once per file version: a sweep validates every point before running any."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise ConfigError(f"workload.path = {str(p)!r}: cannot read the trace ({e.strerror})") from None
    return _read_trace_at(str(p.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _read_trace_at(path: str, mtime_ns: int, size: int) -> tuple[str, list[TraceRow]]:
    return read_trace(path)


@dataclass
class TraceWorkload(Workload):
    """A recorded trace replayed: its arrival times (times ``time_scale``: 0.1 replays ten times faster) and its
    prompt and output lengths. Prompts are random tokens except Mooncake's, whose ``hash_ids`` name blocks of
    ``block_tokens`` tokens: equal ids give equal tokens, so requests that shared a prefix in production share
    it here, through the scheduler's prefix sharing. A request longer than the model's context is clipped to it
    (the prompt first; counted in ``requests.clipped``); an output of 0 tokens (failed requests in BurstGPT)
    generates 1. ``n_requests``: the first n of the trace (0: all); the arrival settings are unused."""

    _target_: str = "harness.workload.TraceWorkload"
    path: str = MISSING
    n_requests: int = 0
    time_scale: float = 1.0
    block_tokens: int = 512  # Mooncake's block size

    def generate(self, n_vocab: int, seed: int, n_ctx: int | None = None) -> list[TimedRequest]:
        _, rows = read_trace_cached(self.path)
        rows = rows[: self.n_requests] if self.n_requests else rows
        rng = np.random.default_rng(seed)
        out = []
        for i, r in enumerate(rows):
            p, o = r.prompt_len, max(r.output_len, 1)
            clipped = n_ctx is not None and p + o > n_ctx
            if clipped:  # keep the output when it fits with a token of prompt, else split the context in half
                o = o if o < n_ctx else n_ctx // 2
                p = n_ctx - o
            prompt = self._prompt(r, p, n_vocab, seed, rng)
            out.append(TimedRequest(r.arrival_s * self.time_scale, Request(i, prompt, o, seed_offset=i),
                                    clipped=clipped))
        return out

    def _prompt(self, r: TraceRow, p: int, n_vocab: int, seed: int, rng) -> list[int]:
        if not r.hash_ids:
            return [1] + rng.integers(3, n_vocab, p - 1).tolist()
        toks = [1]
        for h in r.hash_ids:  # a block's tokens depend on its id only (and the run's seed)
            if len(toks) >= p:
                break
            toks += np.random.default_rng([seed, h]).integers(3, n_vocab, self.block_tokens).tolist()
        if len(toks) < p:  # a prompt longer than its blocks: a private tail
            toks += rng.integers(3, n_vocab, p - len(toks)).tolist()
        return toks[:p]


WORKLOADS = (FixedWorkload, ShareGPTWorkload, SharedPrefixWorkload, ChurnWorkload, TraceWorkload)


def fit_cache_size(timed: list[TimedRequest], parallel: int, block_size: int) -> int:
    """The cache a workload needs so that no request is ever preempted: ``parallel`` of its longest
    requests held at once (prompt + output tokens), in whole blocks. How one sizes llama.cpp's
    ``-c`` for ``-np`` slots."""
    longest = max((len(t.request.prompt) + t.request.n_predict for t in timed), default=1)
    cells = min(parallel, max(1, len(timed))) * longest
    return -(-cells // block_size) * block_size
