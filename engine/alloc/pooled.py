"""llama.cpp's KV cache: a pool of ``cache.size`` cells per layer, allocated once.

After src/llama-kv-cache.cpp:
- ``find_slot`` collects usable cells for a ubatch scanning from a head pointer, restarting
  at 0 when more than ``used + 2·n_tokens`` cells lie below the head (to keep the used range
  compact). Slots need not be contiguous: tokens are scattered into cells by index.
- On sliding-window models a cell owned by one sequence whose next position can no longer see
  it is reusable; overwriting it also drops that sequence's older positions, so each sequence
  stays gap-free (llama.cpp's lazy SWA pruning).
- Attention spans cells ``[0, n_kv)``, ``n_kv`` = highest used cell + 1 (padded to ``n_pad``):
  holes below it cost compute as well as memory. A mask hides other sequences' cells, future
  positions and, on SWA layers, positions outside the window.
"""

from __future__ import annotations

import numpy as np

from engine.batch import UBatch
from engine.memory.base import norm_range
from engine.memory.cell_cache import CellKVCache, CellPlan, CellView


class PooledKV(CellKVCache):
    kind = "pooled"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.head = 0

    def _extra_snapshot(self):
        return self.head

    def _extra_restore(self, head) -> None:
        self.head = head

    def _after_clear(self) -> None:
        self.head = 0

    def _usable(self) -> np.ndarray:
        c = self.cells
        usable = c.pos < 0
        if self.n_swa > 0:
            n_owner = c.seq.sum(axis=1)
            owner = c.seq.argmax(axis=1)
            nxt = c.seq_pos_max_all()[owner] + 1
            # is_masked_swa(p0 = cell pos, p1 = owner's next pos), standard window
            usable |= (n_owner == 1) & (nxt - c.pos >= self.n_swa)
        return usable

    def _plan(self, ub: UBatch) -> CellPlan | None:
        """find_slot: cells for the ubatch's tokens in scan order from head; None if they do not fit."""
        n = ub.n_tokens
        if n > self.size:
            return None
        head = self.head
        if head > self.cells.used + 2 * n:
            head = 0
        usable = self._usable()  # scan order: [head, size), then [0, head)
        cand = np.flatnonzero(usable[head:])[:n] + head
        if len(cand) < n:
            cand = np.concatenate((cand, np.flatnonzero(usable[:head])[: n - len(cand)]))
        return CellPlan(cand) if len(cand) >= n else None

    def _commit(self, plan: CellPlan, ub: UBatch) -> None:
        c, idxs = self.cells, plan.idxs
        max_rm: dict[int, int] = {}
        if self.n_swa > 0:  # only SWA-masked cells can be occupied here
            taken = idxs[c.pos[idxs] >= 0]
            for i in taken:
                s = int(c.seq[i].argmax())
                max_rm[s] = max(max_rm.get(s, -1), int(c.pos[i]))
            c.rm(taken)
        c.set_tokens(idxs, ub.pos_host, ub.seq_host)
        for s, pmax in max_rm.items():
            pmin = c.seq_pos_min(s)
            if 0 <= pmin <= pmax:
                c.seq_rm(s, pmin, pmax + 1)
        self.head = int(idxs[-1]) + 1
        if self.head >= self.size:
            self.head = 0

    def n_kv(self) -> int:
        p = self.spec.n_pad
        return min(self.size, max(p, -(-self.cells.used_max_p1() // p) * p))

    def _view(self, plan: CellPlan, ub: UBatch) -> CellView:
        n = self.n_kv()
        self.n_kv_last = n
        return CellView(self._slots(plan.idxs, self.device), self.build_mask(ub, None, n), slice(0, n))

    def _after_rm(self, freed: np.ndarray, seqs: list[int]) -> None:
        nz = np.flatnonzero(freed)
        if len(nz) and nz[0] < self.head:
            self.head = int(nz[0])

    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        self.check_seq_ids([seq_id])
        p0, p1 = norm_range(p0, p1)
        if shift == 0 or p0 == p1:
            return
        nz = np.flatnonzero(self.cells.seq_add(seq_id, p0, p1, shift))
        self.head = int(nz[0]) if len(nz) else 0  # llama.cpp: the first freed cell, or 0

    def stats(self):
        return self._stats()
