"""What else used the machine while a point ran, and how fast the machine was: noise detection.

With two torch threads on two cores, one busy neighbour slows a run 5-20x: every parallel region
waits for the thread the neighbour displaced. kvbench cannot prevent that, so it measures it and
says so. A point records, over its measured loop:

- ``other_cpu``: CPU time every other process used, in CPUs (busy jiffies of /proc/stat minus this
  process's own CPU time, over the wall time). About 0 on a quiet machine, about 1 with one
  CPU-burning neighbour.
- ``steal``: the share of CPU time the hypervisor gave to other guests (/proc/stat ``steal``).
- ``involuntary_switches_per_s``: how often the kernel took a CPU away from this process.
- ``loadavg``: the 1-minute load average at the end (slow to react: reported, never judged).
- a calibration probe before and after (``Calibration``): fixed kernels of tens of ms, the same
  on every run: a miniature decode step (small matmuls, elementwise ops, a softmax: the mix of a
  small model's decode step; its fastest run is the unit of the normalised times ``norm.*``), a
  chain of small matmuls (each a parallel region ending in a barrier: the most sensitive to a
  displaced thread, so its median against its fastest repetition detects a neighbour), one larger
  matmul (compute) and a streaming sum (memory bandwidth).

``judge`` turns these into ``noise.flagged`` and a one-line ``noise.reason``; ``normalized`` divides a
run's times by the probe's unit. The thresholds are the
``noise.*`` keys of a run config (``harness.config.NoiseConf``); docs/metrics.md says why they are
where they are.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass

import torch

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# -- calibration probe ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """Speeds of four fixed kernels; ``*_best`` is the fastest repetition, the others the median.

    The fastest repetition is what the machine can do when nothing interferes (noise only ever
    adds time); the median shows interference that lasted through the probe."""

    step_us: float  # one miniature decode step (see ``_mini_step``), microseconds: the unit of norm.*
    step_us_best: float
    dispatch_us: float  # one small matmul in a dependent chain of 64 (256x256 @ 256x2), microseconds
    dispatch_us_best: float
    matmul_gflops: float  # 512x512 @ 512x512 float32
    matmul_gflops_best: float
    bandwidth_gbps: float  # sum over a 64 MiB float32 buffer
    bandwidth_gbps_best: float
    seconds: float  # how long the probe took

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}.{k}": v for k, v in asdict(self).items()}


_REPS = 5
_CHAIN = 64  # small matmuls per dispatch repetition
_STEP_REPS = 32  # miniature steps, each timed on its own: the fastest of many short samples is the
# one a neighbour touched least, the same statistic the gates take of the engine's steps


def _times(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _mini_step(w: dict[str, torch.Tensor], x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A fixed miniature of a small model's decode step, written here and never changed, so that a
    change to kvbench's engine cannot move it: 4 layers of RMSNorm, fused QKV, attention over 64 cached
    rows, output projection and a SwiGLU FFN, hidden 256, 2 rows. It has the mix a decode step of a
    small model has (small matmuls, elementwise ops, a softmax, a Python-level op dispatch each), so a
    machine that is faster or slower at that mix moves it and the engine alike."""
    for _ in range(4):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # (2, 256)
        q = torch.mm(w["qkv"], h.t()).t()[:, :256].reshape(2, 8, 32).transpose(0, 1)  # (8, 2, 32)
        att = torch.softmax(q @ k.transpose(1, 2) * 32**-0.5, dim=-1) @ v  # (8, 2, 32)
        x = x + torch.mm(w["o"], att.transpose(0, 1).reshape(2, 256).t()).t()
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        g, u = torch.mm(w["gate"], h.t()).t(), torch.mm(w["up"], h.t()).t()
        x = x + torch.mm(w["down"], (torch.nn.functional.silu(g) * u).t()).t()
    return x


def calibrate(reps: int = _REPS) -> Calibration:
    """Run the probe with the current torch thread count (tens of ms; buffers freed at the end)."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    w = {n: torch.randn(*shape, generator=g) * 0.05 for n, shape in
         (("qkv", (384, 256)), ("o", (256, 256)), ("gate", (704, 256)), ("up", (704, 256)), ("down", (256, 704)))}
    x, k, v = torch.randn(2, 256, generator=g), torch.randn(8, 64, 32, generator=g), torch.randn(8, 64, 32, generator=g)
    a = torch.randn(512, 512, generator=g)
    buf = torch.ones(16 * 2**20)  # 64 MiB: larger than the last-level cache of the machines we run on

    def step():
        _mini_step(w, x, k, v)

    def chain():  # every op a parallel region with a barrier: what a displaced thread hurts most
        y = x.t()
        for i in range(_CHAIN):
            y = torch.mm(w["o"], y)
        return y

    def mm():
        return torch.mm(a, a)

    def stream():
        return buf.sum()

    with torch.inference_mode():
        for fn in (step, chain, mm, stream):  # first touch, thread pool start-up
            fn()
        ts = _times(step, _STEP_REPS * reps // _REPS)
        td, tm, tb = _times(chain, reps), _times(mm, reps), _times(stream, reps)
    flops, nbytes = 2 * 512**3, 16 * 2**20 * 4
    return Calibration(
        step_us=statistics.median(ts) * 1e6, step_us_best=min(ts) * 1e6,
        dispatch_us=statistics.median(td) / _CHAIN * 1e6, dispatch_us_best=min(td) / _CHAIN * 1e6,
        matmul_gflops=flops / statistics.median(tm) / 1e9, matmul_gflops_best=flops / min(tm) / 1e9,
        bandwidth_gbps=nbytes / statistics.median(tb) / 1e9, bandwidth_gbps_best=nbytes / min(tb) / 1e9,
        seconds=time.perf_counter() - t0)


# -- what the rest of the machine did -------------------------------------------------------------
@dataclass(frozen=True)
class CpuSnapshot:
    wall: float  # time.monotonic()
    busy_s: float  # all CPUs: user + nice + system + irq + softirq (guest time is inside user)
    steal_s: float
    own_cpu_s: float  # this process, all threads: user + system
    own_involuntary: int  # involuntary context switches of this process
    n_cpus: int

    @classmethod
    def take(cls) -> "CpuSnapshot":
        busy = steal = 0.0
        n = os.cpu_count() or 1
        try:
            with open("/proc/stat") as f:
                head = f.readline().split()
            # cpu user nice system idle iowait irq softirq steal guest guest_nice
            v = [int(x) for x in head[1:]]
            busy = (v[0] + v[1] + v[2] + v[5] + v[6]) / _CLK_TCK
            steal = (v[7] if len(v) > 7 else 0) / _CLK_TCK
        except (OSError, ValueError, IndexError):
            busy = steal = float("nan")  # not Linux: other_cpu and steal are not known
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return cls(time.monotonic(), busy, steal, ru.ru_utime + ru.ru_stime, ru.ru_nivcsw, n)


def activity(a: CpuSnapshot, b: CpuSnapshot) -> dict[str, float]:
    """What happened between two snapshots: other processes' CPU (in CPUs), steal share, switches."""
    wall = max(b.wall - a.wall, 1e-9)
    own = b.own_cpu_s - a.own_cpu_s
    # /proc/stat counts whole jiffies per CPU at each end, getrusage microseconds: the difference is
    # uncertain by up to 2 jiffies per CPU, which over a short window is a lot (0.4 CPUs over 0.1 s).
    resolution = 2 * a.n_cpus / _CLK_TCK / wall
    other = max(0.0, (b.busy_s - a.busy_s) - own) / wall
    return {
        "other_cpu": other,
        "other_cpu_resolution": resolution,
        "steal": max(0.0, b.steal_s - a.steal_s) / wall / a.n_cpus,
        "own_cpu": own / wall,
        "involuntary_switches_per_s": (b.own_involuntary - a.own_involuntary) / wall,
        "window_s": wall,
    }


def loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# norm.<name>: a time divided by the calibration probe's unit measured in the same run (noise.unit_us),
# so a machine that is uniformly faster or slower scales it away (docs/metrics.md, "Normalised times").
NORMALIZED = {
    "norm.decode_step.min": "latency.decode_step_ms.min",
    "norm.decode_step.p50": "latency.decode_step_ms.p50",
    "norm.prefill_step.min": "latency.prefill_step_ms.min",
    "norm.tpot.p50": "latency.tpot_ms.p50",
    "norm.ttft.p50": "latency.ttft_ms.p50",
}


def normalized(metrics: dict) -> dict[str, float]:
    unit = metrics.get("noise.unit_us")
    if not unit:
        return {}
    return {k: metrics[v] * 1e3 / unit for k, v in NORMALIZED.items() if isinstance(metrics.get(v), float)}


# -- the verdict ----------------------------------------------------------------------------------
def judge(m: dict[str, float], th) -> tuple[bool, str]:
    """(flagged, reason) from the ``noise.*`` metrics of one point; ``th`` is a ``harness.config.NoiseConf``.

    The probe criterion compares the probe's median repetitions (before and after the loop) with its
    fastest one: a neighbour that ran through the probe slows the median and not the best, and a
    machine that changed speed between before and after separates the two medians."""
    reasons = []
    other = m.get("noise.other_cpu", float("nan")) - m.get("noise.other_cpu_resolution", 0.0)
    if other == other and other > th.max_other_cpu:  # beyond what jiffy rounding can explain
        reasons.append(f"other processes used {m['noise.other_cpu']:.2f} CPUs during the run "
                       f"(limit {th.max_other_cpu:g})")
    steal = m.get("noise.steal", float("nan"))
    if steal == steal and steal > th.max_steal:
        reasons.append(f"the hypervisor stole {steal:.0%} of CPU time (limit {th.max_steal:.0%})")
    slow = m.get("noise.probe_slowdown", float("nan"))
    if slow == slow and slow > th.max_probe_slowdown:
        reasons.append(f"the calibration probe's median ran {slow:.1f}x slower than its fastest repetition "
                       f"(limit {th.max_probe_slowdown:g}x)")
    return bool(reasons), "; ".join(reasons)
