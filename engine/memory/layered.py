"""What every memory over a model's layers shares, KV caches and recurrent state alike.

A memory holds some of the model's layers (all of them, or a hybrid's attention or Mamba layers): the
model's layer index maps to a storage slot, each slot lives on a tier (device, host, disk), and every
tensor a tier creates is counted. A batch is split into ubatches the way the memory needs (any split
for a KV cache, equal sequences for a recurrent one), planned as a dry run, and committed one ubatch
at a time through a context. Sequence ids are checked against ``n_seq_max``. Subclasses provide the
placement (``_prepare``, ``_apply``) and what the model reads and writes through the context.
"""

from __future__ import annotations

import torch

from engine.batch import Batch, UBatch
from engine.config import ModelConfig
from engine.errors import ConfigError
from engine.memory.base import BatchContext, MemoryStatus
from engine.memory.state import StateFiles
from engine.memory.tiers import make_tier, tier_of_layer


class LayeredMemory(StateFiles):
    kind = "base"
    shares_partial_prefix = True
    context = BatchContext  # the per-batch view subclasses hand to the model

    def __init__(self, cfg: ModelConfig, spec, device: torch.device | str = "cpu",
                 layers: list[int] | None = None) -> None:
        if spec.n_seq_max <= 0:
            raise ConfigError(f"parallel / n_seq_max {spec.n_seq_max}: must be positive")
        self.cfg, self.spec = cfg, spec
        self.device = torch.device(device)
        self.n_seq_max = spec.n_seq_max
        # Storage is indexed by slot; the model's layer index is mapped at store / attention / state time.
        self.layers = list(range(cfg.n_layer)) if layers is None else list(layers)
        self.slot = {il: i for i, il in enumerate(self.layers)}
        self.n_layers = len(self.layers)
        self.layer_tier = [tier_of_layer(il, spec.offload, spec.offload_layers) for il in self.layers]
        # A memory-only run (meta device) models every tier without allocating any of them.
        self.tiers = {name: make_tier(name if self.device.type != "meta" else "device", self.device)
                      for name in dict.fromkeys(self.layer_tier)}
        self.alloc_calls_last_step = 0
        self.n_kv_last = 0  # rows attention read in the last applied ubatch

    def tier(self, i: int):
        return self.tiers[self.layer_tier[i]]

    @property
    def alloc_calls(self) -> int:
        return sum(t.n_allocs for t in self.tiers.values())

    def check_seq_ids(self, seq_ids) -> None:
        bad = [s for s in seq_ids if not 0 <= s < self.n_seq_max]
        if bad:
            raise ConfigError(f"sequence id {bad[0]} is outside [0, {self.n_seq_max}); raise parallel / n_seq_max")

    # -- the batch protocol --------------------------------------------------------------------
    def init_batch(self, batch: Batch, n_ubatch: int):
        self.check_seq_ids(set(batch.seq_id))
        return self.init_ubatches(self.split(batch, n_ubatch))

    def split(self, batch: Batch, n_ubatch: int) -> list[UBatch]:
        """How this memory wants a batch cut into ubatches (llama.cpp's split_simple by default)."""
        return batch.split(n_ubatch, self.device)

    def init_ubatches(self, ubs: list[UBatch]):
        """Dry-run placement of already split ubatches (a hybrid memory splits once for both of its parts)."""
        self.update()
        plans = self._prepare(ubs)
        if plans is None:
            return self.context(self, [], [], MemoryStatus.FAILED_PREPARE)
        return self.context(self, ubs, plans, MemoryStatus.SUCCESS)

    def update(self) -> None:
        """Pending work before a batch (K-shift in cell caches)."""

    def _prepare(self, ubs: list[UBatch]) -> list | None:
        """Plan every ubatch without changing anything; None when one does not fit."""
        raise NotImplementedError

    def _apply(self, plan, ub: UBatch):
        """Commit one planned ubatch; return the view its context hands to the model."""
        raise NotImplementedError

    def can_admit(self, n_tokens: int) -> bool:
        """Room now for a new sequence of n_tokens tokens (the scheduler's admission check)."""
        return self.stats().free_cells >= n_tokens

    def reset_peak(self) -> None:
        """Start a new window for ``stats().reserved_peak_bytes`` (a run's trackers call this)."""

    def close(self) -> None:
        for t in self.tiers.values():
            t.close()
