"""Latency: TTFT, TPOT, inter-token latency, decode step time, end-to-end, throughput.

Definitions (docs/metrics.md): times are wall clock after the device is synchronized (the
scheduler synchronizes around every decode). For a request submitted at t_s whose tokens came
at t_1 .. t_n: TTFT = t_1 - t_s, E2E = t_n - t_s, TPOT = (E2E - TTFT) / (n - 1), ITL = the
gaps t_{i+1} - t_i. A decode step is a scheduler step that carried no prompt tokens.
"""

from __future__ import annotations

import numpy as np

from harness.trackers.base import Tracker, summarize


class LatencyTracker(Tracker):
    name = "latency"

    def __init__(self, scheduler, **kw) -> None:
        super().__init__(**kw)
        self.sched = scheduler
        self.steps = []  # the scheduler's StepInfo of every step

    def step(self, info, now: float) -> None:
        self.steps.append(info)

    def decode_steps_s(self) -> list[float]:
        return [x.seconds for x in self.steps if x.is_decode]

    def metrics(self) -> dict[str, float]:
        done = [r for r in self.sched.results.values() if r.status == "done" and r.token_times]
        ttft = [r.token_times[0] - r.t_submit for r in done]
        e2e = [r.token_times[-1] - r.t_submit for r in done]
        tpot = [(r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1) for r in done if len(r.token_times) > 1]
        itl = [g for r in done for g in np.diff(r.token_times).tolist()]
        dec = self.decode_steps_s()
        n_tokens = sum(len(r.tokens) for r in self.sched.results.values())
        wall = self.t_end
        out = {}
        out |= summarize("latency.ttft_ms", ttft, 1e3)
        out |= summarize("latency.tpot_ms", tpot, 1e3)
        out |= summarize("latency.itl_ms", itl, 1e3)
        out |= summarize("latency.e2e_ms", e2e, 1e3)
        out |= summarize("latency.decode_step_ms", dec, 1e3)
        out |= summarize("latency.prefill_step_ms", [x.seconds for x in self.steps if x.n_prefill], 1e3)
        out["throughput.tokens_per_s"] = n_tokens / wall if wall > 0 else float("nan")
        out["throughput.requests_per_s"] = len(done) / wall if wall > 0 else float("nan")
        out["throughput.decode_tokens_per_s"] = (
            sum(x.n_decode for x in self.steps if x.is_decode) / sum(dec) if dec else float("nan"))
        out["run.wall_s"] = wall
        out["run.steps"] = len(self.steps)
        # stability: how steady the decode loop is, and how many requests went through untouched
        if dec:
            med = float(np.median(dec))
            out["stability.steps_within_25pct"] = float(np.mean(np.abs(np.asarray(dec) - med) <= 0.25 * med))
        else:
            out["stability.steps_within_25pct"] = float("nan")
        res = list(self.sched.results.values())
        clean = [r for r in res if r.status == "done" and r.preemptions == 0]
        out["stability.requests_clean"] = len(clean) / len(res) if res else float("nan")
        return out
