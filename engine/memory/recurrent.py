"""Recurrent state memory (Mamba-style layers), after llama.cpp's llama_memory_recurrent.

A sequence's history lives in a fixed-size state per layer: the conv state ``r`` (the last
d_conv - 1 inputs of the depthwise convolution) and the SSM state ``s`` (d_inner x d_state). It
does not grow with context length; the cost is that a state exists only for the latest position
of its sequence, so it cannot be rewound: a partial ``seq_rm`` that would need an earlier state
is refused (returns False), as in llama.cpp.

- ``pooled``: ``n_seq_max`` state cells per layer, allocated once. A cell has the position of the
  last token folded into it and its owner set; ``tail[seq]`` is the cell holding seq's state.
  ``seq_cp`` shares the source's cell (no copy); whichever sequence advances first moves to a free
  cell with a copy of the state (llama.cpp's find_slot), so both continue from the same point.
- ``naive``: per-sequence state tensors created when a sequence first appears and dropped by
  ``seq_rm``; ``seq_cp`` copies them. Every creation is an allocation on the layer's tier.

Batches are split with ``split_equal`` (each ubatch: n_seqs sequences x the same number of
tokens, sequence after sequence), so a layer runs all of them as one scan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch

from engine.errors import ConfigError, StateFileError
from engine.memory.base import BatchContext, MemoryStats, MemoryStatus, norm_range
from engine.memory.kv_cache import CacheSpec
from engine.memory.state import StateFiles, read_state, write_state
from engine.memory.tiers import make_tier, tier_of_layer
from engine.model.config import ModelConfig
from engine.runtime.batch import Batch, UBatch


@dataclass
class RSPlanItem:
    seq: int
    cell: int  # pooled: the cell this sequence's state is read from and written to
    src: int  # pooled: copy the state from this cell first (fork); -1: none; -2: start from zeros
    last_pos: int


class RecurrentMemory(StateFiles):
    """Shared by both allocators: layers, tiers, the batch protocol, seq_pos, accounting."""

    kind = "recurrent"
    shares_partial_prefix = False  # a state exists only at its sequence's last position

    def __init__(self, cfg: ModelConfig, spec: CacheSpec, device: torch.device | str = "cpu",
                 layers: list[int] | None = None) -> None:
        if spec.n_seq_max <= 0:
            raise ConfigError(f"parallel / n_seq_max {spec.n_seq_max}: must be positive")
        self.cfg, self.spec = cfg, spec
        self.device = torch.device(device)
        self.n_seq_max = spec.n_seq_max
        self.layers = list(range(cfg.n_layer)) if layers is None else list(layers)
        self.slot = {il: i for i, il in enumerate(self.layers)}
        d_inner, d_state, d_conv = cfg.ssm_d_inner, cfg.ssm_d_state, cfg.ssm_d_conv
        self.r_shape = (d_conv - 1, d_inner)
        self.s_shape = (d_inner, d_state)
        self.n_embd_r = (d_conv - 1) * d_inner
        self.n_embd_s = d_inner * d_state
        self.dtype = torch.float32  # states accumulate over the whole sequence: kept in f32, as llama.cpp does
        self.layer_tier = [tier_of_layer(il, spec.offload, spec.offload_layers) for il in self.layers]
        self.tiers = {name: make_tier(name if self.device.type != "meta" else "device", self.device)
                      for name in dict.fromkeys(self.layer_tier)}
        self.alloc_calls_last_step = 0
        self.n_kv_last = 0

    bytes_per_token = 0  # nothing grows with context: the state is per sequence (bytes_per_seq)

    @property
    def bytes_per_seq(self) -> int:
        return len(self.layers) * (self.n_embd_r + self.n_embd_s) * 4

    @property
    def alloc_calls(self) -> int:
        return sum(t.n_allocs for t in self.tiers.values())

    def _check_seq_ids(self, seq_ids) -> None:
        bad = [s for s in seq_ids if not 0 <= s < self.n_seq_max]
        if bad:
            raise ConfigError(f"sequence id {bad[0]} is outside [0, {self.n_seq_max}); raise parallel / n_seq_max")

    def _empty_state(self, i: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.tiers[self.layer_tier[i]]
        return t.empty((n, self.n_embd_r), self.dtype), t.empty((n, self.n_embd_s), self.dtype)

    # -- batch protocol --------------------------------------------------------------------------
    def init_batch(self, batch: Batch, n_ubatch: int):
        self._check_seq_ids(set(batch.seq_id))
        return self.init_ubatches(batch.split_equal(n_ubatch, self.device))

    def init_ubatches(self, ubs: list[UBatch]):
        plans = self._prepare(ubs)
        if plans is None:
            return RSContext(self, [], [], MemoryStatus.FAILED_PREPARE)
        return RSContext(self, ubs, plans, MemoryStatus.SUCCESS)

    def can_admit(self, n_tokens: int) -> bool:
        """Room for one more sequence (its length does not matter to a recurrent state)."""
        return self.stats().free_cells > 0

    def _ubatch_seqs(self, ub: UBatch) -> list[tuple[int, int]]:
        """(seq, last position) per sequence of a split_equal ubatch, in row order."""
        n = ub.n_tokens // max(ub.n_seqs, 1)
        return [(int(ub.seq_host[i * n]), int(ub.pos_host[(i + 1) * n - 1])) for i in range(max(ub.n_seqs, 1))]

    # hooks
    def _prepare(self, ubs: list[UBatch]) -> list | None: ...
    def _apply(self, plan: list[RSPlanItem], ub: UBatch): ...
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

    def close(self) -> None:
        for t in self.tiers.values():
            t.close()


class RSContext(BatchContext):
    """A batch's view of a recurrent memory: the states of the ubatch's sequences, layer by layer."""

    def rs_get(self, il: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv state (n_seqs, d_conv - 1, d_inner), ssm state (n_seqs, d_inner, d_state)) of layer il."""
        return self.mem.rs_get(il, self.view)

    def rs_set(self, il: int, r: torch.Tensor, s: torch.Tensor) -> None:
        self.mem.rs_set(il, self.view, r, s)


class RecurrentPooled(RecurrentMemory):
    kind = "pooled"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.size = self.n_seq_max  # one cell per sequence slot (llama.cpp: mem_size = n_seq_max)
        self.r, self.s = [], []
        for i in range(len(self.layers)):
            r, s = self._empty_state(i, self.size)
            self.r.append(r)
            self.s.append(s)
        self._reset_cells()

    def _reset_cells(self) -> None:
        self.pos = np.full(self.size, -1, dtype=np.int64)
        self.owners = np.zeros((self.size, self.n_seq_max), dtype=bool)
        self.tail = np.full(self.n_seq_max, -1, dtype=np.int64)

    def _snapshot(self):
        return self.pos.copy(), self.owners.copy(), self.tail.copy()

    def _restore(self, snap) -> None:
        self.pos, self.owners, self.tail = (x.copy() for x in snap)

    def _plan_one(self, ub: UBatch) -> list[RSPlanItem] | None:
        """find_slot for one ubatch, applied to the bookkeeping (the caller snapshots)."""
        plan = []
        for s, last in self._ubatch_seqs(ub):
            c = int(self.tail[s])
            if c >= 0 and self.owners[c].sum() == 1:
                plan.append(RSPlanItem(s, c, -1, last))  # exclusive: update in place
            else:
                free = np.flatnonzero(~self.owners.any(axis=1))
                if len(free) == 0:
                    return None
                nc = int(free[0])
                plan.append(RSPlanItem(s, nc, c if c >= 0 else -2, last))
                if c >= 0:
                    self.owners[c, s] = False
            it = plan[-1]
            self.owners[it.cell, s] = True
            self.tail[s] = it.cell
            self.pos[it.cell] = last
        return plan

    def _prepare(self, ubs):
        snap = self._snapshot()
        try:
            plans = []
            for ub in ubs:
                p = self._plan_one(ub)
                if p is None:
                    return None
                plans.append(p)
            return plans
        finally:
            self._restore(snap)

    def _apply(self, plan, ub):
        for it in plan:  # the data half of find_slot: forks copy, new sequences start at zero
            if it.src != -1:
                for i in range(len(self.layers)):
                    for t in (self.r[i], self.s[i]):
                        if it.src >= 0:
                            t[it.cell] = t[it.src]
                        else:
                            t[it.cell].zero_()
            c = int(self.tail[it.seq])
            if it.src >= 0 or (c >= 0 and c != it.cell):
                self.owners[c, it.seq] = False
            self.owners[it.cell, it.seq] = True
            self.tail[it.seq] = it.cell
            self.pos[it.cell] = it.last_pos
        self.n_kv_last = len(plan)
        cells = [it.cell for it in plan]
        return torch.tensor(cells, dtype=torch.int64)

    def rs_get(self, il, cells):
        i = self.slot[il]
        r = self.r[i].index_select(0, cells.to(self.r[i].device)).to(self.device)
        s = self.s[i].index_select(0, cells.to(self.s[i].device)).to(self.device)
        return r.view(-1, *self.r_shape), s.view(-1, *self.s_shape)

    def rs_set(self, il, cells, r, s):
        i = self.slot[il]
        n = len(cells)
        self.r[i].index_copy_(0, cells.to(self.r[i].device), r.reshape(n, -1).to(self.r[i].device, self.dtype))
        self.s[i].index_copy_(0, cells.to(self.s[i].device), s.reshape(n, -1).to(self.s[i].device, self.dtype))

    # -- sequence operations ---------------------------------------------------------------------
    def _drop(self, s: int) -> None:
        c = int(self.tail[s])
        if c >= 0:
            self.owners[c, s] = False
            if not self.owners[c].any():
                self.pos[c] = -1
        self.tail[s] = -1

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """Remove [p0, p1) of seq_id (all sequences when seq_id < 0); False, changing nothing, when
        that would need an earlier state than the one held (a partial removal that is not a prefix
        of the whole history)."""
        a, b = norm_range(p0, p1)
        seqs = [seq_id] if seq_id >= 0 else [s for s in range(self.n_seq_max) if self.tail[s] >= 0]
        if seq_id >= 0:
            self._check_seq_ids([seq_id])
        for s in seqs:
            c = int(self.tail[s])
            if c >= 0 and a <= self.pos[c] < b and a > 0:
                return False
        for s in seqs:
            c = int(self.tail[s])
            if c >= 0 and a <= self.pos[c] < b:  # covers the whole history: the sequence is gone
                self._drop(s)
        return True

    def seq_cp(self, seq_src: int, seq_dst: int, p0: int = -1, p1: int = -1) -> None:
        """dst continues from src's state: src's cell is shared until one of them advances."""
        self._check_seq_ids([seq_src, seq_dst])
        if seq_src == seq_dst:
            return
        self._drop(seq_dst)
        c = int(self.tail[seq_src])
        if c >= 0:
            self.owners[c, seq_dst] = True
            self.tail[seq_dst] = c

    def seq_keep(self, seq_id: int) -> None:
        self._check_seq_ids([seq_id])
        for s in range(self.n_seq_max):
            if s != seq_id:
                self._drop(s)

    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        self._check_seq_ids([seq_id])
        a, b = norm_range(p0, p1)
        c = int(self.tail[seq_id])
        if c >= 0 and a <= self.pos[c] < b:
            self.pos[c] += shift

    def seq_pos_min(self, seq_id: int) -> int:
        c = int(self.tail[seq_id]) if 0 <= seq_id < self.n_seq_max else -1
        return int(self.pos[c]) if c >= 0 else -1

    seq_pos_max = seq_pos_min  # one state: the position of the last token folded into it

    def clear(self, data: bool = True) -> None:
        self._reset_cells()
        if data:
            for t in self.r + self.s:
                t.zero_()

    # -- state -----------------------------------------------------------------------------------
    def _export(self, seq_id):
        cells = [int(self.tail[seq_id])] if seq_id is not None else list(np.flatnonzero(self.owners.any(axis=1)))
        cells = [c for c in cells if c >= 0]
        idx = torch.tensor(cells, dtype=torch.int64)
        owners = [np.flatnonzero(self.owners[c]).astype(np.int32) for c in cells]
        r = [t.index_select(0, idx).cpu().contiguous().view(torch.uint8).numpy().tobytes() for t in self.r]
        s = [t.index_select(0, idx).cpu().contiguous().view(torch.uint8).numpy().tobytes() for t in self.s]
        return self.pos[cells].astype(np.int32), owners, r, s

    def _import(self, pos, owners, r, s, seq_id) -> None:
        n = len(pos)
        free = list(np.flatnonzero(~self.owners.any(axis=1)))
        if n > len(free):
            raise StateFileError(f"needs {n} state cells, {len(free)} are free")
        for j in range(n):
            c = int(free[j])
            for i in range(len(self.layers)):
                self.r[i][c] = r[i][j]
                self.s[i][c] = s[i][j]
            for o in ([seq_id] if seq_id is not None else owners[j].tolist()):
                self._drop(int(o))
                self.owners[c, int(o)] = True
                self.tail[int(o)] = c
            self.pos[c] = int(pos[j])

    # -- accounting ------------------------------------------------------------------------------
    def _reserved_cells_by_layer(self):
        return [self.size] * len(self.layers)

    def usage(self) -> tuple[int, int]:
        used = int(self.owners.any(axis=1).sum())
        return used * self.bytes_per_seq, self.size * self.bytes_per_seq

    def reset_peak(self) -> None:
        pass

    def stats(self) -> MemoryStats:
        used = int(self.owners.any(axis=1).sum())
        live, reserved = self.usage()
        return MemoryStats(reserved_bytes=reserved, live_bytes=live, n_cells=self.size, used_cells=used,
                           seq_tokens=int(self.owners.sum()), n_kv=self.n_kv_last, free_cells=self.size - used,
                           largest_free_run=self.size - used, n_seqs=int(self.owners.any(axis=0).sum()),
                           alloc_calls=self.alloc_calls, alloc_calls_last_step=self.alloc_calls_last_step,
                           reserved_peak_bytes=reserved)


class RecurrentNaive(RecurrentMemory):
    kind = "naive"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seqs: dict[int, tuple[int, list[torch.Tensor], list[torch.Tensor]]] = {}  # seq -> (pos, r, s)
        self._peak = 0

    def _new(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        rs, ss = [], []
        for i in range(len(self.layers)):
            r, s = self._empty_state(i, 1)
            rs.append(r)
            ss.append(s)
        return rs, ss

    def _prepare(self, ubs):
        return [None] * len(ubs)  # one state per sequence, created as it arrives: never out of room

    def _apply(self, plan, ub):
        seqs = self._ubatch_seqs(ub)
        for s, last in seqs:
            if s not in self.seqs:
                r, st = self._new()  # the sequence's state comes into existence: a real allocation
                self.seqs[s] = (last, r, st)
                self._peak = max(self._peak, self.usage()[1])
            else:
                _, r, st = self.seqs[s]
                self.seqs[s] = (last, r, st)
        self.n_kv_last = len(seqs)
        return [s for s, _ in seqs]

    def rs_get(self, il, seqs):
        i = self.slot[il]
        r = torch.cat([self.seqs[s][1][i] for s in seqs]).to(self.device)
        st = torch.cat([self.seqs[s][2][i] for s in seqs]).to(self.device)
        return r.view(-1, *self.r_shape), st.view(-1, *self.s_shape)

    def rs_set(self, il, seqs, r, s):
        i = self.slot[il]
        for j, q in enumerate(seqs):
            self.seqs[q][1][i].copy_(r[j].reshape(1, -1))
            self.seqs[q][2][i].copy_(s[j].reshape(1, -1))

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        a, b = norm_range(p0, p1)
        seqs = [seq_id] if seq_id >= 0 else list(self.seqs)
        if seq_id >= 0:
            self._check_seq_ids([seq_id])
        if any(s in self.seqs and a <= self.seqs[s][0] < b and a > 0 for s in seqs):
            return False
        for s in seqs:
            if s in self.seqs and a <= self.seqs[s][0] < b:
                del self.seqs[s]  # the tensors go back to the allocator
        return True

    def seq_cp(self, seq_src: int, seq_dst: int, p0: int = -1, p1: int = -1) -> None:
        self._check_seq_ids([seq_src, seq_dst])
        if seq_src == seq_dst or seq_src not in self.seqs:
            return
        pos, r, s = self.seqs[seq_src]
        nr, ns = self._new()
        for a, b in zip(nr + ns, r + s):
            a.copy_(b)
        self.seqs[seq_dst] = (pos, nr, ns)
        self._peak = max(self._peak, self.usage()[1])

    def seq_keep(self, seq_id: int) -> None:
        self._check_seq_ids([seq_id])
        self.seqs = {s: v for s, v in self.seqs.items() if s == seq_id}

    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        a, b = norm_range(p0, p1)
        if seq_id in self.seqs and a <= self.seqs[seq_id][0] < b:
            pos, r, s = self.seqs[seq_id]
            self.seqs[seq_id] = (pos + shift, r, s)

    def seq_pos_min(self, seq_id: int) -> int:
        return self.seqs[seq_id][0] if seq_id in self.seqs else -1

    seq_pos_max = seq_pos_min

    def clear(self, data: bool = True) -> None:
        self.seqs = {}

    def _export(self, seq_id):
        seqs = [seq_id] if seq_id is not None else sorted(self.seqs)
        seqs = [s for s in seqs if s in self.seqs]
        pos = np.asarray([self.seqs[s][0] for s in seqs], dtype=np.int32)
        owners = [np.asarray([s], np.int32) for s in seqs]
        r = [b"".join(self.seqs[s][1][i].cpu().contiguous().view(torch.uint8).numpy().tobytes() for s in seqs)
             for i in range(len(self.layers))]
        st = [b"".join(self.seqs[s][2][i].cpu().contiguous().view(torch.uint8).numpy().tobytes() for s in seqs)
              for i in range(len(self.layers))]
        return pos, owners, r, st

    def _import(self, pos, owners, r, s, seq_id) -> None:
        for j in range(len(pos)):
            for o in ([seq_id] if seq_id is not None else owners[j].tolist()):
                nr, ns = self._new()
                for i in range(len(self.layers)):
                    nr[i].copy_(r[i][j].reshape(1, -1))
                    ns[i].copy_(s[i][j].reshape(1, -1))
                self.seqs[int(o)] = (int(pos[j]), nr, ns)

    def _snapshot(self):
        return dict(self.seqs)

    def _restore(self, snap) -> None:
        self.seqs = snap

    def _reserved_cells_by_layer(self):
        return [len(self.seqs)] * len(self.layers)

    def usage(self) -> tuple[int, int]:
        n = len(self.seqs) * self.bytes_per_seq
        return n, n

    def reset_peak(self) -> None:
        self._peak = self.usage()[1]

    def stats(self) -> MemoryStats:
        n = len(self.seqs)
        return MemoryStats(reserved_bytes=n * self.bytes_per_seq, live_bytes=n * self.bytes_per_seq,
                           n_cells=self.n_seq_max, used_cells=n, seq_tokens=n, n_kv=self.n_kv_last,
                           free_cells=self.n_seq_max - n, largest_free_run=self.n_seq_max - n, n_seqs=n,
                           alloc_calls=self.alloc_calls, alloc_calls_last_step=self.alloc_calls_last_step,
                           reserved_peak_bytes=max(self._peak, n * self.bytes_per_seq))


# -- state files, shared by both allocators ------------------------------------------------------
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


RECURRENT_ALLOCATORS = {"naive": RecurrentNaive, "pooled": RecurrentPooled, "paged": RecurrentPooled}
