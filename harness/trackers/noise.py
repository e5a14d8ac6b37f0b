"""Noise: what else used the machine during the measured loop, and a calibration probe around it.

Entered first and left last in the run's ExitStack, so its probes run outside every other
tracker's window (they do not count in peak RSS, timings or malloc figures). Definitions and
thresholds: harness/noise.py and docs/metrics.md ("Noise").
"""

from __future__ import annotations

from harness.noise import CpuSnapshot, activity, calibrate, judge, loadavg
from harness.trackers.base import Tracker


class NoiseTracker(Tracker):
    name = "noise"

    def __init__(self, thresholds, **kw) -> None:
        super().__init__(**kw)
        self.thresholds = thresholds

    def start(self) -> None:
        self.before = calibrate()
        self.snap0 = CpuSnapshot.take()

    def stop(self) -> None:
        self.snap1 = CpuSnapshot.take()
        self.load = loadavg()
        self.after = calibrate()

    def metrics(self) -> dict:
        b, a = self.before, self.after
        out = {f"noise.{k}": v for k, v in activity(self.snap0, self.snap1).items()}
        out["noise.loadavg_1m"] = self.load
        out |= b.as_metrics("noise.probe_before") | a.as_metrics("noise.probe_after")
        out["noise.unit_us"] = min(b.step_us_best, a.step_us_best)  # the unit of norm.* (docs/metrics.md)
        out["noise.probe_slowdown"] = max(b.dispatch_us, a.dispatch_us) / min(b.dispatch_us_best, a.dispatch_us_best)
        flagged, reason = judge(out, self.thresholds)
        out["noise.flagged"] = flagged
        out["noise.reason"] = reason
        return out
