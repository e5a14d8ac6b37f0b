"""Prefill and decode speed on llama-small (F32), kvbench vs HF transformers' generate, same weights.

Run:  pytest tests/bench/test_generate_speed.py --benchmark-only
Both implementations are timed the same way: generate with 1 new token (prefill) and with
N_DECODE + 1 new tokens (prefill + N_DECODE decode steps); decode t/s comes from the difference.
Both run in one session, back to back, on the same machine state; compare the ratio, not absolute figures.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.gguf.presets import PRESETS
from engine.loader import create_engine, create_memory, load_model
from tests.bench.conftest import BENCH_THREADS, GENERATE_RESULTS
from tests.helpers.runs import generate

N_PROMPT, N_DECODE = 128, 64
PROMPT = [1] + np.random.default_rng(0).integers(3, 8000, N_PROMPT - 1).tolist()


@pytest.fixture(scope="module")
def impls():
    from tests.helpers.hf import hf_model

    torch.set_num_threads(BENCH_THREADS)
    lm = load_model("llama-small")
    eng = create_engine(lm, create_memory(lm, size=N_PROMPT + N_DECODE + 8))
    eng.warmup()
    preset = PRESETS["llama-small"]
    hf = hf_model(preset.shape, preset.seed, attn="sdpa")
    ids = torch.tensor([PROMPT])
    mask = torch.ones_like(ids)

    def ours(n_new: int):
        eng.memory.clear()
        return generate(eng, [PROMPT], n_new).tokens[0]

    @torch.inference_mode()
    def theirs(n_new: int):
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        return out[0, N_PROMPT:].tolist()

    assert ours(8) == theirs(8)  # same weights, same greedy tokens
    return {"kvbench": ours, "hf": theirs}


@pytest.mark.parametrize("phase", ["prefill", "prefill+decode"])
@pytest.mark.parametrize("impl", ["kvbench", "hf"])
def test_generate_llama_small(benchmark, impls, impl, phase):
    n_new = 1 if phase == "prefill" else N_DECODE + 1
    benchmark.group = f"llama-small f32 {BENCH_THREADS} threads: {phase}"
    benchmark.extra_info.update(n_prompt=N_PROMPT, n_new=n_new, threads=BENCH_THREADS)
    benchmark.pedantic(impls[impl], args=(n_new,), rounds=7, warmup_rounds=1, iterations=1)
    r = GENERATE_RESULTS.setdefault(impl, {"n_prompt": N_PROMPT, "n_decode": N_DECODE})
    r[phase] = benchmark.stats.stats.median
