"""Decode step time and storage allocations per step: naive vs pooled vs paged, with churn.

Run:  pytest tests/bench/test_alloc_speed.py --benchmark-only
Workload: 2 x parallel requests with varied prompt (8..120) and output (16..64) lengths through
the scheduler, so sequences end at different times and new ones start in freed slots. A decode
step is a step with no prefill tokens. Pooled and paged must allocate no KV storage after start-up.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.loader import load_model
from tests.bench.conftest import ALLOC_RESULTS
from tests.bench.drive import decode_steps, random_requests

MODEL = "llama-tiny"


@pytest.fixture(scope="module")
def lm():
    return load_model(MODEL)


def _workload(lm, allocator: str, parallel: int):
    reqs = random_requests(2 * parallel, prompt=(8, 120), output=(16, 64), seed=parallel)
    steps = decode_steps(lm, allocator, parallel, reqs, size=2048, block_size=16)
    return [s.seconds for s in steps], [s.alloc_calls for s in steps]


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
