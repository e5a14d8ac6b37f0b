"""The one explicit map from llama.cpp tensor names to kvbench model parameters.

Shapes are in ggml order (ne0 first = the contiguous row length), exactly as GGUF stores them,
so a check reads like llama.cpp's ``create_tensor(tn(LLM_TENSOR_ATTN_Q, "weight", i), {n_embd,
n_embd_head_k * n_head})``. A parameter listed more than once (q/k/v, gate/up) is fused by the
model at load time; the map itself stays one-to-one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from engine.config import (
    ATTN,
    MAMBA1,
    MAMBA2,
    ROPE_NEOX,
    ROPE_NONE,
    ROPE_NORM,
    RWKV7,
    SSM,
    ModelConfig,
)

# Written by kvbench into shape-only files whose output matrix is the embedding: a file with tensors says it by
# having no output.weight, as llama.cpp reads it; one without tensors cannot.
TIED_KEY = "kvbench.tied_output"


@dataclass(frozen=True)
class TensorSpec:
    gguf: str  # llama.cpp name; "{il}" is the layer index
    param: str  # kvbench parameter name; "{il}" likewise
    shape: Callable[[ModelConfig], tuple[int, ...]]  # ggml order: (ne0, ne1, ...)
    required: bool = True
    per_layer: bool = False
    when: Callable[[ModelConfig, int], bool] | None = None  # per-layer tensors: which layers have it


def _g(gguf: str, param: str, shape, required: bool = True, when=None) -> TensorSpec:
    return TensorSpec(gguf, param, shape, required, per_layer="{il}" in gguf, when=when)


def _is_ssm(c: ModelConfig, il: int) -> bool:
    return c.layer_kinds[il] == SSM


def _is_attn(c: ModelConfig, il: int) -> bool:
    return c.layer_kinds[il] == ATTN


def _is_moe(c: ModelConfig, il: int) -> bool:
    return c.moe_layers[il]


def _is_dense(c: ModelConfig, il: int) -> bool:
    return not c.moe_layers[il]


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


_SSM = [  # Mamba-1 mixer (llama.cpp build_mamba_layer); ssm_a = -exp(A_log), conv1d squeezed to 2-D
    _g("blk.{il}.ssm_in.weight", "layers.{il}.mixer.in_proj.weight", lambda c: (c.n_embd, 2 * c.ssm_d_inner), when=_is_ssm),
    _g("blk.{il}.ssm_conv1d.weight", "layers.{il}.mixer.conv1d_weight", lambda c: (c.ssm_d_conv, c.ssm_d_inner),
       when=_is_ssm),
    _g("blk.{il}.ssm_conv1d.bias", "layers.{il}.mixer.conv1d_bias", lambda c: (c.ssm_d_inner,), when=_is_ssm),
    _g("blk.{il}.ssm_x.weight", "layers.{il}.mixer.x_proj.weight",
       lambda c: (c.ssm_d_inner, c.ssm_dt_rank + 2 * c.ssm_d_state), when=_is_ssm),
    _g("blk.{il}.ssm_dt.weight", "layers.{il}.mixer.dt_proj.weight", lambda c: (c.ssm_dt_rank, c.ssm_d_inner),
       when=_is_ssm),
    _g("blk.{il}.ssm_dt.bias", "layers.{il}.mixer.dt_proj.bias", lambda c: (c.ssm_d_inner,), when=_is_ssm),
    _g("blk.{il}.ssm_a", "layers.{il}.mixer.A", lambda c: (c.ssm_d_state, c.ssm_d_inner), when=_is_ssm),
    _g("blk.{il}.ssm_d", "layers.{il}.mixer.D", lambda c: (c.ssm_d_inner,), when=_is_ssm),
    _g("blk.{il}.ssm_out.weight", "layers.{il}.mixer.out_proj.weight", lambda c: (c.ssm_d_inner, c.n_embd),
       when=_is_ssm),
]
_SSM_NORMS = [  # Jamba: RMS norms on dt, B and C after x_proj
    _g("blk.{il}.ssm_dt_norm.weight", "layers.{il}.mixer.dt_norm", lambda c: (c.ssm_dt_rank,), when=_is_ssm),
    _g("blk.{il}.ssm_b_norm.weight", "layers.{il}.mixer.b_norm", lambda c: (c.ssm_d_state,), when=_is_ssm),
    _g("blk.{il}.ssm_c_norm.weight", "layers.{il}.mixer.c_norm", lambda c: (c.ssm_d_state,), when=_is_ssm),
]
_SSM2 = [  # Mamba-2 mixer (llama.cpp build_mamba2_layer); in_proj rows z | xBC | dt, ssm_a = -exp(A_log) per head
    _g("blk.{il}.ssm_in.weight", "layers.{il}.mixer.in_proj.weight",
       lambda c: (c.n_embd, c.ssm_d_inner + c.ssm_conv_dim + c.ssm_dt_rank), when=_is_ssm),
    _g("blk.{il}.ssm_conv1d.weight", "layers.{il}.mixer.conv1d_weight", lambda c: (c.ssm_d_conv, c.ssm_conv_dim),
       when=_is_ssm),
    _g("blk.{il}.ssm_conv1d.bias", "layers.{il}.mixer.conv1d_bias", lambda c: (c.ssm_conv_dim,), when=_is_ssm),
    _g("blk.{il}.ssm_dt.bias", "layers.{il}.mixer.dt_bias", lambda c: (c.ssm_dt_rank,), when=_is_ssm),
    _g("blk.{il}.ssm_a", "layers.{il}.mixer.A", lambda c: (1, c.ssm_dt_rank), when=_is_ssm),
    _g("blk.{il}.ssm_d", "layers.{il}.mixer.D", lambda c: (1, c.ssm_dt_rank), when=_is_ssm),
    _g("blk.{il}.ssm_norm.weight", "layers.{il}.mixer.norm",
       lambda c: (c.ssm_d_inner // c.ssm_n_group, c.ssm_n_group), when=_is_ssm),
    _g("blk.{il}.ssm_out.weight", "layers.{il}.mixer.out_proj.weight", lambda c: (c.ssm_d_inner, c.n_embd),
       when=_is_ssm),
]


def _pick(*names: str, when=None) -> list[TensorSpec]:
    """The llama specs of these tensors (names without "blk.{il}." and ".weight"), restricted to `when` layers."""
    by = {s.gguf.removeprefix("blk.{il}.").removesuffix(".weight"): s for s in _LLAMA}
    return [_g(by[n].gguf, by[n].param, by[n].shape, by[n].required, when=when) for n in names]


_COMMON = _pick("token_embd", "output_norm", "output")  # output optional: tied to token_embd
_ATTN_NOBIAS = _pick("attn_q", "attn_k", "attn_v", "attn_output", when=_is_attn)  # Jamba: no biases, no rope
_FFN_DENSE = _pick("ffn_gate", "ffn_up", "ffn_down", when=_is_dense)
_FFN_MOE = [
    _g("blk.{il}.ffn_gate_inp.weight", "layers.{il}.feed_forward.router", lambda c: (c.n_embd, c.n_expert), when=_is_moe),
    _g("blk.{il}.ffn_gate_exps.weight", "layers.{il}.feed_forward.gate_exps", lambda c: (c.n_embd, c.n_ff, c.n_expert),
       when=_is_moe),
    _g("blk.{il}.ffn_up_exps.weight", "layers.{il}.feed_forward.up_exps", lambda c: (c.n_embd, c.n_ff, c.n_expert),
       when=_is_moe),
    _g("blk.{il}.ffn_down_exps.weight", "layers.{il}.feed_forward.down_exps", lambda c: (c.n_ff, c.n_embd, c.n_expert),
       when=_is_moe),
]
def _has_shexp(c: ModelConfig, il: int) -> bool:
    return c.moe_layers[il] and c.n_ff_shexp > 0


_FFN_SHEXP = [  # Granite: a shared expert added to the routed ones
    _g("blk.{il}.ffn_gate_shexp.weight", "layers.{il}.feed_forward.shared.w1.weight",
       lambda c: (c.n_embd, c.n_ff_shexp), when=_has_shexp),
    _g("blk.{il}.ffn_up_shexp.weight", "layers.{il}.feed_forward.shared.w3.weight",
       lambda c: (c.n_embd, c.n_ff_shexp), when=_has_shexp),
    _g("blk.{il}.ffn_down_shexp.weight", "layers.{il}.feed_forward.shared.w2.weight",
       lambda c: (c.n_ff_shexp, c.n_embd), when=_has_shexp),
]
_NORMS = [
    _g("blk.{il}.attn_norm.weight", "layers.{il}.attention_norm.weight", lambda c: (c.n_embd,)),
]
_FFN_NORM = [_g("blk.{il}.ffn_norm.weight", "layers.{il}.ffn_norm.weight", lambda c: (c.n_embd,))]


def _first(c: ModelConfig, il: int) -> bool:
    return il == 0


def _later(c: ModelConfig, il: int) -> bool:
    return il > 0


def _vec(gguf: str, param: str, when=None) -> TensorSpec:
    return _g(gguf, param, lambda c: (c.n_embd,), when=when)


def _mat(gguf: str, param: str, n_in, n_out, when=None) -> TensorSpec:
    """A matrix applied as y = W x: ggml ne (n_in, n_out), torch (n_out, n_in)."""
    return _g(gguf, param, lambda c: (n_in(c), n_out(c)), when=when)


_C = lambda c: c.n_embd  # noqa: E731
_RWKV7 = [  # llama.cpp llama_model_rwkv7::load_arch_tensors; LayerNorms with biases, all layers recurrent
    _g("token_embd.weight", "tok_embeddings.weight", lambda c: (c.n_embd, c.n_vocab)),
    _vec("token_embd_norm.weight", "emb_norm.weight"), _vec("token_embd_norm.bias", "emb_norm.bias"),
    _vec("output_norm.weight", "norm.weight"), _vec("output_norm.bias", "norm.bias"),
    _g("output.weight", "output.weight", lambda c: (c.n_embd, c.n_vocab)),
    *[_vec(f"blk.{{il}}.{g}.{wb}", f"layers.{{il}}.{p}.{wb}") for g, p in
      (("attn_norm", "attn_norm"), ("attn_norm_2", "ffn_norm"), ("time_mix_ln", "time_mix.ln")) for wb in ("weight", "bias")],
    *[_vec(f"blk.{{il}}.time_mix_{n}.weight", f"layers.{{il}}.time_mix.{n}") for n in ("w0", "a0", "v0", "k_k", "k_a", "r_k")],
    _mat("blk.{il}.time_mix_w1.weight", "layers.{il}.time_mix.w1.weight", _C, lambda c: c.n_lora_decay),
    _mat("blk.{il}.time_mix_w2.weight", "layers.{il}.time_mix.w2.weight", lambda c: c.n_lora_decay, _C),
    _mat("blk.{il}.time_mix_a1.weight", "layers.{il}.time_mix.a1.weight", _C, lambda c: c.n_lora_iclr),
    _mat("blk.{il}.time_mix_a2.weight", "layers.{il}.time_mix.a2.weight", lambda c: c.n_lora_iclr, _C),
    # layer 0 has no value mix; llama.cpp still asks for v1/v2 there, and the converter writes a1/a2's copies
    _mat("blk.{il}.time_mix_v1.weight", "layers.{il}.time_mix.v1.weight", _C, lambda c: c.n_lora_iclr, when=_first),
    _mat("blk.{il}.time_mix_v2.weight", "layers.{il}.time_mix.v2.weight", lambda c: c.n_lora_iclr, _C, when=_first),
    _mat("blk.{il}.time_mix_v1.weight", "layers.{il}.time_mix.v1.weight", _C, lambda c: c.n_lora_value_res_mix,
         when=_later),
    _mat("blk.{il}.time_mix_v2.weight", "layers.{il}.time_mix.v2.weight", lambda c: c.n_lora_value_res_mix, _C,
         when=_later),
    _mat("blk.{il}.time_mix_g1.weight", "layers.{il}.time_mix.g1.weight", _C, lambda c: c.n_lora_gate),
    _mat("blk.{il}.time_mix_g2.weight", "layers.{il}.time_mix.g2.weight", lambda c: c.n_lora_gate, _C),
    _g("blk.{il}.time_mix_lerp_fused.weight", "layers.{il}.time_mix.lerp", lambda c: (c.n_embd, 1, 1, 6)),
    *[_mat(f"blk.{{il}}.time_mix_{n}.weight", f"layers.{{il}}.time_mix.{n}.weight", _C, _C)
      for n in ("receptance", "key", "value", "output")],
    _vec("blk.{il}.channel_mix_lerp_k.weight", "layers.{il}.channel_mix.lerp_k"),
    _mat("blk.{il}.channel_mix_key.weight", "layers.{il}.channel_mix.key.weight", _C, lambda c: c.n_ff),
    _mat("blk.{il}.channel_mix_value.weight", "layers.{il}.channel_mix.value.weight", lambda c: c.n_ff, _C),
]


@dataclass(frozen=True)
class ArchSpec:
    """What differs between the architectures kvbench runs."""

    rope_type: str  # llama.cpp's llama_model_rope_type() for the arch
    tensors: tuple[TensorSpec, ...]
    attn_bias: bool = False
    model: str = "transformer"  # engine.model class family: transformer | hybrid | rwkv7
    recurrent: bool = False  # has recurrent layers (reads {arch}.ssm.* keys)
    ssm_kind: str = MAMBA1  # what those layers are
    moe_norm_w: bool = False  # llama.cpp build_moe_ffn's norm_w: top-k router weights renormalised
    moe_every_layer: bool = False  # every layer routes when the file has experts (else: where ffn_gate_inp is)
    rope_if_finetuned: bool = False  # rope only where {arch}.rope.scaling.finetuned is true (llama.cpp rope_pattern)


ARCHS: dict[str, ArchSpec] = {
    # llama.cpp permutes llama Q/K rows at conversion so that its NORM rope (adjacent pairs)
    # computes what HF's rotate_half computes on the unpermuted weights.
    "llama": ArchSpec(ROPE_NORM, tuple(_LLAMA)),
    "qwen2": ArchSpec(ROPE_NEOX, tuple(_LLAMA + _QKV_BIAS), attn_bias=True),
    # Mamba-1: every layer is a mixer with a pre-norm, no feed-forward, no attention
    "mamba": ArchSpec(ROPE_NONE, tuple(_COMMON + _NORMS + _SSM), model="hybrid", recurrent=True),
    # Jamba: per layer a Mamba-1 mixer (with dt/B/C norms) or rope-less attention, then a dense or MoE FFN
    "jamba": ArchSpec(ROPE_NONE, tuple(_COMMON + _NORMS + _SSM + _SSM_NORMS + _ATTN_NOBIAS + _FFN_NORM + _FFN_DENSE
                                       + _FFN_MOE), model="hybrid", recurrent=True),
    # Granite 4 hybrids (and Bamba): Mamba-2 mixers or attention (no rope unless rope.scaling.finetuned), then
    # a dense FFN or routed experts plus a shared expert; Granite's embedding/residual/attention/logit scales
    "granitehybrid": ArchSpec(ROPE_NORM, tuple(_COMMON + _NORMS + _SSM2 + _ATTN_NOBIAS + _FFN_NORM + _FFN_DENSE
                                                + _FFN_MOE + _FFN_SHEXP), model="hybrid", recurrent=True,
                              ssm_kind=MAMBA2, moe_norm_w=True, moe_every_layer=True, rope_if_finetuned=True),
    # RWKV-7: every layer a time mix (the wkv7 recurrence) and a channel mix, both fed by token shift
    "rwkv7": ArchSpec(ROPE_NONE, tuple(_RWKV7), model="rwkv7", recurrent=True, ssm_kind=RWKV7),
}


def expand(specs: tuple[TensorSpec, ...], cfg: ModelConfig) -> list[tuple[str, str, TensorSpec]]:
    """(gguf name, param name, spec) for every tensor a model with this config has."""
    out = []
    for s in specs:
        if s.per_layer:
            out += [(s.gguf.format(il=il), s.param.format(il=il), s) for il in range(cfg.n_layer)
                    if s.when is None or s.when(cfg, il)]
        else:
            out.append((s.gguf, s.param, s))
    return out


def n_params(cfg: ModelConfig) -> int:
    """Parameters the shapes imply: every required tensor, and the output matrix unless it is tied."""
    total = 0
    for name, _, spec in expand(ARCHS[cfg.arch].tensors, cfg):
        if spec.required or (name == "output.weight" and not cfg.tied_output):
            total += math.prod(spec.shape(cfg))
    return total
