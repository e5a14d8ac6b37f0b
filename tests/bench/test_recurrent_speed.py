"""Decode tokens/s of the recurrent and hybrid presets at parallel 1 and 8, naive vs pooled.

Run:  pytest tests/bench/test_recurrent_speed.py --benchmark-only
P requests (32-token prompts, 64 generated tokens) run together; decode tokens/s = tokens decoded
in decode steps / the time of those steps (device synchronized around each step).
"""

from __future__ import annotations

import pytest

from engine.loader import load_model
from tests.bench.conftest import RECURRENT_RESULTS
from tests.bench.drive import decode_steps, random_requests


@pytest.mark.parametrize("parallel", [1, 8])
@pytest.mark.parametrize("allocator", ["naive", "pooled"])
@pytest.mark.parametrize("model", ["mamba-tiny", "hybrid-tiny"])
def test_decode_tokens_per_s(benchmark, model, allocator, parallel):
    lm = load_model(model)
    reqs = random_requests(parallel, prompt=(31, 32), output=(64, 65), seed=0)
    out = {}

    def run():
        steps = decode_steps(lm, allocator, parallel, reqs, size=1024)
        out["tps"] = sum(s.n_decode for s in steps) / sum(s.seconds for s in steps)

    benchmark.group = f"{model} decode"
    benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    benchmark.extra_info["decode_tokens_per_s"] = out["tps"]
    RECURRENT_RESULTS[(model, allocator, parallel)] = out["tps"]
