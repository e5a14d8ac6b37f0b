"""The one explicit map from llama.cpp tensor names to kvbench model parameters.

Shapes are in ggml order (ne0 first = the contiguous row length), exactly as GGUF stores them,
so a check reads like llama.cpp's ``create_tensor(tn(LLM_TENSOR_ATTN_Q, "weight", i), {n_embd,
n_embd_head_k * n_head})``. A parameter listed more than once (q/k/v, gate/up) is fused by the
model at load time; the map itself stays one-to-one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from engine.model.config import ROPE_NEOX, ROPE_NORM, ModelConfig


@dataclass(frozen=True)
class TensorSpec:
    gguf: str  # llama.cpp name; "{il}" is the layer index
    param: str  # kvbench parameter name; "{il}" likewise
    shape: Callable[[ModelConfig], tuple[int, ...]]  # ggml order: (ne0, ne1, ...)
    required: bool = True
    per_layer: bool = False


def _g(gguf: str, param: str, shape, required: bool = True) -> TensorSpec:
    return TensorSpec(gguf, param, shape, required, per_layer="{il}" in gguf)


_LLAMA = [
    _g("token_embd.weight", "tok_embeddings.weight", lambda c: (c.n_embd, c.n_vocab)),
    _g("output_norm.weight", "norm.weight", lambda c: (c.n_embd,)),
    # Absent when the embedding is tied (the loader then sets tied_output).
    _g("output.weight", "output.weight", lambda c: (c.n_embd, c.n_vocab), required=False),
    # Llama-3 rope scaling: per-dimension divisors of theta, written by convert_hf_to_gguf.
    _g("rope_freqs.weight", "rope_freqs", lambda c: (c.n_rot // 2,), required=False),
    _g("blk.{il}.attn_norm.weight", "layers.{il}.attention_norm.weight", lambda c: (c.n_embd,)),
    _g("blk.{il}.attn_q.weight", "layers.{il}.attention.wq.weight",
       lambda c: (c.n_embd, c.n_embd_head_k * c.n_head)),
    _g("blk.{il}.attn_k.weight", "layers.{il}.attention.wk.weight", lambda c: (c.n_embd, c.n_embd_k_gqa)),
    _g("blk.{il}.attn_v.weight", "layers.{il}.attention.wv.weight", lambda c: (c.n_embd, c.n_embd_v_gqa)),
    _g("blk.{il}.attn_output.weight", "layers.{il}.attention.wo.weight",
       lambda c: (c.n_embd_head_v * c.n_head, c.n_embd)),
    _g("blk.{il}.ffn_norm.weight", "layers.{il}.ffn_norm.weight", lambda c: (c.n_embd,)),
    _g("blk.{il}.ffn_gate.weight", "layers.{il}.feed_forward.w1.weight", lambda c: (c.n_embd, c.n_ff)),
    _g("blk.{il}.ffn_up.weight", "layers.{il}.feed_forward.w3.weight", lambda c: (c.n_embd, c.n_ff)),
    _g("blk.{il}.ffn_down.weight", "layers.{il}.feed_forward.w2.weight", lambda c: (c.n_ff, c.n_embd)),
]

_QKV_BIAS = [
    _g("blk.{il}.attn_q.bias", "layers.{il}.attention.wq.bias", lambda c: (c.n_embd_head_k * c.n_head,)),
    _g("blk.{il}.attn_k.bias", "layers.{il}.attention.wk.bias", lambda c: (c.n_embd_k_gqa,)),
    _g("blk.{il}.attn_v.bias", "layers.{il}.attention.wv.bias", lambda c: (c.n_embd_v_gqa,)),
]


@dataclass(frozen=True)
class ArchSpec:
    """What differs between the attention architectures kvbench runs on one Transformer."""

    rope_type: str  # llama.cpp's llama_model_rope_type() for the arch
    tensors: tuple[TensorSpec, ...]
    attn_bias: bool = False


ARCHS: dict[str, ArchSpec] = {
    # llama.cpp permutes llama Q/K rows at conversion so that its NORM rope (adjacent pairs)
    # computes what HF's rotate_half computes on the unpermuted weights.
    "llama": ArchSpec(ROPE_NORM, tuple(_LLAMA)),
    "qwen2": ArchSpec(ROPE_NEOX, tuple(_LLAMA + _QKV_BIAS), attn_bias=True),
}


def expand(specs: tuple[TensorSpec, ...], n_layer: int) -> list[tuple[str, str, TensorSpec]]:
    """(gguf name, param name, spec) for every tensor of a model with n_layer layers."""
    out = []
    for s in specs:
        if s.per_layer:
            out += [(s.gguf.format(il=il), s.param.format(il=il), s) for il in range(n_layer)]
        else:
            out.append((s.gguf, s.param, s))
    return out
