"""Memory: process peak RSS, CUDA peaks, a sampled timeline, the KV breakdown at peak.

Peak RSS on Linux: writing "5" to /proc/self/clear_refs resets VmHWM, so the high-water mark
read from /proc/self/status at the end is the run's own peak (model weights included, since
they are resident). Where that is not possible the peak of the sampled RSS is reported and
``memory.peak_rss_source`` says "sampled".
"""

from __future__ import annotations

import psutil
import torch

from harness.trackers.base import Tracker


def _read_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryTracker(Tracker):
    name = "memory"

    def __init__(self, memory, weights_bytes: int, device: torch.device, keep_peak_stats: bool = False,
                 **kw) -> None:
        super().__init__(**kw)
        # the full MemoryStats at the step with the most live + reserved bytes (costs a stats() call on
        # every new peak: for `kvbench generate`, not for sweeps)
        self.keep_peak_stats, self.peak_stats, self._peak_total = keep_peak_stats, None, -1
        self.mem, self.weights_bytes, self.device = memory, weights_bytes, device
        self.proc = psutil.Process()
        self.t: list[float] = []
        self.rss: list[int] = []
        self.live: list[int] = []
        self.reserved: list[int] = []
        self.cuda_alloc: list[int] = []
        self.peak_breakdown: dict[str, int] = {}
        self.peak_live = self.peak_reserved = 0
        self.peak_kv_live = self.peak_state_live = 0
        self.state_live: list[int] = []

    def start(self) -> None:
        self.mem.reset_peak()
        self.hwm_reset = _reset_hwm()
        self.rss_start = self.proc.memory_info().rss
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def step(self, info, now: float) -> None:
        """Exact peaks: usage() every step (O(1)-ish), unlike the sampled timeline. KV and recurrent
        state are followed apart: one grows with context, the other does not."""
        kv, rs = self.mem.parts()
        if kv is not None:
            self.peak_kv_live = max(self.peak_kv_live, kv.usage()[0])
        if rs is not None:
            self.peak_state_live = max(self.peak_state_live, rs.usage()[0])
        if info is not None and info.live_before_free is not None:  # the step's peak, before it freed sequences
            kv_b, rs_b = info.live_before_free
            self.peak_kv_live, self.peak_state_live = max(self.peak_kv_live, kv_b), max(self.peak_state_live, rs_b)
            self.peak_live = max(self.peak_live, kv_b + rs_b)
        live, reserved = self.mem.usage()
        if self.keep_peak_stats and live + reserved >= self._peak_total:
            self._peak_total, self.peak_stats = live + reserved, self.mem.stats()
        self.peak_live = max(self.peak_live, live)
        if reserved > self.peak_reserved or not self.peak_breakdown:  # pooled/paged: once
            self.peak_reserved = reserved
            self.peak_breakdown = self.mem.memory_breakdown()

    def sample(self, now: float) -> None:
        live, reserved = self.mem.usage()
        self.t.append(now)
        self.rss.append(self.proc.memory_info().rss)
        self.live.append(live)
        rs = self.mem.parts()[1]
        self.state_live.append(rs.usage()[0] if rs is not None else 0)
        self.reserved.append(reserved)
        if self.device.type == "cuda":
            self.cuda_alloc.append(torch.cuda.memory_allocated(self.device))
        self.step(None, now)

    def stop(self) -> None:
        hwm = _read_hwm() if self.hwm_reset else None
        self.peak_rss = hwm if hwm is not None else max(self.rss)
        self.peak_rss_source = "vmhwm" if hwm is not None else "sampled"
        if self.device.type == "cuda":
            self.cuda_peak_alloc = torch.cuda.max_memory_allocated(self.device)
            self.cuda_peak_reserved = torch.cuda.max_memory_reserved(self.device)

    def metrics(self) -> dict[str, float]:
        out = {
            "memory.peak_rss_bytes": self.peak_rss,
            "memory.peak_rss_source": self.peak_rss_source,
            "memory.rss_start_bytes": self.rss_start,
            "memory.weights_bytes": self.weights_bytes,
            "memory.kv_reserved_peak_bytes": self.peak_reserved,
            "memory.kv_reserved_transient_peak_bytes": self.mem.stats().reserved_peak_bytes,
            "memory.kv_live_peak_bytes": self.peak_kv_live,
            "memory.state_live_peak_bytes": self.peak_state_live,
        }
        for k, v in self.peak_breakdown.items():
            out[f"memory.breakdown.{k}"] = v
        if self.device.type == "cuda":
            out["memory.cuda_peak_allocated_bytes"] = self.cuda_peak_alloc
            out["memory.cuda_peak_reserved_bytes"] = self.cuda_peak_reserved
        return out

    def timeline(self) -> dict[str, list]:
        tl = {"t_s": self.t, "step": self.sample_steps, "rss_bytes": self.rss, "live_bytes": self.live, "reserved_bytes": self.reserved,
              "state_live_bytes": self.state_live}
        if self.cuda_alloc:
            tl["cuda_allocated_bytes"] = self.cuda_alloc
        return tl
