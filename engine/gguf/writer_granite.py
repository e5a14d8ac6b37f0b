"""Granite 4 hybrid checkpoints (GraniteMoeHybridForCausalLM): random HF-layout weights and their
conversion to llama.cpp's ``granitehybrid`` GGUF.

Conversion follows convert_hf_to_gguf.py's GraniteHybridModel (vendored llama.cpp 0c1e57098,
conversion/granite.py and mamba.py): in_proj kept whole (rows z | xBC | dt), the conv weight
squeezed, ``dt_bias`` -> ``ssm_dt.bias``, ``ssm_a = -exp(A_log)`` and ``ssm_d`` as (n_head, 1),
the gated norm's weight as (n_group, d_inner / n_group), q/k rows permuted as for llama's rope
(the converter does it even though Granite 4 hybrids apply no rope: the K cache then holds a
permutation of HF's K, scores are unchanged), routed gate/up split from the fused
``gate_up_proj`` (gate first), the shared MLP's ``input_linear`` split the same way, the layer kinds
as a per-layer ``head_count_kv`` array (0 = Mamba-2 layer) and ``rope.scaling.finetuned = false``.

Random weights: A = -(1..n_head) (HF's init), dt_bias the inverse softplus of dt in [1e-3, 1e-1],
matrices N(0, 1/fan_in), norms U(0.8, 1.2); the embedding is small because Granite multiplies it.
"""

from __future__ import annotations

import numpy as np
from gguf import GGUFWriter

from engine.gguf.shapes import ModelShape
from engine.gguf.writer_attention import permute_qk
from engine.gguf.writer_hybrid import hybrid_attention


def random_hf_weights_granite(shape: ModelShape, seed: int) -> dict[str, np.ndarray]:
    """Named as GraniteMoeHybridForCausalLM's state_dict (transformers 5.x)."""
    rng = np.random.default_rng(seed)
    d, V, L = shape.n_embd, shape.n_vocab, shape.n_layer
    di, ds, dc, ng, nh = 2 * d, shape.ssm_d_state, shape.ssm_d_conv, shape.ssm_n_group, shape.ssm_n_head
    conv_dim = di + 2 * ng * ds
    ff, E, sh = shape.n_ff, shape.n_expert, shape.n_ff_shexp

    def mat(out: int, inp: int, scale: float = 1.0) -> np.ndarray:
        return rng.standard_normal((out, inp), dtype=np.float32) * np.float32(scale / np.sqrt(inp))

    def norm(n: int) -> np.ndarray:
        return rng.uniform(0.8, 1.2, n).astype(np.float32)

    w = {"model.embed_tokens.weight": (0.1 * rng.standard_normal((V, d))).astype(np.float32)}
    for il in range(L):
        p = f"model.layers.{il}."
        w[p + "input_layernorm.weight"] = norm(d)
        w[p + "post_attention_layernorm.weight"] = norm(d)
        if il in shape.attn_layers:
            w |= hybrid_attention(p, shape, mat)
        else:
            m = p + "mamba."
            dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), nh)).astype(np.float32)
            w |= {
                m + "in_proj.weight": mat(di + conv_dim + nh, d),
                m + "conv1d.weight": rng.standard_normal((conv_dim, 1, dc), dtype=np.float32) / np.float32(np.sqrt(dc)),
                m + "conv1d.bias": (0.1 * rng.standard_normal(conv_dim)).astype(np.float32),
                m + "dt_bias": (dt + np.log(-np.expm1(-dt))).astype(np.float32),  # softplus^-1(dt)
                m + "A_log": np.log(np.arange(1, nh + 1, dtype=np.float32)),
                m + "D": (1.0 + 0.1 * rng.standard_normal(nh)).astype(np.float32),
                m + "norm.weight": norm(di),
                m + "out_proj.weight": mat(d, di, 0.5),
            }
        if E:
            w[p + "block_sparse_moe.router.weight"] = mat(E, d, 2.0)
            w[p + "block_sparse_moe.experts.gate_up_proj"] = np.stack([mat(2 * ff, d) for _ in range(E)])
            w[p + "block_sparse_moe.experts.down_proj"] = np.stack([mat(d, ff, 0.5) for _ in range(E)])
        w[p + "shared_mlp.input_linear.weight"] = mat(2 * sh, d)
        w[p + "shared_mlp.output_linear.weight"] = mat(d, sh, 0.5)
    w["model.norm.weight"] = norm(d)
    w["lm_head.weight"] = mat(V, d)
    return w


_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
          "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
          "mamba.in_proj.weight": "ssm_in.weight", "mamba.conv1d.bias": "ssm_conv1d.bias",
          "mamba.dt_bias": "ssm_dt.bias", "mamba.D": "ssm_d", "mamba.out_proj.weight": "ssm_out.weight",
          "block_sparse_moe.router.weight": "ffn_gate_inp.weight",
          "block_sparse_moe.experts.down_proj": "ffn_down_exps.weight"}


def _halves(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fused gate/up rows (the second-to-last axis) -> gate (first half), up (second half)."""
    n = x.shape[-2] // 2
    return np.ascontiguousarray(x[..., :n, :]), np.ascontiguousarray(x[..., n:, :])


def hf_to_gguf_granite(shape: ModelShape, hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"],
           "output.weight": hf["lm_head.weight"]}
    di, ng = 2 * shape.n_embd, shape.ssm_n_group
    shexp = "_shexp" if shape.n_expert else ""  # without routed experts the shared MLP is the dense FFN
    for name, x in hf.items():
        if not name.startswith("model.layers."):
            continue
        _, _, il, rest = name.split(".", 3)
        b = f"blk.{il}."
        if rest == "self_attn.q_proj.weight":
            out[b + "attn_q.weight"] = permute_qk(x, shape.n_head)
        elif rest == "self_attn.k_proj.weight":
            out[b + "attn_k.weight"] = permute_qk(x, shape.n_head_kv)
        elif rest == "mamba.conv1d.weight":
            out[b + "ssm_conv1d.weight"] = x.squeeze(1)
        elif rest == "mamba.A_log":
            out[b + "ssm_a"] = -np.exp(x).reshape(-1, 1)
        elif rest == "mamba.D":
            out[b + "ssm_d"] = x.reshape(-1, 1)
        elif rest == "mamba.norm.weight":
            out[b + "ssm_norm.weight"] = x.reshape(ng, di // ng)
        elif rest == "block_sparse_moe.experts.gate_up_proj":
            out[b + "ffn_gate_exps.weight"], out[b + "ffn_up_exps.weight"] = _halves(x)
        elif rest == "shared_mlp.input_linear.weight":
            out[b + f"ffn_gate{shexp}.weight"], out[b + f"ffn_up{shexp}.weight"] = _halves(x)
        elif rest == "shared_mlp.output_linear.weight":
            out[b + f"ffn_down{shexp}.weight"] = x
        else:
            out[b + _NAMES[rest]] = x
    return out


def add_granite_metadata(w: GGUFWriter, shape: ModelShape) -> None:
    """GraniteHybridModel.set_gguf_parameters: Mamba-2's ssm.* keys (time_step_rank = heads), per-layer
    head_count_kv, Granite's scales (written when nonzero, as the converter does; llama.cpp reads a missing
    one as 0 = not applied), the shared expert's width, and no rope."""
    emb, res, att, logit = shape.granite_scales
    w.add_ssm_conv_kernel(shape.ssm_d_conv)
    w.add_ssm_inner_size(2 * shape.n_embd)
    w.add_ssm_state_size(shape.ssm_d_state)
    w.add_ssm_time_step_rank(shape.ssm_n_head)
    w.add_ssm_group_count(shape.ssm_n_group)
    # the converter sizes the dense FFN with intermediate_size, so a dense file has n_ff == the shared width
    w.add_feed_forward_length(shape.n_ff if shape.n_expert else shape.n_ff_shexp)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv([shape.n_head_kv if il in shape.attn_layers else 0 for il in range(shape.n_layer)])
    w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_rope_scaling_finetuned(False)
    w.add_expert_count(shape.n_expert)
    w.add_expert_used_count(shape.n_expert_used)
    if shape.n_expert:
        w.add_expert_shared_feed_forward_length(shape.n_ff_shexp)
    for value, add in ((att, w.add_attention_scale), (emb, w.add_embedding_scale), (res, w.add_residual_scale),
                       (logit, w.add_logit_scale)):
        if value:
            add(value)
