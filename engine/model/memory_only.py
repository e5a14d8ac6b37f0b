"""A model with real shapes and no arithmetic, for memory-only runs (e.g. the LLaMA-7B shape).

Parameters live on the meta device: their shapes and byte counts are exact, they hold no data.
The forward pass stores a (meta) K and V row per token for every attention layer, and a (meta)
conv and SSM state per sequence for every recurrent layer, through the memory context, so the
memory's real bookkeeping runs (find_slot, blocks, naive growth, state cells, preemption, byte
accounting), and returns zero logits: the tokens generated mean nothing, the memory they occupy
is exact. Timings of such a run are not measurements of anything and are not reported.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import SSM, ModelConfig
from engine.model.families import model_class
from engine.model.layers import Rope


class MemoryOnlyModel(nn.Module):
    memory_only = True

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        self.config = cfg
        net_cls = model_class(cfg)
        with torch.device("meta"):
            self.net = net_cls(cfg).to(dtype)
        self.rope = Rope(cfg).to("meta")

    def forward(self, token: torch.Tensor, pos: torch.Tensor, mctx, out_rows: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        T = token.shape[0]
        k = torch.empty(T, c.n_head_kv, c.n_embd_head_k, device="meta")
        v = torch.empty(T, c.n_head_kv, c.n_embd_head_v, device="meta")
        S = max(mctx.ubatch.n_seqs, 1) if c.ssm_layers else 1  # recurrent memories split ubatches per sequence
        for il in range(c.n_layer):
            if c.layer_kinds[il] == SSM:  # the state after this ubatch, one per sequence
                mctx.rs_set(il, torch.empty(S, *c.r_shape, device="meta"), torch.empty(S, *c.s_shape, device="meta"))
            else:
                mctx.store(il, k, v)
        n_out = T if out_rows is None else int(out_rows.shape[0])
        return torch.zeros(n_out, c.n_vocab)
