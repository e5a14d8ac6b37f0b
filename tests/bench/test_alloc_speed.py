"""Decode step time and storage allocations per step: naive vs pooled vs paged, with churn.

Run:  pytest tests/bench/test_alloc_speed.py --benchmark-only
Workload: 2 x parallel requests with varied prompt (8..120) and output (16..64) lengths through
the scheduler, so sequences end at different times and new ones start in freed slots. A decode
step is a step with no prefill tokens. Pooled and paged must allocate no KV storage after start-up.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.loader import create_engine, create_memory, load_model
from engine.runtime.scheduler import Request, Scheduler
from tests.bench.conftest import ALLOC_RESULTS

MODEL = "llama-tiny"


@pytest.fixture(scope="module")
def lm():
    return load_model(MODEL)


def _requests(parallel: int) -> list[Request]:
    g = np.random.default_rng(parallel)
    return [Request(i, [1] + g.integers(3, 1000, int(g.integers(8, 120))).tolist(), int(g.integers(16, 64)))
            for i in range(2 * parallel)]


def _workload(lm, allocator: str, parallel: int):
    mem = create_memory(lm, allocator=allocator, size=2048, block_size=16, n_seq_max=parallel)
    eng = create_engine(lm, mem)
    eng.warmup()
    sched = Scheduler(eng, parallel)
    for r in _requests(parallel):
        sched.submit(r)
    step_s, allocs = [], []
    while (info := sched.step()) is not None:
        if info.n_decode and not info.n_prefill:
            step_s.append(info.seconds)
            allocs.append(mem.alloc_calls_last_step)
    assert all(r.status == "done" for r in sched.results.values())
    return step_s, allocs


@pytest.mark.parametrize("parallel", [1, 4, 8])
@pytest.mark.parametrize("allocator", ["naive", "pooled", "paged"])
def test_decode_step_with_churn(benchmark, lm, allocator, parallel):
    out = {}

    def run():
        out["r"] = _workload(lm, allocator, parallel)

    benchmark.group = f"{MODEL} decode with churn, parallel {parallel}"
    benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    step_s, allocs = out["r"]
    ms = np.asarray(step_s) * 1e3
    allocs_per_step = float(np.mean(allocs))
    benchmark.extra_info.update(decode_step_ms_p50=float(np.median(ms)), decode_step_ms_p90=float(np.percentile(ms, 90)),
                                alloc_calls_per_decode_step=allocs_per_step, decode_steps=len(ms))
    ALLOC_RESULTS[(allocator, parallel)] = (float(np.median(ms)), float(np.percentile(ms, 90)), allocs_per_step)
    if allocator != "naive":
        assert max(allocs) == 0, f"{allocator} allocated KV storage during decode"
