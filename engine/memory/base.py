"""The Memory protocol: what the engine asks of KV caches and recurrent state (llama_memory_i).

Contract, as in llama.cpp:
- Position ranges are half-open ``[p0, p1)``; a negative p0 means 0, a negative p1 means +inf.
- ``init_batch`` splits a batch into ubatches and reserves room for all of them as a dry run.
  It either returns a context with status SUCCESS, or FAILED_PREPARE with the memory unchanged.
  Each ubatch is committed by ``ctx.apply()`` just before its forward pass.
- ``seq_rm`` returns False when the memory cannot remove that range (recurrent memory refuses
  partial removals); nothing is changed then.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import BinaryIO, NamedTuple, Protocol, runtime_checkable

import torch

from engine.batch import Batch, UBatch


@dataclass
class AttnInput:
    """What a memory context gives one attention call.

    rows: which query rows of the ubatch this group answers (None = all of them).
    k, v: (n_kv, n_head_kv, head_dim) in the compute dtype, or a float cache's storage dtype (f16, bf16)
          as stored: attention converts (torch's kernels) or widens in registers (engine.kernels).
    mask: (n_rows, n_kv) bool, True = may attend; None = plain causal over k/v (rows are the
          last n_rows positions of k/v), the layout a per-sequence cache produces.
    """

    rows: torch.Tensor | slice | None
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None


class KVStorage(NamedTuple):
    """One layer's float K/V storage as it is, with where a ubatch's rows go and which rows attention reads.

    A memory context hands this out (``kv_storage``) where its rows are plain float rows (f32, f16, bf16) on the
    compute device, so that a decode step can store and attend in one native op (engine.kernels.kv_attend):
    the Python of store + attn_inputs cost ~25 us a layer, more than the attention at short contexts. The memory
    still decides every place (slots, cells, mask); the op only executes it. Contexts whose rows need work to
    read (quantized, rotated, offloaded, per-sequence tensors) hand out None and keep store / attn_inputs.
    """

    k: torch.Tensor  # (size, n_embd_k_gqa) storage
    v: torch.Tensor  # (size, n_embd_v_gqa)
    slots: torch.Tensor | None  # (T,) int64 rows the ubatch's tokens go to, in token order; None: [slot0, slot0 + T)
    slot0: int
    cells: torch.Tensor | None  # (n,) int64 rows attention reads, in mask column order; None: [0, n_kv)
    n_kv: int
    mask: torch.Tensor | None  # (T, n) bool, True = may attend (AttnInput.mask)


class KVStack(NamedTuple):
    """Every layer's float K/V storage (layers [0, n)) at one ubatch's places, the same for all of them: what the
    model's one-op forward takes (engine.kernels.decode_stack). Fields after ``v`` as in KVStorage."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    slots: torch.Tensor | None
    slot0: int
    cells: torch.Tensor | None
    n_kv: int
    mask: torch.Tensor | None


class Rotary(Protocol):
    """What a KV memory needs of the model's rotary embedding to shift cached keys (seq_add):
    angles for integer positions, and a rotation by them (engine/model/layers.Rope is one)."""

    def angles(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]: ...
    def apply(self, x: torch.Tensor, cs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor: ...


class MemoryStatus(enum.Enum):
    SUCCESS = "success"
    FAILED_PREPARE = "failed_prepare"  # no room: nothing was changed


@dataclass
class MemoryStats:
    """A snapshot of memory state; every field is read from live bookkeeping, never estimated."""

    reserved_bytes: int  # bytes the store holds from its allocator (all tiers)
    live_bytes: int  # bytes of the tokens currently held (unique rows x bytes per token)
    n_cells: int  # capacity in tokens (pooled: cells; paged: blocks x block_size; naive: the cap)
    used_cells: int  # tokens held (a cell shared by several sequences counts once)
    seq_tokens: int  # tokens held summed over sequences (a shared cell counts once per owner)
    n_kv: int  # rows attention read in the last ubatch (pooled: [0, n_kv) incl. holes)
    free_cells: int  # tokens that could still be placed
    largest_free_run: int  # longest run of consecutive free cells (pooled); free capacity otherwise
    n_seqs: int  # sequences holding at least one token
    alloc_calls: int  # storage allocations since creation (tensors created on a tier)
    alloc_calls_last_step: int  # storage allocations while committing the last ubatch
    reserved_peak_bytes: int = 0  # most bytes held at once since reset_peak(), transients of growth included
    n_blocks: int = 0  # paged only
    used_blocks: int = 0
    free_blocks: int = 0
    block_size: int = 0
    preemptions: int = 0  # filled in by the scheduler

    @property
    def external_fragmentation(self) -> float:
        """1 - largest_free_run / free_cells: free room that exists but not in one run. A memory whose
        placement needs no contiguity reports its whole free room as one run, so this is 0 for it."""
        return 1.0 - self.largest_free_run / self.free_cells if self.free_cells else 0.0

    def as_dict(self) -> dict:
        return asdict(self)


class BatchContext:
    """One batch's view of a memory: its ubatches, their planned placement, the applied one's view.

    ``apply`` commits ubatch i through ``mem._apply`` and records the storage allocations that
    took; ``next`` moves on. KV and recurrent memories add their own accessors.
    """

    def __init__(self, mem, ubatches: list[UBatch], plans: list, status: MemoryStatus) -> None:
        self.mem, self.ubatches, self.plans, self.status = mem, ubatches, plans, status
        self.i = 0
        self.view = None

    @property
    def ubatch(self) -> UBatch:
        return self.ubatches[self.i]

    def apply(self) -> None:
        n0 = self.mem.alloc_calls
        self.view = self.mem._apply(self.plans[self.i], self.ubatch)
        self.mem.alloc_calls_last_step = self.mem.alloc_calls - n0

    def next(self) -> bool:
        self.i += 1
        return self.i < len(self.ubatches)


class MemoryContext(Protocol):
    """Per-batch view handed to the model: where this ubatch's K/V go and what it attends to."""

    status: MemoryStatus
    ubatch: UBatch

    def apply(self) -> None: ...
    def next(self) -> bool: ...
    def store(self, il: int, k: torch.Tensor, v: torch.Tensor) -> None: ...
    def attn_inputs(self, il: int) -> list[AttnInput]: ...
    def kv_storage(self, il: int) -> KVStorage | None: ...  # instead of store + attn_inputs, where not None
    def kv_stack(self, n_layer: int) -> KVStack | None: ...  # every layer's kv_storage at shared places, or None


@runtime_checkable
class Memory(Protocol):
    """What the engine, the scheduler and the trackers may ask of any memory (KV, recurrent, hybrid).

    Callers use these and nothing else: no attribute probes, no checks of ``kind``."""

    kind: str  # the allocator's name (engine/alloc's registry)
    shares_partial_prefix: bool  # seq_cp of [0, n) can share a prefix shorter than the source holds
    bytes_per_token: int  # bytes one more token of context costs (0 for recurrent state)
    alloc_calls: int  # storage allocations since creation
    alloc_calls_last_step: int  # storage allocations while committing the last ubatch

    def init_batch(self, batch: Batch, n_ubatch: int) -> MemoryContext: ...
    def clear(self, data: bool = True) -> None: ...
    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool: ...
    def seq_cp(self, seq_src: int, seq_dst: int, p0: int = -1, p1: int = -1) -> None: ...
    def seq_keep(self, seq_id: int) -> None: ...
    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None: ...
    def seq_pos_min(self, seq_id: int) -> int: ...
    def seq_pos_max(self, seq_id: int) -> int: ...
    def state_write(self, f: BinaryIO, seq_id: int | None = None) -> None: ...
    def state_read(self, f: BinaryIO, seq_id: int | None = None) -> None: ...
    def memory_breakdown(self) -> dict[str, int]: ...
    def stats(self) -> MemoryStats: ...
    def usage(self) -> tuple[int, int]: ...  # (live bytes, reserved bytes), O(1): for every step
    def reset_peak(self) -> None: ...
    def can_admit(self, n_tokens: int) -> bool: ...  # room for a new sequence of n_tokens (vLLM's can_allocate)
    def check_seq_ids(self, seq_ids) -> None: ...  # ConfigError for ids outside [0, n_seq_max)
    def parts(self) -> tuple[Memory | None, Memory | None]: ...  # (KV part, recurrent part); self for one
    def close(self) -> None: ...  # release every tier (disk files, pinned buffers)


def norm_range(p0: int, p1: int) -> tuple[int, int]:
    """llama.cpp's convention: p0 < 0 -> 0, p1 < 0 -> +inf."""
    return (0 if p0 < 0 else p0), (2**62 if p1 < 0 else p1)
