"""Pooled recurrent state (llama.cpp's llama_memory_recurrent): ``n_seq_max`` state cells per layer,
allocated once. A cell has the position of the last token folded into it and its owner set;
``tail[seq]`` is the cell holding seq's state. ``seq_cp`` shares the source's cell (no copy); whichever
sequence advances first moves to a free cell with a copy of the state (llama.cpp's find_slot), so both
continue from the same point."""

from __future__ import annotations

import numpy as np
import torch

from engine.batch import UBatch
from engine.errors import StateFileError
from engine.memory.base import MemoryStats, norm_range
from engine.memory.recurrent import RecurrentMemory, RSPlanItem


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
            self.check_seq_ids([seq_id])
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
        self.check_seq_ids([seq_src, seq_dst])
        if seq_src == seq_dst:
            return
        self._drop(seq_dst)
        c = int(self.tail[seq_src])
        if c >= 0:
            self.owners[c, seq_dst] = True
            self.tail[seq_dst] = c

    def seq_keep(self, seq_id: int) -> None:
        self.check_seq_ids([seq_id])
        for s in range(self.n_seq_max):
            if s != seq_id:
                self._drop(s)

    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        self.check_seq_ids([seq_id])
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
