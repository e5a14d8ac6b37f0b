"""Fragmentation, all read from allocator state (docs/metrics.md):

- kv_waste = 1 - live_bytes / reserved_bytes: KV bytes held but not holding tokens (pooled:
  free cells, paged: unused block tails and free blocks, naive with doubling: spare capacity).
  Reported time-weighted over the run and at the moment of peak live bytes.
- external fragmentation of a pool = 1 - largest_free_run / free_cells (pooled; 0 for paged,
  where any free block serves any sequence, and naive, which has no pool).
- attended-hole ratio = rows attention read in a step / cells held (pooled pays for holes
  below n_kv; paged for partial blocks; naive reads exactly its rows).
- the allocator's own view, where fragmentation in naive really lives: glibc mallinfo2
  fordblks / (arena + hblkhd) on CPU, CUDA inactive_split_bytes / reserved_bytes on GPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np
import torch

from harness.trackers.base import Tracker, time_weighted_mean


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    """glibc's mallinfo2 (>= 2.33), or None where it does not exist."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()


def allocator_fragmentation(device: torch.device) -> float:
    """The process allocator's view: free bytes it holds / bytes it holds."""
    if device.type == "cuda":
        s = torch.cuda.memory_stats(device)
        reserved = s.get("reserved_bytes.all.current", 0)
        return s.get("inactive_split_bytes.all.current", 0) / reserved if reserved else 0.0
    if _MALLINFO2 is None:
        return float("nan")
    m = _MALLINFO2()
    held = m.arena + m.hblkhd
    return m.fordblks / held if held else 0.0


class FragmentationTracker(Tracker):
    name = "fragmentation"

    def __init__(self, memory, device: torch.device, **kw) -> None:
        super().__init__(**kw)
        self.mem, self.device = memory, device
        self.t: list[float] = []
        self.waste: list[float] = []
        self.external: list[float] = []
        self.holes: list[float] = []
        self.alloc_frag: list[float] = []
        self.alloc_per_decode: list[int] = []
        self.peak_live, self.waste_at_peak = -1, float("nan")

    def step(self, info, now: float) -> None:
        if info.is_decode:
            self.alloc_per_decode.append(self.mem.alloc_calls_last_step)
        live, reserved = self.mem.usage()  # kv_waste at the exact peak of live bytes, every step
        if live > self.peak_live:
            self.peak_live = live
            self.waste_at_peak = 1.0 - live / reserved if reserved else 0.0

    def sample(self, now: float) -> None:
        st = self.mem.stats()
        self.t.append(now)
        live = st.live_bytes
        if live > self.peak_live:
            self.peak_live = live
            self.waste_at_peak = 1.0 - live / st.reserved_bytes if st.reserved_bytes else 0.0
        self.waste.append(1.0 - st.live_bytes / st.reserved_bytes if st.reserved_bytes else 0.0)
        self.external.append(st.external_fragmentation)
        self.holes.append(st.n_kv / st.used_cells if st.used_cells and st.n_kv else float("nan"))
        self.alloc_frag.append(allocator_fragmentation(self.device))

    def metrics(self) -> dict[str, float]:
        holes = [h for h in self.holes if h == h]
        st = self.mem.stats()
        return {
            "fragmentation.kv_waste.time_weighted": time_weighted_mean(self.t, self.waste, self.t_end),
            "fragmentation.kv_waste.at_peak": self.waste_at_peak,
            "fragmentation.external.time_weighted": time_weighted_mean(self.t, self.external, self.t_end),
            "fragmentation.external.max": max(self.external),
            "fragmentation.attended_hole_ratio.mean": float(np.mean(holes)) if holes else float("nan"),
            "fragmentation.allocator.time_weighted": time_weighted_mean(self.t, self.alloc_frag, self.t_end),
            "fragmentation.allocator.max": float(np.nanmax(self.alloc_frag)) if self.alloc_frag else float("nan"),
            "alloc.calls_total": st.alloc_calls,
            "alloc.calls_per_decode_step": float(np.mean(self.alloc_per_decode)) if self.alloc_per_decode else 0.0,
        }

    def timeline(self) -> dict[str, list]:
        return {"t_s": self.t, "step": self.sample_steps, "kv_waste": self.waste, "external_frag": self.external,
                "allocator_frag": self.alloc_frag}
