"""The small benchmark CI runs and gates with `kvbench compare` (results/baselines/ci-bench.json).

Run:  pytest tests/bench/test_ci_gate.py --benchmark-only --benchmark-json=results/ci-bench.json
What is gated (results/baselines/gates.yaml):
- KV allocations per decode step (exact counts);
- ratios of decode step times measured in the same run, allocators interleaved round by round, so
  a machine that is slower overall, or slow for a while, scales them away;
- absolute speed as normalised times (``norm.*``): the fastest decode (prefill) step divided by the
  calibration probe's unit (harness/noise.py, its fastest repetition) measured in the same process
  around every round. A busy neighbour only ever adds time and barely touches the fastest of many
  short steps, while an engine that does more work per step moves it in full (docs/ci.md has the
  measurements).
Raw times (``time.*``, ``step_ms.*``) are in the JSON for the record and not gated. The ``noise.*`` entries
say what the machine did meanwhile; `kvbench compare` calls a normalised time that got worse under
contention inconclusive (exit 3) rather than a regression.
``KVBENCH_FAULT_INJECT=slow:2`` (tests only) makes the engine 2x slower, to show the gate catches it.
"""

from __future__ import annotations

import numpy as np

from engine.loader import create_engine, create_memory, load_model
from harness import faults
from harness.noise import CpuSnapshot, activity, calibrate
from tests.bench.drive import decode_steps, random_requests
from tests.unit.engine.alloc.helpers import CFG, batch, place

ALLOCS = ("naive", "pooled", "paged")
ROUNDS = 5


def _model():
    lm = load_model("llama-tiny")
    faults.slow_down(lm.model, faults.slowdown())  # 1.0 (untouched) unless a test injects slow:k
    return lm


def _decode(lm, allocator: str) -> tuple[list[float], float]:
    """(decode step seconds, KV allocations per decode step) of a churn workload at parallel 4."""
    reqs = random_requests(12, prompt=(8, 64), output=(8, 40), seed=0)
    steps = decode_steps(lm, allocator, 4, reqs, size=1024)
    return [s.seconds for s in steps], float(np.mean([s.alloc_calls for s in steps]))


def _noise_info(probes, snaps) -> dict[str, float]:
    """The unit of norm.* (fastest probe repetition of the run) and what the machine did meanwhile."""
    act = activity(snaps[0], snaps[1])
    return {"noise.unit_us": min(p.step_us_best for p in probes),
            "noise.probe_slowdown": max(p.dispatch_us for p in probes) / min(p.dispatch_us_best for p in probes),
            "noise.other_cpu": act["other_cpu"], "noise.steal": act["steal"]}


def test_ci_decode_step(benchmark):
    lm = _model()
    res = {a: [] for a in ALLOCS}
    probes, snaps = [], []

    def run():
        snaps.append(CpuSnapshot.take())
        for _ in range(ROUNDS):
            probes.append(calibrate())
            for a in ALLOCS:
                res[a].append(_decode(lm, a))
        probes.append(calibrate())
        snaps.append(CpuSnapshot.take())

    benchmark.pedantic(run, rounds=1, iterations=1)
    step = {a: np.asarray([float(np.median(r[0])) for r in res[a]]) for a in ALLOCS}
    info = {f"ratio.{a}_over_pooled.decode_step": float(np.median(step[a] / step["pooled"])) for a in ("naive", "paged")}
    info |= {f"alloc.{a}.per_decode_step": res[a][-1][1] for a in ALLOCS}
    info |= {f"step_ms.{a}": float(np.median(step[a]) * 1e3) for a in ALLOCS}
    info |= _noise_info(probes, snaps)
    for a in ALLOCS:  # the fastest of every decode step of every round, in probe units
        every = np.concatenate([r[0] for r in res[a]])
        info[f"norm.decode_step.{a}.min"] = float(every.min()) * 1e6 / info["noise.unit_us"]
    benchmark.extra_info.update(info)
    assert info["alloc.pooled.per_decode_step"] == 0 and info["alloc.paged.per_decode_step"] == 0


def test_ci_prefill(benchmark):
    lm = _model()
    eng = create_engine(lm, create_memory(lm, size=256))
    prompt = [1] + list(range(3, 130))
    snaps, probes = [CpuSnapshot.take()], [calibrate()]

    def prefill():
        eng.memory.clear()
        eng.prefill({0: prompt})

    # 40 warm-up rounds: the first ~25 prefills of a fresh process run about 1.6x slower here (13 vs 8 ms;
    # allocator state settling), and the fastest round must be a warm one
    benchmark.pedantic(prefill, rounds=20, warmup_rounds=40, iterations=1)
    probes.append(calibrate())
    snaps.append(CpuSnapshot.take())
    info = _noise_info(probes, snaps)  # kvbench compare judges contention from these
    fastest = float(min(benchmark.stats.stats.data))
    benchmark.extra_info.update(info | {"norm.prefill.min": fastest * 1e6 / info["noise.unit_us"]})


def test_ci_allocator_ops(benchmark):
    """Bookkeeping only (no model): place tokens for 4 sequences, drop two, place again."""
    from engine.alloc import create_kv_cache
    from engine.memory.kv_cache import CacheSpec

    mems = {a: create_kv_cache(CFG, CacheSpec(allocator=a, size=512, block_size=16, n_seq_max=4)) for a in ALLOCS}

    def cycle(m):
        m.clear(data=False)
        for p in range(0, 64, 8):
            place(m, batch(*((s, p, 8) for s in range(4))))
        m.seq_rm(1)
        m.seq_rm(2, 20)
        place(m, batch((1, 0, 16), (2, 20, 16)))

    times = {a: [] for a in ALLOCS}

    def run():
        import time

        for _ in range(ROUNDS):
            for a, m in mems.items():
                t = time.perf_counter()
                cycle(m)
                times[a].append(time.perf_counter() - t)

    benchmark.pedantic(run, rounds=1, iterations=1)
    t = {a: np.asarray(v) for a, v in times.items()}
    benchmark.extra_info.update({f"ratio.{a}_over_pooled.alloc_ops": float(np.median(t[a] / t["pooled"]))
                                 for a in ("naive", "paged")})
