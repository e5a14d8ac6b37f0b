"""Presets: real GGUF files, deterministic bytes, the shapes the issue gives."""

import hashlib

import pytest

from engine.gguf.keymap import n_params
from engine.gguf.presets import PRESETS, build_preset, ensure_preset, preset_path
from engine.gguf.reader import open_gguf


@pytest.mark.parametrize("name", ["llama-tiny", "qwen2-tiny", "mistral-swa-tiny", "llama-7b"])
def test_same_recipe_same_bytes(name, tmp_path):
    a = build_preset(PRESETS[name], tmp_path / "a.gguf")
    b = build_preset(PRESETS[name], tmp_path / "b.gguf")
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()


def test_llama_small_shape():
    cfg = open_gguf(ensure_preset("llama-small")).config()
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_head_kv, cfg.n_ff, cfg.n_vocab) == (1024, 8, 16, 4, 2816, 8000)
    assert n_params(cfg) == 106_578_944  # "106.6M params"
    assert not cfg.tied_output


def test_llama_7b_is_shape_only_with_real_counts():
    f = open_gguf(ensure_preset("llama-7b"))
    cfg = f.config()
    assert not cfg.weights_present and f.tensors == {}
    assert n_params(cfg) == 6_738_415_616  # LLaMA-7B
    assert len(f.get("tokenizer.ggml.tokens")) == 32000


def test_preset_metadata_is_llamacpp_style():
    f = open_gguf(ensure_preset("mistral-swa-tiny"))
    assert f.arch == "llama"
    assert f.get("llama.attention.sliding_window") == 64
    assert f.get("tokenizer.ggml.model") == "llama"
    q = open_gguf(ensure_preset("qwen2-tiny"))
    assert q.arch == "qwen2" and "output.weight" not in q.tensors and "blk.0.attn_q.bias" in q.tensors
    assert q.get("tokenizer.ggml.model") == "gpt2" and len(q.get("tokenizer.ggml.merges")) > 100


def test_cache_path_depends_on_recipe():
    assert preset_path("llama-tiny") != preset_path("mistral-swa-tiny")
    assert PRESETS["llama-tiny"].recipe_hash() in preset_path("llama-tiny").name


def test_granite_4_h_tiny_is_a_shape_only_hybrid_with_real_counts():
    """Granite-4.0-H-Tiny's shape: IBM's "7B total" model. Shape-only files cannot drop output.weight to say the
    embedding is tied, so the preset writes kvbench.tied_output; without it the head would be counted twice."""
    f = open_gguf(ensure_preset("granite-4-h-tiny"))
    cfg = f.config()
    assert not cfg.weights_present and f.tensors == {} and cfg.tied_output
    assert cfg.attn_layers == [5, 15, 25, 35] and len(cfg.ssm_layers) == 36 and all(cfg.moe_layers)
    assert n_params(cfg) == 6_939_037_248
    # per sequence: conv (d_conv - 1) x (d_inner + 2 ng ds) and SSM d_inner x ds floats on 36 layers
    assert cfg.recurrent_bytes_per_seq == 36 * (3 * (3072 + 2 * 128) + 3072 * 128) * 4
    assert cfg.kv_bytes_per_token(2, 2) == 4 * 2 * 4 * 128 * 2  # f16 K and V, 4 KV heads of 128, 4 layers
