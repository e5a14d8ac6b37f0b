"""Write real GGUF files the way llama.cpp's converter would, from HF-layout weights.

Presets and tests start from a checkpoint in HF's layout (``model.layers.N.self_attn.q_proj``,
rotate-half RoPE) and convert it here with convert_hf_to_gguf.py's rules: llama.cpp tensor
names, Q/K rows permuted for llama's interleaved ("NORM") RoPE, llama-3 rope scaling as a
``rope_freqs`` tensor. The same HF-layout weights can then be loaded into HF transformers,
which is what makes the logit-parity tests independent of this engine.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType, RopeScalingType
from gguf import quants as gguf_quants

from engine.atomic import atomic_path
from engine.errors import ConfigError
from engine.gguf.vocab import Vocab

FILE_TYPES = {
    "f32": (LlamaFileType.ALL_F32, GGMLQuantizationType.F32),
    "f16": (LlamaFileType.MOSTLY_F16, GGMLQuantizationType.F16),
    "bf16": (LlamaFileType.MOSTLY_BF16, GGMLQuantizationType.BF16),
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, GGMLQuantizationType.Q8_0),
    "q4_0": (LlamaFileType.MOSTLY_Q4_0, GGMLQuantizationType.Q4_0),
}


@dataclass(frozen=True)
class ModelShape:
    """Hyper-parameters of a model to write, in HF terms where HF has a name for them."""

    arch: str  # "llama" | "qwen2"
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx: int = 2048
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    n_swa: int = 0
    tied: bool = False
    attn_bias: bool = False
    # llama-3 rope scaling: (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    llama3_rope: tuple[float, float, float, int] | None = None
    rope_linear_factor: float | None = None
    # recurrent / hybrid (mamba, jamba); see engine/gguf/writer_hybrid.py
    ssm_d_state: int = 16
    ssm_d_conv: int = 4
    ssm_dt_rank: int = 0  # 0: ceil(n_embd / 16), as HF and the converter default it
    attn_layers: tuple[int, ...] = ()  # jamba: which layers are attention (the rest are Mamba mixers)
    moe_layers: tuple[int, ...] = ()  # jamba: which layers have a mixture-of-experts FFN
    n_expert: int = 0
    n_expert_used: int = 0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head if self.n_head else 0

    @property
    def dt_rank(self) -> int:
        return self.ssm_dt_rank or -(-self.n_embd // 16)


def random_hf_weights(shape: ModelShape, seed: int) -> dict[str, np.ndarray]:
    """HF-named float32 weights: N(0, 0.02) matrices (HF's init), U(0.8, 1.2) norm weights."""
    if shape.arch in ("mamba", "jamba"):
        from engine.gguf.writer_hybrid import random_hf_weights_hybrid

        return random_hf_weights_hybrid(shape, seed)
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


def hf_to_gguf_tensors(shape: ModelShape, hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF names and layout -> llama.cpp names and layout (float32 arrays, torch [out, in] order)."""
    if shape.arch in ("mamba", "jamba"):
        from engine.gguf.writer_hybrid import hf_to_gguf_hybrid

        return hf_to_gguf_hybrid(shape, hf)
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


def write_gguf(
    path: str | os.PathLike,
    shape: ModelShape,
    tensors: dict[str, np.ndarray] | None,
    vocab: Vocab,
    name: str,
    file_type: str = "f32",
) -> Path:
    """Write a GGUF atomically (temp file + rename). ``tensors=None`` writes a shape-only file."""
    if file_type not in FILE_TYPES:
        raise ConfigError(f"file type {file_type!r}: expected one of {', '.join(FILE_TYPES)}")
    ftype, qtype = FILE_TYPES[file_type]
    path = Path(path)
    with atomic_path(path) as tmp:
        w = GGUFWriter(tmp, shape.arch)
        w.add_name(name)
        w.add_context_length(shape.n_ctx)
        w.add_embedding_length(shape.n_embd)
        w.add_block_count(shape.n_layer)
        w.add_layer_norm_rms_eps(shape.rms_eps)
        w.add_vocab_size(shape.n_vocab)
        w.add_file_type(int(ftype))
        if shape.arch in ("mamba", "jamba"):
            from engine.gguf.writer_hybrid import add_hybrid_metadata

            add_hybrid_metadata(w, shape)
        else:
            w.add_feed_forward_length(shape.n_ff)
            w.add_head_count(shape.n_head)
            w.add_head_count_kv(shape.n_head_kv)
            w.add_rope_freq_base(shape.rope_theta)
            w.add_key_length(shape.head_dim)
            w.add_value_length(shape.head_dim)
            w.add_rope_dimension_count(shape.head_dim)
        if shape.n_swa:
            w.add_sliding_window(shape.n_swa)
        if shape.rope_linear_factor is not None:
            w.add_rope_scaling_type(RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(shape.rope_linear_factor)
        _add_vocab(w, vocab)
        for tname, x in (tensors or {}).items():
            if x.ndim == 2 and qtype != GGMLQuantizationType.F32:
                # Rows that do not split into whole blocks fall back to F16, as the converter does.
                t = qtype if x.shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0 else GGMLQuantizationType.F16
                w.add_tensor(tname, gguf_quants.quantize(x, t), raw_dtype=t)
            else:
                w.add_tensor(tname, np.ascontiguousarray(x, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def _add_vocab(w: GGUFWriter, v: Vocab) -> None:
    w.add_tokenizer_model(v.model)
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.token_types)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    if v.merges is not None:
        w.add_token_merges(v.merges)
    w.add_bos_token_id(v.bos_id)
    w.add_eos_token_id(v.eos_id)
    if v.unk_id is not None:
        w.add_unk_token_id(v.unk_id)
    w.add_add_bos_token(v.add_bos)
    w.add_add_eos_token(False)
