"""Recurrent and hybrid language models: Mamba-1 (every layer a mixer), Jamba (each layer a
Mamba-1 mixer or rope-less attention, then a dense or mixture-of-experts feed-forward) and Granite 4
hybrids (the same with Mamba-2 mixers, a shared expert beside the routed ones, and Granite's
residual multiplier on both branches).

Same interface as ``engine.model.llama.Transformer``: token ids, positions and a memory context
in, logits out. Attention layers use the memory's KV part, mixer layers its recurrent part.
"""

from __future__ import annotations

from torch import nn

from engine.config import MAMBA2, SSM, ModelConfig
from engine.model.layers import FeedForward, RMSNorm
from engine.model.llama import Attention, Transformer
from engine.model.mamba import MambaMixer, MoEFeedForward
from engine.model.mamba2 import Mamba2Mixer


class HybridBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, il: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        self.recurrent = cfg.layer_kinds[il] == SSM
        if self.recurrent and cfg.ssm_kind == MAMBA2:
            self.mixer = Mamba2Mixer(cfg, il)
        elif self.recurrent:
            self.mixer = MambaMixer(cfg, il, bc_norms=cfg.arch == "jamba")
        else:
            self.attention = Attention(cfg, il)
        self.has_ffn = cfg.arch != "mamba"  # Mamba-1 blocks have no feed-forward
        if self.has_ffn:
            self.ffn_norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
            self.feed_forward = MoEFeedForward(cfg) if cfg.moe_layers[il] else FeedForward(cfg)
        self.residual_scale = cfg.residual_scale or None  # Granite: each branch scaled before it is added

    def forward(self, x, rope, cs, mctx):
        h = self.attention_norm(x)
        h = self.mixer(h, mctx) if self.recurrent else self.attention(h, rope, cs, mctx)
        x = x + (h if self.residual_scale is None else h * self.residual_scale)
        if self.has_ffn:
            f = self.feed_forward(self.ffn_norm(x))
            x = x + (f if self.residual_scale is None else f * self.residual_scale)
        return x


class HybridLM(Transformer):
    """The Transformer's embedding, head and weight loading over hybrid blocks; Jamba's and Granite
    4's attention has no rope (ROPE_NONE makes Rope the identity)."""

    block = HybridBlock
