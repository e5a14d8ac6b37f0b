"""Logits of every attention architecture against HF transformers on the same weights (float32)."""

import dataclasses

import numpy as np
import pytest

from engine.batch import Batch
from engine.gguf.presets import PRESETS, build_preset
from engine.loader import create_engine, create_memory, load_model
from tests.helpers.hf import hf_greedy, hf_logits, hf_model
from tests.helpers.runs import generate

TINY = PRESETS["llama-tiny"].shape
VARIANTS = {
    "llama-tiny": (PRESETS["llama-tiny"].shape, PRESETS["llama-tiny"].seed),
    "qwen2-tiny": (PRESETS["qwen2-tiny"].shape, PRESETS["qwen2-tiny"].seed),
    "mistral-swa-tiny": (PRESETS["mistral-swa-tiny"].shape, PRESETS["mistral-swa-tiny"].seed),
    # not presets: llama-3 rope scaling (rope_freqs tensor) and linear rope scaling
    "llama3-rope": (dataclasses.replace(TINY, llama3_rope=(8.0, 1.0, 4.0, 64)), 11),
    "linear-rope": (dataclasses.replace(TINY, rope_linear_factor=4.0), 12),
    "llama-untied-bias": (dataclasses.replace(TINY, attn_bias=False, tied=True), 13),
}


def _engine_for(name, tmp_path_factory):
    shape, seed = VARIANTS[name]
    if name in PRESETS:
        lm = load_model(name)
    else:
        p = dataclasses.replace(PRESETS["llama-tiny"], name=name, shape=shape, seed=seed)
        lm = load_model(build_preset(p, tmp_path_factory.mktemp(name) / f"{name}.gguf"))
    return lm, shape, seed


def _prompt(n: int, n_vocab: int, seed: int) -> list[int]:
    g = np.random.default_rng(seed)
    return [1] + g.integers(3, n_vocab, n - 1).tolist()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_equal_hf(name, tmp_path_factory):
    lm, shape, seed = _engine_for(name, tmp_path_factory)
    ref = hf_model(shape, seed)
    # 200 tokens: longer than the mistral window (64) and than llama3-rope's original context (64)
    for n in (16, 200):
        tokens = _prompt(n, shape.n_vocab, n)
        eng = create_engine(lm, create_memory(lm, size=256), n_ubatch=64)
        b = Batch()
        b.add_sequence(tokens, 0, output="all")
        ours = eng.decode(b)
        theirs = hf_logits(ref, tokens)
        err = (ours - theirs).abs().max().item()
        assert err < 1e-4, f"{name}: max |logit diff| {err:.3g} over {n} tokens"


@pytest.mark.parametrize("name", ["llama-tiny", "qwen2-tiny", "mistral-swa-tiny"])
def test_greedy_equals_hf(name, tmp_path_factory):
    lm, shape, seed = _engine_for(name, tmp_path_factory)
    ref = hf_model(shape, seed)
    tokens = _prompt(60, shape.n_vocab, 7)  # 60 + 32 crosses the 64-token window during decode
    eng = create_engine(lm, create_memory(lm, size=128))
    ours = generate(eng, [tokens], 32).tokens[0]
    assert ours == hf_greedy(ref, tokens, 32)


def test_real_model_logits_equal_hf():
    """SmolLM2-135M (a trained model, Q4_1 + Q8_0): kvbench's exact mode and HF transformers on the same
    weights, dequantized by gguf.quants, over real text. Bound from float32 arithmetic: each of the
    7 matmuls per layer rounds a K-term sum (K <= 1536), relative error ~sqrt(K) u (u = 2**-24) for
    sums in different orders; 30 layers add them, so |diff| <= 7 * 30 * sqrt(1536) * u * max|logit|
    (about 5e-4 relative; measured 2e-6)."""
    from engine.gguf.presets import ensure_model
    from harness.corpus import load_text
    from tests.helpers.hf import hf_from_gguf

    path = ensure_model("smollm2-135m")
    lm = load_model(path)
    text, _ = load_text(None)
    tokens = [lm.config.bos_id] + lm.tokenizer.encode(text[:4000])[:199]
    eng = create_engine(lm, create_memory(lm, size=256), n_ubatch=64)
    b = Batch()
    b.add_sequence(tokens, 0, output="all")
    ours = eng.decode(b)
    theirs = hf_logits(hf_from_gguf(path, attn="eager"), tokens)
    bound = 7 * lm.config.n_layer * 1536**0.5 * 2.0**-24 * theirs.abs().max().item()
    err = (ours - theirs).abs().max().item()
    assert err <= bound, f"max |logit diff| {err:.3g} > {bound:.3g}"
