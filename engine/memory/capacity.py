"""Capacity planning: how many sequences of a given context fit in a memory budget, per allocator, and the
longest context a given number of sequences can have, from a model's shapes alone (no weights read).

The budget is the whole process: the weights as they are loaded, the runtime (the Python and torch process
before any model: measured by the caller, see ``harness.cli``; and one ubatch's transient buffers, as
``engine.memory.plan`` estimates them), and the sequences' memory. What one sequence costs depends on the
allocator, at the same context C:

- pooled (llama.cpp): one cell per token, the pool sized to exactly N x C cells (``-c``);
- paged (vLLM): whole blocks, ceil(C / block_size) of them: the tail of the last block is waste;
- naive: per-sequence tensors; ``growth=cat`` holds exactly C rows (and, while it grows, one layer twice),
  ``growth=double`` the capacity its doubling reached, up to 2x;
- a sliding window needs only the window plus the ubatch being written (when every attention layer is
  windowed; one full-attention layer and the cells must hold the whole context);
- a recurrent state is the same bytes at any context, one per sequence (pooled and naive alike).

Every allocator gets the same number when the context is a whole number of blocks and doubling lands on it;
the differences are the allocators' own overheads, which is the point of asking per allocator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.config import ModelConfig
from engine.memory.codecs import get_codec
from engine.memory.kv_cache import CacheSpec
from engine.memory.plan import plan

ALLOCATOR_ORDER = ("pooled", "paged", "naive")
CONTEXT_LIMIT = 1 << 24  # max_context's answer when any context fits (nothing grows with it)


@dataclass(frozen=True)
class Budget:
    memory: int  # bytes in all
    weights: int  # the weights as loaded
    runtime_floor: int  # the process before any model (Python, torch, kvbench)


@dataclass
class Fit:
    allocator: str
    max_sequences: int
    cells_per_sequence: int  # tokens of KV one sequence holds at this context (after window, blocks, growth)
    kv_bytes_per_sequence: int
    state_bytes_per_sequence: int
    cache_size: int  # the cache.size (cells) the run needs for max_sequences
    activations: int  # one ubatch's transient buffers at max_sequences
    total: int  # weights + runtime + sequences at max_sequences
    notes: list[str] = field(default_factory=list)


def kv_row_bytes(cfg: ModelConfig, type_k: str, type_v: str) -> int:
    """Bytes one token occupies in the KV cache over the attention layers (the codecs' block layout)."""
    if not cfg.attn_layers:
        return 0
    ck, cv = get_codec(type_k), get_codec(type_v)
    return len(cfg.attn_layers) * (ck.row_bytes(cfg.n_embd_k_gqa) + cv.row_bytes(cfg.n_embd_v_gqa))


def _windowed(cfg: ModelConfig) -> bool:
    """Every attention layer is a sliding window: the cells need only the window (and the ubatch)."""
    return bool(cfg.attn_layers) and cfg.n_swa > 0 and all(cfg.swa_layers[il] for il in cfg.attn_layers)


def cells_per_sequence(cfg: ModelConfig, allocator: str, context: int, block_size: int = 16,
                       growth: str = "cat", n_ubatch: int = 512) -> int:
    """KV tokens one sequence holds at ``context``: the window and ubatch cap, whole blocks for paged, the
    doubling capacity for naive growth=double (simulated with the context arriving in ubatches, as a prompt
    is fed)."""
    if not cfg.attn_layers:
        return 0
    need = min(context, cfg.n_swa + n_ubatch) if _windowed(cfg) else context
    if allocator == "paged":
        return -(-need // block_size) * block_size
    if allocator == "naive" and growth == "double":
        cap, held = 0, 0
        while held < need:
            held += min(n_ubatch, need - held)
            if held > cap:
                cap = max(2 * cap, held, 16)
        return cap
    return need


def _total(cfg: ModelConfig, allocator: str, n: int, cells: int, row: int, b: Budget, spec: CacheSpec,
           n_ubatch: int, compute_bytes: int) -> tuple[int, int, int]:
    """(total bytes, cache.size cells, activations) with n sequences of ``cells`` KV tokens each."""
    size = max(n * cells, 1)
    state = n * cfg.recurrent_bytes_per_seq
    kv = n * cells * row
    if allocator == "naive" and cfg.attn_layers and n and spec.growth == "cat":
        kv += cells * row // len(cfg.attn_layers)  # cat: the growing layer's old and new tensors for an instant
    s = CacheSpec(allocator=allocator, size=size, block_size=spec.block_size, type_k=spec.type_k,
                  type_v=spec.type_v, n_seq_max=max(n, 1), growth=spec.growth)
    act = plan(cfg, s, n_ubatch, compute_bytes=compute_bytes).activations
    return b.weights + b.runtime_floor + kv + state + act, size, act


def fit(cfg: ModelConfig, allocator: str, context: int, budget: Budget, spec: CacheSpec, n_ubatch: int = 512,
        compute_bytes: int = 4, n_max: int = 1 << 20) -> Fit:
    """The most sequences of ``context`` tokens that fit the budget on ``allocator``."""
    cells = cells_per_sequence(cfg, allocator, context, spec.block_size, spec.growth, n_ubatch)
    row = kv_row_bytes(cfg, spec.type_k, spec.type_v)
    lo, hi = 0, 1
    while hi < n_max and _total(cfg, allocator, hi, cells, row, budget, spec, n_ubatch, compute_bytes)[0] <= budget.memory:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # totals grow with n: the largest n within the budget
        mid = (lo + hi) // 2
        if _total(cfg, allocator, mid, cells, row, budget, spec, n_ubatch, compute_bytes)[0] <= budget.memory:
            lo = mid
        else:
            hi = mid
    total, size, act = _total(cfg, allocator, lo, cells, row, budget, spec, n_ubatch, compute_bytes)
    notes = []
    if _windowed(cfg) and context > cfg.n_swa + n_ubatch:
        notes.append(f"sliding window {cfg.n_swa}: {cells} cells per sequence (window + ubatch), not {context}")
    if allocator == "paged" and cells != context:
        notes.append(f"whole blocks of {spec.block_size}: {cells - min(context, cells)} cells of tail waste")
    if allocator == "naive" and spec.growth == "double" and cells > context:
        notes.append(f"growth=double: capacity {cells} for {context} tokens")
    if context > cfg.n_ctx_train:
        notes.append(f"context {context} is beyond the model's trained context {cfg.n_ctx_train}")
    return Fit(allocator, lo, cells, cells * row, cfg.recurrent_bytes_per_seq, size, act, total, notes)


def max_context(cfg: ModelConfig, allocator: str, n_seqs: int, budget: Budget, spec: CacheSpec,
                n_ubatch: int = 512, compute_bytes: int = 4, limit: int = CONTEXT_LIMIT) -> int:
    """The longest context (tokens) for which ``n_seqs`` sequences fit; 0 when not even one token does.
    A model without growing memory (recurrent only, or a sliding window) fits any context once it fits one:
    the answer is then ``limit``."""
    def fits(c: int) -> bool:
        return fit(cfg, allocator, c, budget, spec, n_ubatch, compute_bytes, n_max=n_seqs + 1).max_sequences >= n_seqs

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi < limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi >= limit and fits(limit):
        return limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def parse_bytes(text: str, what: str = "--memory") -> int:
    """'24GiB', '24GB', '512MiB', '1.5TiB', '1000000': bytes. ValueError with the accepted forms."""
    units = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20, "g": 1e9,
             "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = math.nan
    if unit not in units or not value > 0 or math.isinf(value):
        raise ValueError(f"{what} {text!r}: expected a size such as 24GiB, 24GB, 512MiB or a number of bytes")
    return int(value * units[unit])
