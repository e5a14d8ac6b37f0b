"""Recurrent state memory (Mamba-style layers), after llama.cpp's llama_memory_recurrent.

A sequence's history lives in a fixed-size state per layer: the rolling state ``r`` (Mamba: the
last d_conv - 1 inputs of the depthwise convolution) and the SSM state ``s`` (Mamba: d_inner x
d_state); ModelConfig.r_shape / s_shape say what they are for each model family. It
does not grow with context length; the cost is that a state exists only for the latest position
of its sequence, so it cannot be rewound: a partial ``seq_rm`` that would need an earlier state
is refused (returns False), as in llama.cpp.

This module is what every recurrent memory shares (the base, its batch context and state files);
the allocators are engine/alloc/recurrent_pooled.py (llama.cpp's cells with tails) and
engine/alloc/recurrent_naive.py (per-sequence tensors).

Batches are split with ``split_equal`` (each ubatch: n_seqs sequences x the same number of
tokens, sequence after sequence), so a layer runs all of them as one scan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch

from engine.batch import Batch, UBatch
from engine.config import ModelConfig
from engine.errors import StateFileError
from engine.memory.base import BatchContext
from engine.memory.kv_cache import CacheSpec
from engine.memory.layered import LayeredMemory
from engine.memory.state import read_state, write_state


@dataclass
class RSPlanItem:
    seq: int
    cell: int  # pooled: the cell this sequence's state is read from and written to
    src: int  # pooled: copy the state from this cell first (fork); -1: none; -2: start from zeros
    last_pos: int


class RecurrentMemory(LayeredMemory):
    """Shared by both recurrent allocators: state shapes, the batch split, state files, accounting."""

    kind = "recurrent"
    shares_partial_prefix = False  # a state exists only at its sequence's last position

    def __init__(self, cfg: ModelConfig, spec: CacheSpec, device: torch.device | str = "cpu",
                 layers: list[int] | None = None) -> None:
        super().__init__(cfg, spec, device, layers)
        # the model family decides the shapes (Mamba-1/2: conv inputs and SSM state; RWKV-7: token shifts
        # and the wkv matrix); this memory only stores them
        self.r_shape, self.s_shape = cfg.r_shape, cfg.s_shape
        self.n_embd_r, self.n_embd_s = cfg.n_embd_r, cfg.n_embd_s
        self.dtype = torch.float32  # states accumulate over the whole sequence: kept in f32, as llama.cpp does

    bytes_per_token = 0  # nothing grows with context: the state is per sequence (bytes_per_seq)

    @property
    def bytes_per_seq(self) -> int:
        return len(self.layers) * (self.n_embd_r + self.n_embd_s) * 4

    def _empty_state(self, i: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.tiers[self.layer_tier[i]]
        return t.empty((n, self.n_embd_r), self.dtype), t.empty((n, self.n_embd_s), self.dtype)

    # -- batch protocol --------------------------------------------------------------------------
    def split(self, batch: Batch, n_ubatch: int) -> list[UBatch]:
        """split_equal: n sequences x the same number of tokens, so a layer scans them together."""
        return batch.split_equal(n_ubatch, self.device)

    def parts(self):
        return None, self

    def can_admit(self, n_tokens: int) -> bool:
        """Room for one more sequence (its length does not matter to a recurrent state)."""
        return self.stats().free_cells > 0

    def _ubatch_seqs(self, ub: UBatch) -> list[tuple[int, int]]:
        """(seq, last position) per sequence of a split_equal ubatch, in row order."""
        n = ub.n_tokens // max(ub.n_seqs, 1)
        return [(int(ub.seq_host[i * n]), int(ub.pos_host[(i + 1) * n - 1])) for i in range(max(ub.n_seqs, 1))]

    # hooks beyond LayeredMemory's (_prepare, _apply)
    def rs_get(self, il: int, view) -> tuple[torch.Tensor, torch.Tensor]: ...
    def rs_set(self, il: int, view, r: torch.Tensor, s: torch.Tensor) -> None: ...

    def memory_breakdown(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for i, n in enumerate(self._reserved_cells_by_layer()):
            t = self.layer_tier[i]
            out[f"r.{t}"] = out.get(f"r.{t}", 0) + n * self.n_embd_r * 4
            out[f"s.{t}"] = out.get(f"s.{t}", 0) + n * self.n_embd_s * 4
        return out

    def _reserved_cells_by_layer(self) -> list[int]: ...

    def state_write(self, f: BinaryIO, seq_id: int | None = None) -> None:
        _state_write(self, f, seq_id)

    def state_read(self, f: BinaryIO, seq_id: int | None = None, source: str = "state") -> None:
        _state_read(self, f, seq_id, source)



class RSContext(BatchContext):
    """A batch's view of a recurrent memory: the states of the ubatch's sequences, layer by layer."""

    def rs_get(self, il: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rolling state (n_seqs, *cfg.r_shape), ssm state (n_seqs, *cfg.s_shape)) of layer il."""
        return self.mem.rs_get(il, self.view)

    def rs_set(self, il: int, r: torch.Tensor, s: torch.Tensor) -> None:
        self.mem.rs_set(il, self.view, r, s)


def _state_header(mem: RecurrentMemory, seq_id) -> dict:
    c = mem.cfg
    return {"arch": c.arch, "model": c.name, "n_layer": len(mem.layers), "layers": mem.layers, "kind": "recurrent",
            "n_embd_r": mem.n_embd_r, "n_embd_s": mem.n_embd_s, "row_bytes_k": mem.n_embd_r * 4,
            "row_bytes_v": mem.n_embd_s * 4, "seq_id": seq_id, "written_by": mem.kind}


def _state_write(mem: RecurrentMemory, f: BinaryIO, seq_id: int | None = None) -> None:
    pos, owners, r, s = mem._export(seq_id)
    if seq_id is not None:
        owners = [np.asarray([seq_id], np.int32) for _ in owners]
    write_state(f, _state_header(mem, seq_id), pos, owners, r, s)


def _state_read(mem: RecurrentMemory, f: BinaryIO, seq_id: int | None = None, source: str = "state") -> None:
    st = read_state(f, source)
    mine = _state_header(mem, None)
    for key in ("arch", "model", "kind", "layers", "n_embd_r", "n_embd_s"):
        if st.header.get(key) != mine[key]:
            raise StateFileError(f"{source}: saved with {key} = {st.header.get(key)!r}, this memory has "
                                 f"{mine[key]!r}; restore into a memory of the same model")
    if seq_id is not None and len(st.pos) != 1:
        raise StateFileError(f"{source}: holds {len(st.pos)} states; a single-sequence restore needs one")
    if seq_id is not None and not 0 <= seq_id < mem.n_seq_max:
        raise StateFileError(f"{source}: cannot restore into sequence {seq_id}, this memory allows [0, {mem.n_seq_max})")
    ids = np.concatenate(st.seqs) if st.seqs else np.zeros(0, np.int32)
    if seq_id is None and len(ids) and ids.max() >= mem.n_seq_max:
        raise StateFileError(f"{source}: holds sequence id {int(ids.max())}, this memory allows [0, {mem.n_seq_max})")
    r = [torch.frombuffer(bytearray(b), dtype=torch.float32).view(-1, mem.n_embd_r) if b else None for b in st.k]
    s = [torch.frombuffer(bytearray(b), dtype=torch.float32).view(-1, mem.n_embd_s) if b else None for b in st.v]
    snap = mem._snapshot()
    if seq_id is None:
        mem.clear(data=False)
    else:
        mem.seq_rm(seq_id)
    try:
        mem._import(st.pos, st.seqs, r, s, seq_id)
    except StateFileError as e:
        mem._restore(snap)
        raise StateFileError(f"{source}: does not fit: {e}") from None


RecurrentMemory.context = RSContext  # the view a recurrent memory hands to the model
