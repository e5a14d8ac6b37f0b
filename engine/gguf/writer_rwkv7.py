"""RWKV-7 checkpoints in the HF format llama.cpp's converter reads (fla's ``RWKV7ForCausalLM``, also
written by the rwkv7-hf package): random weights and their conversion to llama.cpp's ``rwkv7`` GGUF.

Conversion follows convert_hf_to_gguf.py's Rwkv7Model (vendored llama.cpp 0c1e57098, conversion/rwkv.py):
the six token-shift mixes x_r, x_w, x_k, x_v, x_a, x_g stacked in that order into ``time_mix_lerp_fused``
(6, 1, 1, C), each LoRA's ``lora.0`` / ``lora.2`` weights and ``lora.2`` bias as X1 / X2 / X0 untransposed,
``r_k`` (heads, head size) flattened, layer 0's pre-norm as ``token_embd_norm``, ``g_norm`` as
``time_mix_ln``, and layer 0's absent value-mix LoRA written as copies of its a0/a1/a2 (llama.cpp asks
for them and never reads them).

Random weights: mixes U(0, 1), decay bias w0 U(-3, 1) (decays from 0.96 to 0.6 per token), k_k U(0.5, 1),
k_a U(0.5, 1.5), matrices N(0, 1/fan_in), norms U(0.8, 1.2) with N(0, 0.1) biases.
"""

from __future__ import annotations

import numpy as np
from gguf import GGUFWriter

from engine.gguf.shapes import ModelShape

_MIXES = ("r", "w", "k", "v", "a", "g")


def random_hf_weights_rwkv7(shape: ModelShape, seed: int) -> dict[str, np.ndarray]:
    """Named as rwkv7-hf's RWKV7ForCausalLM state_dict (fla's layout)."""
    rng = np.random.default_rng(seed)
    C, V, L, F, N = shape.n_embd, shape.n_vocab, shape.n_layer, shape.n_ff, shape.wkv_head_size
    rw, ra, rv, rg = shape.rwkv_lora

    def mat(out: int, inp: int, scale: float = 1.0) -> np.ndarray:
        return rng.standard_normal((out, inp), dtype=np.float32) * np.float32(scale / np.sqrt(inp))

    def u(lo: float, hi: float, *s: int) -> np.ndarray:
        return rng.uniform(lo, hi, s).astype(np.float32)

    def ln(p: str) -> dict[str, np.ndarray]:
        return {p + ".weight": u(0.8, 1.2, C), p + ".bias": (0.1 * rng.standard_normal(C)).astype(np.float32)}

    def lora(p: str, r: int, bias: np.ndarray | None) -> dict[str, np.ndarray]:
        out = {p + ".lora.0.weight": mat(r, C), p + ".lora.2.weight": mat(C, r)}
        return out | ({p + ".lora.2.bias": bias} if bias is not None else {})

    w = {"model.embeddings.weight": rng.standard_normal((V, C), dtype=np.float32)}
    w |= ln("model.layers.0.pre_norm")
    for il in range(L):
        p = f"model.layers.{il}."
        w |= ln(p + "attn_norm") | ln(p + "ffn_norm")
        a = p + "attn."
        w |= {a + f"x_{m}": u(0.0, 1.0, 1, 1, C) for m in _MIXES}
        w |= {a + "k_k": u(0.5, 1.0, C), a + "k_a": u(0.5, 1.5, C),
              a + "r_k": (0.5 * rng.standard_normal((C // N, N))).astype(np.float32)}
        w |= {a + f"{n}_proj.weight": mat(C, C) for n in ("r", "k", "v")} | {a + "o_proj.weight": mat(C, C, 0.5)}
        w |= lora(a + "w_lora", rw, u(-3.0, 1.0, C)) | lora(a + "a_lora", ra, u(-1.0, 1.0, C))
        w |= lora(a + "g_lora", rg, None)
        if il:
            w |= lora(a + "v_lora", rv, u(-1.0, 1.0, C))
        w |= ln(a + "g_norm")
        w |= {p + "ffn.x_k": u(0.0, 1.0, C), p + "ffn.key.weight": mat(F, C), p + "ffn.value.weight": mat(C, F, 0.5)}
    w |= ln("model.norm")
    w["lm_head.weight"] = mat(V, C)
    return w


_LAYER = {"attn_norm": "attn_norm", "ffn_norm": "attn_norm_2", "attn.g_norm": "time_mix_ln",
          "attn.r_proj": "time_mix_receptance", "attn.k_proj": "time_mix_key", "attn.v_proj": "time_mix_value",
          "attn.o_proj": "time_mix_output", "ffn.key": "channel_mix_key", "ffn.value": "channel_mix_value"}
_LORA = {"lora.0.weight": "1", "lora.2.weight": "2", "lora.2.bias": "0"}


def hf_to_gguf_rwkv7(shape: ModelShape, hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {"token_embd.weight": hf["model.embeddings.weight"], "output.weight": hf["lm_head.weight"],
           "token_embd_norm.weight": hf["model.layers.0.pre_norm.weight"],
           "token_embd_norm.bias": hf["model.layers.0.pre_norm.bias"],
           "output_norm.weight": hf["model.norm.weight"], "output_norm.bias": hf["model.norm.bias"]}
    for il in range(shape.n_layer):
        p, b = f"model.layers.{il}.", f"blk.{il}."
        for hf_name, g in _LAYER.items():
            for wb in ("weight", "bias"):
                if f"{p}{hf_name}.{wb}" in hf:
                    out[f"{b}{g}.{wb}"] = hf[f"{p}{hf_name}.{wb}"]
        out[b + "time_mix_lerp_fused.weight"] = np.stack([hf[p + f"attn.x_{m}"] for m in _MIXES])  # (6, 1, 1, C)
        for n in ("k_k", "k_a"):
            out[b + f"time_mix_{n}.weight"] = hf[p + f"attn.{n}"]
        out[b + "time_mix_r_k.weight"] = hf[p + "attn.r_k"].reshape(-1)
        for x in ("w", "a", "g", "v"):
            src = "a" if (x == "v" and il == 0) else x  # layer 0: copies of a's LoRA, as the converter writes
            for part, digit in _LORA.items():
                name = f"{p}attn.{src}_lora.{part}"
                if name in hf:
                    out[f"{b}time_mix_{x}{digit}.weight"] = hf[name]
        out[b + "channel_mix_lerp_k.weight"] = hf[p + "ffn.x_k"]
    return out


def add_rwkv7_metadata(w: GGUFWriter, shape: ModelShape) -> None:
    """Rwkv7Model.set_gguf_parameters: head size, LayerNorm eps, FFN width, the four LoRA widths, head_count 0."""
    rw, ra, rv, rg = shape.rwkv_lora
    w.add_wkv_head_size(shape.wkv_head_size)
    w.add_layer_norm_eps(shape.norm_eps)
    w.add_feed_forward_length(shape.n_ff)
    w.add_decay_lora_rank(rw)
    w.add_iclr_lora_rank(ra)
    w.add_value_residual_mix_lora_rank(rv)
    w.add_gate_lora_rank(rg)
    w.add_head_count(0)
