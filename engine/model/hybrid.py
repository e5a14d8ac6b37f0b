"""Recurrent and hybrid language models: Mamba-1 (every layer a mixer) and Jamba (each layer a
Mamba-1 mixer or rope-less attention, then a dense or mixture-of-experts feed-forward).

Same interface as ``engine.model.llama.Transformer``: token ids, positions and a memory context
in, logits out. Attention layers use the memory's KV part, mixer layers its recurrent part.
"""

from __future__ import annotations

from torch import nn

from engine.config import SSM, ModelConfig
from engine.model.layers import FeedForward, RMSNorm
from engine.model.llama import Attention, Transformer
from engine.model.mamba import MambaMixer, MoEFeedForward


class HybridBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, il: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        self.recurrent = cfg.layer_kinds[il] == SSM
        if self.recurrent:
            self.mixer = MambaMixer(cfg, il, bc_norms=cfg.arch == "jamba")
        else:
            self.attention = Attention(cfg, il)
        self.has_ffn = cfg.arch != "mamba"  # Mamba-1 blocks have no feed-forward
        if self.has_ffn:
            self.ffn_norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
            self.feed_forward = MoEFeedForward(cfg) if cfg.moe_layers[il] else FeedForward(cfg)

    def forward(self, x, rope, cs, mctx):
        h = self.attention_norm(x)
        h = self.mixer(h, mctx) if self.recurrent else self.attention(h, rope, cs, mctx)
        x = x + h
        if self.has_ffn:
            x = x + self.feed_forward(self.ffn_norm(x))
        return x


class HybridLM(Transformer):
    """The Transformer's embedding, head and weight loading over hybrid blocks; Jamba's attention
    has no rope (n_rot = 0 makes Rope the identity)."""

    block = HybridBlock
