"""Attention models (llama, qwen2, mistral-style SWA) written as llama.cpp's convert_hf_to_gguf.py writes
them: HF-named random weights, the Q/K row permutation, llama-3's rope_freqs, the metadata keys."""

from __future__ import annotations

import math

import numpy as np
from gguf import GGUFWriter

from engine.gguf.shapes import ModelShape


def random_hf_weights_attention(shape: ModelShape, seed: int) -> dict[str, np.ndarray]:
    """HF-named float32 weights: N(0, 0.02) matrices (HF's init), U(0.8, 1.2) norm weights."""
    rng = np.random.default_rng(seed)
    E, F, D, H, Hkv, V = shape.n_embd, shape.n_ff, shape.head_dim, shape.n_head, shape.n_head_kv, shape.n_vocab

    def normal(*s: int, std: float = 0.02) -> np.ndarray:
        x = rng.standard_normal(s, dtype=np.float32)
        x *= std
        return x

    def norm(n: int) -> np.ndarray:
        return rng.uniform(0.8, 1.2, n).astype(np.float32)

    w = {"model.embed_tokens.weight": normal(V, E)}
    for il in range(shape.n_layer):
        p = f"model.layers.{il}."
        w[p + "input_layernorm.weight"] = norm(E)
        w[p + "self_attn.q_proj.weight"] = normal(H * D, E)
        w[p + "self_attn.k_proj.weight"] = normal(Hkv * D, E)
        w[p + "self_attn.v_proj.weight"] = normal(Hkv * D, E)
        if shape.attn_bias:
            w[p + "self_attn.q_proj.bias"] = normal(H * D, std=0.1)
            w[p + "self_attn.k_proj.bias"] = normal(Hkv * D, std=0.1)
            w[p + "self_attn.v_proj.bias"] = normal(Hkv * D, std=0.1)
        w[p + "self_attn.o_proj.weight"] = normal(E, H * D)
        w[p + "post_attention_layernorm.weight"] = norm(E)
        w[p + "mlp.gate_proj.weight"] = normal(F, E)
        w[p + "mlp.up_proj.weight"] = normal(F, E)
        w[p + "mlp.down_proj.weight"] = normal(E, F)
    w["model.norm.weight"] = norm(E)
    if not shape.tied:
        w["lm_head.weight"] = normal(V, E)
    return w


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: HF rotate-half rows -> interleaved pairs per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_freq_factors(shape: ModelShape) -> np.ndarray:
    """convert_hf_to_gguf's rope_freqs for rope_type "llama3": divisors of each frequency."""
    factor, low, high, old_ctx = shape.llama3_rope
    D = shape.head_dim
    freqs = 1.0 / shape.rope_theta ** (np.arange(0, D, 2, dtype=np.float64) / D)
    low_wl, high_wl = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wl - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def hf_to_gguf_attention(shape: ModelShape, hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF names and layout -> llama.cpp names and layout (float32 arrays, torch [out, in] order)."""
    permute = shape.arch == "llama"
    out: dict[str, np.ndarray] = {}
    for name, x in hf.items():
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = x
        elif name == "model.norm.weight":
            out["output_norm.weight"] = x
        elif name == "lm_head.weight":
            out["output.weight"] = x
        else:
            _, _, il, rest = name.split(".", 3)
            mod, kind = rest.rsplit(".", 1)
            if permute and mod == "self_attn.q_proj":
                x = permute_qk(x, shape.n_head)
            elif permute and mod == "self_attn.k_proj":
                x = permute_qk(x, shape.n_head_kv)
            out[f"blk.{il}.{_NAMES[mod]}.{kind}"] = x
    if shape.llama3_rope is not None:
        out["rope_freqs.weight"] = llama3_freq_factors(shape)
    return out


def add_attention_metadata(w: GGUFWriter, shape: ModelShape) -> None:
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_key_length(shape.head_dim)
    w.add_value_length(shape.head_dim)
    w.add_rope_dimension_count(shape.head_dim)
