"""What every tracker shares: the context-manager protocol, interval sampling, summaries."""

from __future__ import annotations

import time

import numpy as np


def summarize(prefix: str, values, scale: float = 1.0) -> dict[str, float]:
    """mean, min, p50, p90, p99 (and n) of values times scale, as ``prefix.mean`` ...; NaN when empty.

    min is there for the gates: a busy neighbour only ever adds time, and the fastest of many short
    steps is the one it touched least (docs/metrics.md, "Normalised times")."""
    x = np.asarray(list(values), dtype=np.float64) * scale
    if x.size == 0:
        return {f"{prefix}.{k}": float("nan") for k in ("mean", "min", "p50", "p90", "p99")} | {f"{prefix}.n": 0}
    return {
        f"{prefix}.mean": float(x.mean()),
        f"{prefix}.min": float(x.min()),
        f"{prefix}.p50": float(np.percentile(x, 50)),
        f"{prefix}.p90": float(np.percentile(x, 90)),
        f"{prefix}.p99": float(np.percentile(x, 99)),
        f"{prefix}.n": int(x.size),
    }


def time_weighted_mean(t: list[float], v: list[float], t_end: float) -> float:
    """Mean of a step function sampled at times t (value v[i] holds until t[i+1], the last until t_end)."""
    if not t:
        return float("nan")
    tt = np.asarray(t + [t_end], dtype=np.float64)
    dt = np.diff(tt)
    vv = np.asarray(v, dtype=np.float64)
    total = dt.sum()
    return float((vv * dt).sum() / total) if total > 0 else float(vv.mean())


class Tracker:
    name = "tracker"

    def __init__(self, sample_interval_ms: float = 20.0, clock=time.perf_counter) -> None:
        self.clock = clock
        self.interval = sample_interval_ms / 1e3
        self._next_sample = 0.0
        self.t0 = 0.0
        self.n_steps = 0  # scheduler steps seen so far
        self.sample_steps: list[int] = []  # n_steps at each sample: timelines line up by step, whatever the speed

    def __enter__(self):
        self.t0 = self.clock()
        self._next_sample = 0.0
        self.start()
        self.sample_steps.append(0)
        self.sample(0.0)
        return self

    def __exit__(self, *exc) -> None:
        self.t_end = self.clock() - self.t0
        self.sample_steps.append(self.n_steps)
        self.sample(self.t_end)
        self.stop()

    def on_step(self, info) -> None:
        """Called after every scheduler step; samples when the interval has passed."""
        now = self.clock() - self.t0
        self.n_steps += 1
        self.step(info, now)
        if now >= self._next_sample:
            self._next_sample = now + self.interval
            self.sample_steps.append(self.n_steps)
            self.sample(now)

    # hooks
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def step(self, info, now: float) -> None: ...
    def sample(self, now: float) -> None: ...

    def metrics(self) -> dict[str, float]:
        return {}

    def timeline(self) -> dict[str, list]:
        return {}
