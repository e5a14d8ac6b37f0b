"""The shape of a model to write: hyper-parameters in HF terms (the writers' input)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """Hyper-parameters of a model to write, in HF terms where HF has a name for them."""

    arch: str  # a key of engine.gguf.writer.WRITERS
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
    # granitehybrid (Mamba-2 + attention, shared expert); see engine/gguf/writer_granite.py
    ssm_n_group: int = 1
    ssm_n_head: int = 0  # Mamba-2 heads (mamba_n_heads)
    n_ff_shexp: int = 0  # the shared expert's width (shared_intermediate_size)
    # Granite's (embedding, residual, attention, logits) multipliers
    granite_scales: tuple[float, float, float, float] = (1.0, 1.0, 0.0, 1.0)
    # rwkv7; see engine/gguf/writer_rwkv7.py
    wkv_head_size: int = 64
    rwkv_lora: tuple[int, int, int, int] = (32, 32, 16, 32)  # decay, iclr (a), value mix, gate widths
    norm_eps: float = 1e-5  # LayerNorm eps (RWKV's norms are LayerNorms)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head if self.n_head else 0

    @property
    def dt_rank(self) -> int:
        return self.ssm_dt_rank or -(-self.n_embd // 16)
