"""Decode tokens/s of the recurrent and hybrid presets at parallel 1 and 8, naive vs pooled.

Run:  pytest tests/bench/test_recurrent_speed.py --benchmark-only
P requests (32-token prompts, 64 generated tokens) run together; decode tokens/s = tokens decoded
in decode steps / the time of those steps (device synchronized around each step).
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.loader import create_engine, create_memory, load_model
from engine.runtime.scheduler import Request, Scheduler
from tests.bench.conftest import RECURRENT_RESULTS


@pytest.mark.parametrize("parallel", [1, 8])
@pytest.mark.parametrize("allocator", ["naive", "pooled"])
@pytest.mark.parametrize("model", ["mamba-tiny", "hybrid-tiny"])
def test_decode_tokens_per_s(benchmark, model, allocator, parallel):
    lm = load_model(model)
    g = np.random.default_rng(0)
    reqs = [Request(i, [1] + g.integers(3, 1000, 31).tolist(), 64) for i in range(parallel)]
    out = {}

    def run():
        eng = create_engine(lm, create_memory(lm, allocator=allocator, size=1024, n_seq_max=parallel))
        eng.warmup()
        sched = Scheduler(eng, parallel)
        for r in reqs:
            sched.submit(r)
        n, t = 0, 0.0
        while (info := sched.step()) is not None:
            if info.n_decode and not info.n_prefill:
                n += info.n_decode
                t += info.seconds
        out["tps"] = n / t

    benchmark.group = f"{model} decode"
    benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    benchmark.extra_info["decode_tokens_per_s"] = out["tps"]
    RECURRENT_RESULTS[(model, allocator, parallel)] = out["tps"]
