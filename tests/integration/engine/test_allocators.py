"""naive, pooled and paged give the same logits (1e-5, f32 cache) and the same greedy tokens."""

import numpy as np
import pytest
import torch

from engine.loader import create_engine, create_memory
from engine.runtime.scheduler import Request, Scheduler
from tests.helpers.runs import run_all

ALLOCS = ["naive", "pooled", "paged"]


def _prompt(n, seed):
    return [1] + np.random.default_rng(seed).integers(3, 1000, n - 1).tolist()


def scripted_run(lm, allocator, type_k="f32", type_v="f32", size=512):
    """Parallel sequences with churn, driven step by step; returns every logits row produced."""
    eng = create_engine(lm, create_memory(lm, allocator=allocator, size=size, block_size=16, n_seq_max=4,
                                          type_k=type_k, type_v=type_v), n_ubatch=32)
    out = []
    logits = eng.prefill({0: _prompt(40, 0), 1: _prompt(7, 1), 2: _prompt(75, 2)})
    out.append(logits)
    nxt = {s: int(r.argmax()) for s, r in zip((0, 1, 2), logits)}
    for step in range(30):
        if step == 8:  # sequence 1 ends; a new request takes its slot in the same step loop
            eng.memory.seq_rm(1, -1, -1)
            nxt.pop(1)
            out.append(eng.prefill({1: _prompt(20, 3)}))
            nxt[1] = int(out[-1][0].argmax())
        if step == 15:  # sequence 3 starts from a copy of sequence 0's first 30 positions
            eng.memory.seq_cp(0, 3, 0, 30)
            eng.memory.seq_rm(3, 20, -1)
            out.append(eng.prefill({3: _prompt(5, 4)}))
            nxt[3] = int(out[-1][0].argmax())
        if step == 22 and not lm.config.n_swa:
            # drop the tail of sequence 2 and continue from there. Not on SWA models: paged and
            # naive drop out-of-window positions eagerly, pooled lazily (llama.cpp), so what a
            # rollback past the window finds differs by design (seq_pos_min tells a caller).
            eng.memory.seq_rm(2, eng.memory.seq_pos_max(2) - 4, -1)
        logits = eng.decode_step(nxt)
        out.append(logits)
        nxt = {s: int(r.argmax()) for s, r in zip(nxt, logits)}
    return torch.cat(out)


@pytest.mark.parametrize("model", ["llama-tiny", "mistral-swa-tiny"])
def test_same_logits_with_churn(load, model):
    lm = load(model)
    ref = scripted_run(lm, "pooled")
    for a in ("naive", "paged"):
        err = (scripted_run(lm, a) - ref).abs().max().item()
        assert err < 1e-5, f"{a} vs pooled: {err:.3g}"


@pytest.fixture(scope="module")
def llama_tiny_f64():
    """llama-tiny computing in float64 (a private copy: the session's cached model stays float32)."""
    import dataclasses

    from engine.loader import load_model

    lm = load_model("llama-tiny")
    lm.model.double()
    return dataclasses.replace(lm, dtype=torch.float64)


@pytest.mark.parametrize("type_k, type_v", [("q8_0", "q4_0"), ("bf16", "f16")])
def test_same_logits_with_quantized_cache(llama_tiny_f64, type_k, type_v):
    """Every allocator encodes the same K/V rows into the same cache bytes and reads them back alike.

    Why float64, and where the bound comes from. The allocators attend over different layouts (pooled:
    cells [0, n_kv) with a mask; paged: gathered blocks; naive: each sequence's own rows), so SDPA sees
    other shapes and, in float32, rounds differently: about 1e-7 relative, and more on CPUs where MKL
    takes other kernel paths. The next layer's K/V then differ by that much before they are quantized,
    and a value that lies within 1e-7 of a q4_0 / q8_0 / bf16 rounding boundary lands in the
    neighbouring bucket: one quantization step (up to amax/8 for q4_0) instead of a rounding error. That
    is a real, machine-dependent difference no float32 bound derived from rounding can cover. In float64
    the layouts still round differently, by about 1e-16 relative; the codecs quantize from float32, and
    a float64 difference of 1e-16 changes the float32 value only when it straddles a float32 rounding
    boundary (probability about 1e-16 / 6e-8 per element, about 2e-4 over the ~1e5 cached elements
    here), and even then flips a bucket only with probability about ulp32 / step (< 1e-3). So the codec
    inputs are identical in practice, the stored bytes are identical, and what remains is the float64
    difference of the attention itself, rounded to float32 on output: at most 1 ulp of float32 per logit
    on each side. Bound: 2 ulp at the largest logit magnitude, 2 * 2**-23 * max|logit|.
    """
    lm = llama_tiny_f64
    ref = scripted_run(lm, "pooled", type_k, type_v)
    bound = 2 * 2.0**-23 * ref.abs().max().item()
    for a in ("naive", "paged"):
        err = (scripted_run(lm, a, type_k, type_v) - ref).abs().max().item()
        assert err <= bound, f"{a} vs pooled with {type_k}/{type_v} caches: {err:.3g} > {bound:.3g}"


def _requests():
    g = np.random.default_rng(5)
    return [Request(i, _prompt(int(g.integers(3, 60)), 10 + i), int(g.integers(4, 24))) for i in range(9)]


def _schedule(lm, allocator, size, parallel=4, share_prefix=True):
    eng = create_engine(lm, create_memory(lm, allocator=allocator, size=size, block_size=16, n_seq_max=parallel))
    sched = Scheduler(eng, parallel, share_prefix=share_prefix)
    res = run_all(sched, _requests())
    assert eng.memory.stats().used_cells == 0  # every finished request released its memory
    return [r.tokens for r in res], sched.preemptions, [r.status for r in res]


@pytest.mark.parametrize("model", ["llama-tiny", "qwen2-tiny"])
def test_same_greedy_tokens_under_the_scheduler(load, model):
    lm = load(model)
    ref, pre, status = _schedule(lm, "pooled", 1024)
    assert pre == 0 and set(status) == {"done"}
    for a in ("naive", "paged"):
        assert _schedule(lm, a, 1024)[0] == ref


def test_preemption_recomputes_the_same_tokens(load):
    lm = load("llama-tiny")
    ref = _schedule(lm, "pooled", 1024)[0]
    for a in ALLOCS:
        tokens, preemptions, status = _schedule(lm, a, 128)
        assert preemptions > 0 and set(status) == {"done"}, a
        assert tokens == ref, a
