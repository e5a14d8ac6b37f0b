"""HF transformers reference models built from the same HF-layout weights a preset is written from.

The preset writer converts these weights to GGUF with llama.cpp's rules (Q/K permutation,
rope_freqs); HF runs them untouched. Equal logits therefore check the conversion, the reader
and the engine together against an implementation nobody here wrote.
"""

from __future__ import annotations

import torch

from engine.gguf.writer import ModelShape, random_hf_weights


def _period_offset(layers: tuple[int, ...], n_layer: int) -> tuple[int, int]:
    """HF Jamba's (period, offset) that selects exactly these layers."""
    for period in range(1, n_layer + 1):
        for offset in range(period):
            if tuple(i for i in range(n_layer) if i % period == offset) == tuple(layers):
                return period, offset
    raise ValueError(f"layers {layers} are not periodic: HF Jamba cannot express them")


def hf_config(shape: ModelShape):
    from transformers import (
        JambaConfig,
        LlamaConfig,
        MambaConfig,
        MistralConfig,
        Qwen2Config,
    )

    if shape.arch == "mamba":
        return MambaConfig(vocab_size=shape.n_vocab, hidden_size=shape.n_embd, num_hidden_layers=shape.n_layer,
                           state_size=shape.ssm_d_state, conv_kernel=shape.ssm_d_conv, expand=2,
                           time_step_rank=shape.dt_rank, layer_norm_epsilon=shape.rms_eps, tie_word_embeddings=True,
                           use_conv_bias=True, use_bias=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if shape.arch == "jamba":
        ap, ao = _period_offset(shape.attn_layers, shape.n_layer)
        ep, eo = _period_offset(shape.moe_layers, shape.n_layer)
        return JambaConfig(vocab_size=shape.n_vocab, hidden_size=shape.n_embd, intermediate_size=shape.n_ff,
                           num_hidden_layers=shape.n_layer, num_attention_heads=shape.n_head,
                           num_key_value_heads=shape.n_head_kv, num_experts=shape.n_expert,
                           num_experts_per_tok=shape.n_expert_used, attn_layer_period=ap, attn_layer_offset=ao,
                           expert_layer_period=ep, expert_layer_offset=eo, mamba_d_state=shape.ssm_d_state,
                           mamba_d_conv=shape.ssm_d_conv, mamba_expand=2, mamba_dt_rank=shape.dt_rank,
                           rms_norm_eps=shape.rms_eps, tie_word_embeddings=False, max_position_embeddings=shape.n_ctx,
                           bos_token_id=None, eos_token_id=None, pad_token_id=None)

    if shape.arch == "rwkv7":  # not in transformers: the rwkv7-hf package's implementation (fla's layout)
        from rwkv7_hf import RWKV7Config

        rw, ra, rv, rg = shape.rwkv_lora
        return RWKV7Config(vocab_size=shape.n_vocab, hidden_size=shape.n_embd, num_hidden_layers=shape.n_layer,
                           head_dim=shape.wkv_head_size, intermediate_size=shape.n_ff, decay_low_rank_dim=rw,
                           a_low_rank_dim=ra, v_low_rank_dim=rv, gate_low_rank_dim=rg, norm_eps=shape.norm_eps,
                           tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if shape.arch == "granitehybrid":
        from transformers import GraniteMoeHybridConfig

        emb, res, att, logit = shape.granite_scales
        return GraniteMoeHybridConfig(
            vocab_size=shape.n_vocab, hidden_size=shape.n_embd, intermediate_size=shape.n_ff,
            shared_intermediate_size=shape.n_ff_shexp, num_hidden_layers=shape.n_layer,
            num_attention_heads=shape.n_head, num_key_value_heads=shape.n_head_kv,
            num_local_experts=shape.n_expert, num_experts_per_tok=shape.n_expert_used,
            layer_types=["attention" if il in shape.attn_layers else "mamba" for il in range(shape.n_layer)],
            mamba_n_heads=shape.ssm_n_head, mamba_d_head=2 * shape.n_embd // shape.ssm_n_head,
            mamba_n_groups=shape.ssm_n_group, mamba_d_state=shape.ssm_d_state, mamba_d_conv=shape.ssm_d_conv,
            mamba_expand=2, position_embedding_type="nope", embedding_multiplier=emb, residual_multiplier=res,
            attention_multiplier=att, logits_scaling=logit, rms_norm_eps=shape.rms_eps, tie_word_embeddings=False,
            max_position_embeddings=shape.n_ctx, bos_token_id=None, eos_token_id=None, pad_token_id=None)

    common = dict(
        vocab_size=shape.n_vocab, hidden_size=shape.n_embd, intermediate_size=shape.n_ff,
        num_hidden_layers=shape.n_layer, num_attention_heads=shape.n_head, num_key_value_heads=shape.n_head_kv,
        max_position_embeddings=shape.n_ctx, rms_norm_eps=shape.rms_eps, tie_word_embeddings=shape.tied,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    rope = {"rope_type": "default", "rope_theta": shape.rope_theta}
    if shape.llama3_rope is not None:
        f, lo, hi, orig = shape.llama3_rope
        rope = {"rope_type": "llama3", "rope_theta": shape.rope_theta, "factor": f, "low_freq_factor": lo,
                "high_freq_factor": hi, "original_max_position_embeddings": orig}
    elif shape.rope_linear_factor is not None:
        rope = {"rope_type": "linear", "rope_theta": shape.rope_theta, "factor": shape.rope_linear_factor}
    if shape.arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False, rope_parameters=rope)
    if shape.n_swa:
        return MistralConfig(**common, sliding_window=shape.n_swa, rope_parameters=rope)
    return LlamaConfig(**common, attention_bias=shape.attn_bias, rope_parameters=rope)


def hf_model(shape: ModelShape, seed: int, attn: str = "eager"):
    from transformers import AutoModelForCausalLM

    if shape.arch == "rwkv7":
        from rwkv7_hf import RWKV7ForCausalLM

        model = RWKV7ForCausalLM(hf_config(shape)).float()
    else:
        model = AutoModelForCausalLM.from_config(hf_config(shape), dtype=torch.float32, attn_implementation=attn)
    sd = {k: torch.from_numpy(v) for k, v in random_hf_weights(shape, seed).items()}
    if shape.tied:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True)
    return model.eval()


@torch.inference_mode()
def hf_logits(model, tokens: list[int]) -> torch.Tensor:
    return model(torch.tensor([tokens])).logits[0].float()


@torch.inference_mode()
def hf_greedy(model, tokens: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([tokens]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0, attention_mask=torch.ones(1, len(tokens), dtype=torch.long))
    return out[0, len(tokens):].tolist()


_HF_NAMES = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
             "feed_forward.w2": "mlp.down_proj"}


def _unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of convert_hf_to_gguf's permute: interleaved pairs per head -> HF rotate-half rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_from_gguf(path, attn: str = "sdpa"):
    """HF LlamaForCausalLM on a llama GGUF's weights, dequantized to float32 by gguf.quants (the same
    values kvbench's exact mode computes with): the real-model reference for speed and logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.gguf.reader import open_gguf

    f = open_gguf(path)
    c = f.config()
    assert c.arch == "llama" and c.rope_type == "norm" and c.rope_freq_scale == 1.0, "llama-family files only"
    conf = LlamaConfig(vocab_size=c.n_vocab, hidden_size=c.n_embd, intermediate_size=c.n_ff,
                       num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_head_kv,
                       head_dim=c.n_embd_head_k, max_position_embeddings=c.n_ctx_train, rms_norm_eps=c.rms_eps,
                       tie_word_embeddings=c.tied_output, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                       rope_parameters={"rope_type": "default", "rope_theta": c.rope_freq_base})
    sd = {}
    for name, w in f.load_weights(c).items():
        if name == "tok_embeddings.weight":
            sd["model.embed_tokens.weight"] = w
        elif name == "norm.weight":
            sd["model.norm.weight"] = w
        elif name == "output.weight":
            sd["lm_head.weight"] = w
        else:
            _, il, rest = name.split(".", 2)
            mod = rest.rsplit(".", 1)[0]
            if mod == "attention.wq":
                w = _unpermute_qk(w, c.n_head)
            elif mod == "attention.wk":
                w = _unpermute_qk(w, c.n_head_kv)
            sd[f"model.layers.{il}.{_HF_NAMES[mod]}.weight"] = w
    if c.tied_output:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model = LlamaForCausalLM._from_config(conf, dtype=torch.float32, attn_implementation=attn)
    model.load_state_dict(sd, strict=True)
    return model.eval()
