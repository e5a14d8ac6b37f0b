"""Recurrent and hybrid language models: Mamba-1 (every layer a mixer) and Jamba (each layer a
Mamba-1 mixer or rope-less attention, then a dense or mixture-of-experts feed-forward).

Same interface as ``engine.model.llama.Transformer``: token ids, positions and a memory context
in, logits out. Attention layers use the memory's KV part, mixer layers its recurrent part.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.config import SSM, ModelConfig
from engine.model.layers import FeedForward, Linear, RMSNorm, Rope, linear
from engine.model.llama import Attention
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


class HybridLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.n_vocab, cfg.n_embd)
        self.layers = nn.ModuleList(HybridBlock(cfg, il) for il in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        self.output = None if cfg.tied_output else Linear(cfg.n_embd, cfg.n_vocab)
        self.rope = Rope(cfg)  # n_rot = 0: identity (Jamba's attention has no rope)

    def forward(self, token: torch.Tensor, pos: torch.Tensor, mctx, out_rows: torch.Tensor | None = None) -> torch.Tensor:
        x = self.tok_embeddings(token)
        cs = self.rope.angles(pos, x.dtype)
        for layer in self.layers:
            x = layer(x, self.rope, cs, mctx)
        if out_rows is not None:
            x = x[out_rows]
        w = self.tok_embeddings.weight if self.output is None else self.output.weight
        return linear(self.norm(x), w).float()

    @classmethod
    def from_weights(cls, cfg: ModelConfig, weights: dict[str, torch.Tensor], device="cpu") -> HybridLM:
        with torch.device("meta"):
            model = cls(cfg)
        sd = dict(weights)
        for il in cfg.attn_layers:
            a = f"layers.{il}.attention."
            sd[a + "wqkv.weight"] = torch.cat([sd.pop(a + n + ".weight") for n in ("wq", "wk", "wv")])
        model.load_state_dict(sd, strict=True, assign=True)
        model.rope = Rope(cfg)
        for p in model.parameters():
            p.requires_grad_(False)
        return model.to(device).eval()
