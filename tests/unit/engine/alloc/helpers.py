"""Placing tokens in a memory without a model: what Engine.decode does around the forward pass."""

from __future__ import annotations

import torch

from engine.batch import Batch
from engine.config import ModelConfig
from engine.memory.base import MemoryStatus

# rows of 32 values (one q8_0/q4_0 block), two layers
CFG = ModelConfig(arch="llama", n_vocab=10, n_embd=64, n_layer=2, n_head=2, n_head_kv=1, n_ff=8)


def batch(*runs) -> Batch:
    """runs of (seq_id, p0, n): tokens at positions [p0, p0 + n) of seq_id."""
    b = Batch()
    for s, p0, n in runs:
        b.add_sequence([0] * n, s, pos0=p0)
    return b


def place(mem, b: Batch, n_ubatch: int = 512, value=None) -> bool:
    """Commit b; K and V rows of a token are filled with its position (or ``value``). False if full."""
    ctx = mem.init_batch(b, n_ubatch)
    if ctx.status is not MemoryStatus.SUCCESS:
        return False
    while True:
        ctx.apply()
        ub = ctx.ubatch
        fill = ub.pos.to(torch.float32) if value is None else torch.full((ub.n_tokens,), float(value))
        k = fill[:, None, None].expand(ub.n_tokens, mem.cfg.n_head_kv, mem.cfg.n_embd_head_k).contiguous()
        v = -k
        for il in range(mem.cfg.n_layer):
            ctx.store(il, k, v)
        if not ctx.next():
            return True
