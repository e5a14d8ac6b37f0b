"""Mamba-1 and Jamba checkpoints: random HF-layout weights and their conversion to llama.cpp's GGUF.

Conversion follows convert_hf_to_gguf.py's MambaModel / JambaModel: ``ssm_a = -exp(A_log)``, the
depthwise conv weight squeezed to (d_inner, d_conv), an output matrix equal to the embedding
omitted (tied), Jamba's fused experts split into ``ffn_gate_exps`` / ``ffn_up_exps``, the layer
kinds written as a per-layer ``head_count_kv`` array (0 = Mamba layer).

Random weights are scaled so the recurrence does something worth testing: A follows Mamba's init
(-(1..d_state) per channel), dt_bias is the inverse softplus of dt in [1e-3, 1e-1], matrices are
N(0, 1/fan_in) so activations stay O(1), norm weights U(0.8, 1.2).
"""

from __future__ import annotations

import numpy as np
from gguf import GGUFWriter

from engine.gguf.shapes import ModelShape


def hybrid_attention(p: str, shape: ModelShape, mat) -> dict[str, np.ndarray]:
    """A hybrid's attention layer in HF names (Jamba, Granite): q, k, v, o drawn by ``mat(out, in, scale)``
    in that order, the output at half scale."""
    d, H, Hkv, hd = shape.n_embd, shape.n_head, shape.n_head_kv, shape.head_dim
    return {p + "self_attn.q_proj.weight": mat(H * hd, d), p + "self_attn.k_proj.weight": mat(Hkv * hd, d),
            p + "self_attn.v_proj.weight": mat(Hkv * hd, d), p + "self_attn.o_proj.weight": mat(d, H * hd, 0.5)}


def random_hf_weights_hybrid(shape: ModelShape, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, V, L = shape.n_embd, shape.n_vocab, shape.n_layer
    di, ds, dc, r = 2 * d, shape.ssm_d_state, shape.ssm_d_conv, shape.dt_rank

    def mat(out: int, inp: int, scale: float = 1.0) -> np.ndarray:
        x = rng.standard_normal((out, inp), dtype=np.float32)
        x *= scale / np.sqrt(inp)
        return x

    def norm(n: int) -> np.ndarray:
        return rng.uniform(0.8, 1.2, n).astype(np.float32)

    def mixer(p: str, jamba: bool) -> dict[str, np.ndarray]:
        dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), di)).astype(np.float32)
        m = {
            p + "in_proj.weight": mat(2 * di, d),
            p + "conv1d.weight": (rng.standard_normal((di, 1, dc), dtype=np.float32) / np.sqrt(dc)),
            p + "conv1d.bias": (0.1 * rng.standard_normal(di)).astype(np.float32),
            p + "x_proj.weight": mat(r + 2 * ds, di),
            p + "dt_proj.weight": mat(di, r),
            p + "dt_proj.bias": (dt + np.log(-np.expm1(-dt))).astype(np.float32),  # softplus^-1(dt)
            p + "A_log": np.log(np.tile(np.arange(1, ds + 1, dtype=np.float32), (di, 1))),
            p + "D": (1.0 + 0.1 * rng.standard_normal(di)).astype(np.float32),
            p + "out_proj.weight": mat(d, di, 0.5),
        }
        if jamba:
            m |= {p + "dt_layernorm.weight": norm(r), p + "b_layernorm.weight": norm(ds),
                  p + "c_layernorm.weight": norm(ds)}
        return m

    emb = (0.5 * rng.standard_normal((V, d))).astype(np.float32)
    if shape.arch == "mamba":
        w = {"backbone.embeddings.weight": emb}
        for il in range(L):
            w[f"backbone.layers.{il}.norm.weight"] = norm(d)
            w |= mixer(f"backbone.layers.{il}.mixer.", jamba=False)
        w["backbone.norm_f.weight"] = norm(d)
        w["lm_head.weight"] = emb  # tied, as MambaForCausalLM does
        return w
    ff, E = shape.n_ff, shape.n_expert
    w = {"model.embed_tokens.weight": emb}
    for il in range(L):
        p = f"model.layers.{il}."
        w[p + "input_layernorm.weight"] = norm(d)
        w[p + "pre_ff_layernorm.weight"] = norm(d)
        if il in shape.attn_layers:
            w |= hybrid_attention(p, shape, mat)
        else:
            w |= mixer(p + "mamba.", jamba=True)
        if il in shape.moe_layers:
            w[p + "feed_forward.router.weight"] = mat(E, d, 2.0)
            w[p + "feed_forward.experts.gate_up_proj"] = np.stack([mat(2 * ff, d) for _ in range(E)])
            w[p + "feed_forward.experts.down_proj"] = np.stack([mat(d, ff, 0.5) for _ in range(E)])
        else:
            w |= {p + "feed_forward.gate_proj.weight": mat(ff, d), p + "feed_forward.up_proj.weight": mat(ff, d),
                  p + "feed_forward.down_proj.weight": mat(d, ff, 0.5)}
    w["model.final_layernorm.weight"] = norm(d)
    w["lm_head.weight"] = mat(V, d)
    return w


_MIXER = {"in_proj.weight": "ssm_in.weight", "conv1d.weight": "ssm_conv1d.weight", "conv1d.bias": "ssm_conv1d.bias",
          "x_proj.weight": "ssm_x.weight", "dt_proj.weight": "ssm_dt.weight", "dt_proj.bias": "ssm_dt.bias",
          "A_log": "ssm_a", "D": "ssm_d", "out_proj.weight": "ssm_out.weight",
          "dt_layernorm.weight": "ssm_dt_norm.weight", "b_layernorm.weight": "ssm_b_norm.weight",
          "c_layernorm.weight": "ssm_c_norm.weight"}
_OTHER = {"input_layernorm.weight": "attn_norm.weight", "norm.weight": "attn_norm.weight",
          "pre_ff_layernorm.weight": "ffn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
          "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
          "self_attn.o_proj.weight": "attn_output.weight", "feed_forward.gate_proj.weight": "ffn_gate.weight",
          "feed_forward.up_proj.weight": "ffn_up.weight", "feed_forward.down_proj.weight": "ffn_down.weight",
          "feed_forward.router.weight": "ffn_gate_inp.weight", "feed_forward.experts.down_proj": "ffn_down_exps.weight"}


def hf_to_gguf_hybrid(shape: ModelShape, hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    emb = hf.get("backbone.embeddings.weight", hf.get("model.embed_tokens.weight"))
    for name, x in hf.items():
        if name in ("backbone.embeddings.weight", "model.embed_tokens.weight"):
            out["token_embd.weight"] = x
        elif name in ("backbone.norm_f.weight", "model.final_layernorm.weight"):
            out["output_norm.weight"] = x
        elif name == "lm_head.weight":
            if not np.array_equal(x, emb):  # tied: the converter omits it
                out["output.weight"] = x
        else:
            il = name.split(".")[2]
            rest = name.split(".", 3)[3]
            for prefix in ("mixer.", "mamba."):
                if rest.startswith(prefix):
                    key = rest.removeprefix(prefix)
                    if key == "A_log":
                        x = -np.exp(x)
                    elif key == "conv1d.weight":
                        x = x.squeeze(1)
                    out[f"blk.{il}.{_MIXER[key]}"] = x
                    break
            else:
                if rest == "feed_forward.experts.gate_up_proj":
                    ff = x.shape[1] // 2
                    out[f"blk.{il}.ffn_gate_exps.weight"] = np.ascontiguousarray(x[:, :ff])
                    out[f"blk.{il}.ffn_up_exps.weight"] = np.ascontiguousarray(x[:, ff:])
                else:
                    out[f"blk.{il}.{_OTHER[rest]}"] = x
    return out


def add_hybrid_metadata(w: GGUFWriter, shape: ModelShape) -> None:
    """MambaModel / JambaModel set_gguf_parameters: ssm.* keys, per-layer head_count_kv for Jamba."""
    w.add_ssm_conv_kernel(shape.ssm_d_conv)
    w.add_ssm_inner_size(2 * shape.n_embd)
    w.add_ssm_state_size(shape.ssm_d_state)
    w.add_ssm_time_step_rank(shape.dt_rank)
    if shape.arch == "mamba":
        w.add_feed_forward_length(0)
        w.add_head_count(0)  # "unused, but seemingly required" (llama.cpp)
        w.add_ssm_dt_b_c_rms(False)
        return
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv([shape.n_head_kv if il in shape.attn_layers else 0 for il in range(shape.n_layer)])
    w.add_expert_count(shape.n_expert)
    w.add_expert_used_count(shape.n_expert_used)
