"""Mamba-1, Jamba, Granite 4 hybrids (Mamba-2) and RWKV-7 against HF transformers (RWKV-7: the rwkv7-hf package), and
recurrent memory end to end."""

import numpy as np
import pytest
import torch

from engine.batch import Batch
from engine.gguf.presets import PRESETS
from engine.loader import create_engine, create_memory
from engine.runtime.scheduler import Request, Scheduler
from tests.helpers.hf import hf_greedy, hf_logits, hf_model
from tests.helpers.runs import generate, run_all

MODELS = ["mamba-tiny", "hybrid-tiny", "granite-hybrid-tiny", "rwkv7-tiny"]


def _prompt(n, seed):
    return [1] + np.random.default_rng(seed).integers(3, 1000, n - 1).tolist()


@pytest.fixture(scope="module")
def hf():
    return {m: hf_model(PRESETS[m].shape, PRESETS[m].seed) for m in MODELS}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("n", [16, 64, 200])
def test_logits_equal_hf(load, hf, model, n):
    lm = load(model)
    toks = _prompt(n, n)
    ref = hf_logits(hf[model], toks)
    for n_ubatch in (512, 48):  # 48: the state crosses ubatch boundaries
        eng = create_engine(lm, create_memory(lm, size=256), n_ubatch=n_ubatch)
        b = Batch()
        b.add_sequence(toks, 0, output="all")
        err = (eng.decode(b) - ref).abs().max().item()
        assert err < 1e-4, f"{model} n={n} ubatch={n_ubatch}: {err:.3g}"


@pytest.mark.parametrize("model", MODELS)
def test_greedy_equals_hf(load, hf, model):
    lm = load(model)
    for seed in (1, 2):
        toks = _prompt(20, seed)
        ours = generate(create_engine(lm, create_memory(lm, size=128)), [toks], 32).tokens[0]
        assert ours == hf_greedy(hf[model], toks, 32)


def _run(lm, prompts, allocator, together: bool):
    from tests.integration.engine.test_parallel import _run as run

    return {s: torch.stack(v) for s, v in run(lm, prompts, 16, together, allocator).items()}


@pytest.mark.parametrize("model", MODELS)
def test_together_equals_alone_and_allocators_agree(load, model):
    lm = load(model)
    prompts = [_prompt(n, 100 + n) for n in (5, 40, 90, 17)]
    ref = _run(lm, prompts, "pooled", together=False)
    allocators = ["naive", "pooled"] + (["paged"] if lm.config.attn_layers else [])
    for a in allocators:
        got = _run(lm, prompts, a, together=True)
        err = max((got[s] - ref[s]).abs().max().item() for s in ref)
        assert err < 1e-4, f"{a} together vs pooled alone: {err:.3g}"


@pytest.mark.parametrize("model", MODELS)
def test_scheduler_with_churn_same_tokens_on_every_allocator(load, model):
    lm = load(model)
    g = np.random.default_rng(9)
    reqs = [Request(i, _prompt(int(g.integers(4, 50)), 200 + i), int(g.integers(4, 20))) for i in range(8)]
    out = {}
    for a in ["naive", "pooled"] + (["paged"] if lm.config.attn_layers else []):
        mem = create_memory(lm, allocator=a, size=512, n_seq_max=3)
        res = run_all(Scheduler(create_engine(lm, mem), 3), reqs)
        assert all(r.status == "done" for r in res)
        assert mem.stats().live_bytes == 0  # every finished request gave its state back
        out[a] = [r.tokens for r in res]
    assert all(v == out["pooled"] for v in out.values())


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("src, dst", [("pooled", "pooled"), ("naive", "pooled"), ("pooled", "naive")])
def test_state_round_trip(load, tmp_path, model, src, dst):
    lm = load(model)
    a = create_engine(lm, create_memory(lm, allocator=src, size=256, n_seq_max=3))
    a.prefill({0: _prompt(30, 1), 2: _prompt(11, 2)})
    path = tmp_path / "s.kvstate"
    a.memory.save_state(path)
    b = create_engine(lm, create_memory(lm, allocator=dst, size=256, n_seq_max=3))
    b.memory.load_state(path)
    assert b.memory.seq_pos_max(0) == 29 and b.memory.seq_pos_max(2) == 10
    la, lb = a.decode_step({0: 7, 2: 8}), b.decode_step({0: 7, 2: 8})
    assert (la - lb).abs().max().item() < 1e-5


def test_memory_separates_kv_from_recurrent_state(load):
    lm = load("hybrid-tiny")
    mem = create_memory(lm, size=256, n_seq_max=2)
    bd = mem.memory_breakdown()
    cfg = lm.config
    assert bd["k.device"] == 256 * len(cfg.attn_layers) * cfg.n_embd_k_gqa * 4
    assert bd["r.device"] + bd["s.device"] == 2 * cfg.recurrent_bytes_per_seq
    eng = create_engine(lm, mem)
    eng.prefill({0: _prompt(10, 3)})
    live10 = mem.rs.usage()[0]
    for _ in range(50):
        eng.decode_step({0: 5})
    assert mem.rs.usage()[0] == live10 == cfg.recurrent_bytes_per_seq  # no growth with context
    assert mem.kv.usage()[0] == 60 * mem.kv.bytes_per_token  # 10 prompt tokens + 50 steps: the KV part grew


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("allocator", ["naive", "pooled"])
def test_memory_only_counts_the_same_bytes_as_a_real_run(model, allocator):
    """Memory-only (meta, no arithmetic) runs of recurrent and hybrid shapes: the same requests through the
    scheduler reserve, peak and hold exactly the bytes of the real run, KV and recurrent state alike, and the
    weights count the same bytes."""
    from engine.loader import load_model

    out = {}
    for memory_only in (False, True):
        lm = load_model(model, memory_only=memory_only)
        mem = create_memory(lm, allocator=allocator, size=256, n_seq_max=3)
        sched = Scheduler(create_engine(lm, mem), 3)
        res = run_all(sched, [Request(i, [5 + i] * (20 + 7 * i), 12) for i in range(5)])
        st = mem.stats()
        kv, rs = mem.parts()
        out[memory_only] = (lm.weight_bytes(), st.reserved_bytes, st.reserved_peak_bytes, sched.preemptions,
                            [r.status for r in res], [len(r.tokens) for r in res],
                            rs.stats().reserved_peak_bytes if rs is not None else 0)
    assert lm.memory_only and out[True] == out[False]
    assert out[True][-1] > 0  # the recurrent state was counted
