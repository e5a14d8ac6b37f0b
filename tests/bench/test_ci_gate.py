"""The small benchmark CI runs and gates with `kvbench compare` (results/baselines/ci-bench.json).

Run:  pytest tests/bench/test_ci_gate.py --benchmark-only --benchmark-json=results/ci-bench.json
What is gated (results/baselines/gates.yaml): KV allocations per decode step (exact counts) and
ratios of decode step times measured in the same run, allocators interleaved round by round, so
a machine that is slower overall, or slow for a while, scales them away. Absolute times are in
the JSON for the record and are not gated: on a shared 2-core machine they swing by integer
factors when a neighbour is busy.
"""

from __future__ import annotations

import numpy as np

from engine.loader import create_engine, create_memory, load_model
from tests.bench.drive import decode_steps, random_requests
from tests.unit.engine.alloc.helpers import CFG, batch, place

ALLOCS = ("naive", "pooled", "paged")
ROUNDS = 5


def _decode(lm, allocator: str) -> tuple[float, float]:
    """(median decode step s, KV allocations per decode step) of a churn workload at parallel 4."""
    reqs = random_requests(12, prompt=(8, 64), output=(8, 40), seed=0)
    steps = decode_steps(lm, allocator, 4, reqs, size=1024)
    return float(np.median([s.seconds for s in steps])), float(np.mean([s.alloc_calls for s in steps]))


def test_ci_decode_step(benchmark):
    lm = load_model("llama-tiny")
    res = {a: [] for a in ALLOCS}

    def run():
        for _ in range(ROUNDS):
            for a in ALLOCS:
                res[a].append(_decode(lm, a))

    benchmark.pedantic(run, rounds=1, iterations=1)
    step = {a: np.asarray([r[0] for r in res[a]]) for a in ALLOCS}
    info = {f"ratio.{a}_over_pooled.decode_step": float(np.median(step[a] / step["pooled"])) for a in ("naive", "paged")}
    info |= {f"alloc.{a}.per_decode_step": res[a][-1][1] for a in ALLOCS}
    info |= {f"step_ms.{a}": float(np.median(step[a]) * 1e3) for a in ALLOCS}
    benchmark.extra_info.update(info)
    assert info["alloc.pooled.per_decode_step"] == 0 and info["alloc.paged.per_decode_step"] == 0


def test_ci_prefill(benchmark):
    lm = load_model("llama-tiny")
    eng = create_engine(lm, create_memory(lm, size=256))
    prompt = [1] + list(range(3, 130))

    def prefill():
        eng.memory.clear()
        eng.prefill({0: prompt})

    benchmark.pedantic(prefill, rounds=10, warmup_rounds=2, iterations=1)


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
