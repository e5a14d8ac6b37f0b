"""KV cell bookkeeping (llama.cpp's llama_kv_cells): positions and sequence sets, no tensors.

A cell holds one token's K/V. Its bookkeeping is a position (``-1`` = empty), the set of
sequences that own it (several, when a prefix is shared by ``seq_cp``), and the position
delta accumulated since the last K-shift. Arrays are numpy so that range operations and mask
construction are vectorized; the invariant is ``pos[i] >= 0  <=>  seq[i].any()``.
"""

from __future__ import annotations

import numpy as np


class KVCells:
    def __init__(self, size: int, n_seq_max: int) -> None:
        assert size > 0 and n_seq_max > 0
        self.size = size
        self.n_seq_max = n_seq_max
        self.pos = np.full(size, -1, dtype=np.int64)  # (size,)
        self.shift = np.zeros(size, dtype=np.int64)  # (size,) pending K-shift delta
        self.seq = np.zeros((size, n_seq_max), dtype=bool)  # (size, n_seq_max)
        self.has_shift = False
        self.used = 0  # cells with pos >= 0, kept up to date by every mutator (read every step)
        # Queries a decode step makes two or three times, each a scan of every cell: answers kept while only
        # set_tokens runs (what decoding does), recomputed after any other mutator (_changed).
        self._pos_max: dict[int, int] | None = None  # seq_pos_max of each sequence holding cells
        self._max_p1: int | None = None  # used_max_p1

    # -- queries -------------------------------------------------------------------------------

    def used_max_p1(self) -> int:
        """Highest used cell index + 1 (an index bound, not a count); 0 when empty."""
        if self._max_p1 is None:
            nz = np.flatnonzero(self.pos >= 0)
            self._max_p1 = int(nz[-1]) + 1 if len(nz) else 0
        return self._max_p1

    def seq_pos_min(self, s: int) -> int:
        p = self.pos[self.seq[:, s]]
        return int(p.min()) if len(p) else -1

    def seq_pos_max(self, s: int) -> int:
        if self._pos_max is None:
            self._pos_max = {i: int(p) for i, p in enumerate(self.seq_pos_max_all()) if p >= 0}
        return self._pos_max.get(s, -1)

    def seq_pos_max_all(self) -> np.ndarray:
        """seq_pos_max for every sequence at once: (n_seq_max,), -1 where absent."""
        p = np.where(self.seq, self.pos[:, None], -1)
        return p.max(axis=0)

    def in_range(self, s: int, p0: int, p1: int) -> np.ndarray:
        """Cells of sequence s (any sequence when s < 0) with pos in [p0, p1)."""
        m = (self.pos >= p0) & (self.pos < p1)
        return m & (self.seq.any(axis=1) if s < 0 else self.seq[:, s])

    def free_runs(self) -> tuple[int, int]:
        """(free cells, longest run of consecutive free cells)."""
        free = self.pos < 0
        n_free = int(free.sum())
        if n_free == 0:
            return 0, 0
        # run lengths of True in `free`
        d = np.diff(np.concatenate(([0], free.view(np.int8), [0])))
        starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
        return n_free, int((ends - starts).max())

    # -- mutators ------------------------------------------------------------------------------
    def _changed(self) -> None:
        """Forget the kept answers (every mutator but set_tokens calls this)."""
        self._pos_max = self._max_p1 = None

    def _drop_empty(self, m: np.ndarray) -> np.ndarray:
        """Cells in m that lost their last sequence become empty; returns which did."""
        self._changed()
        emptied = m & ~self.seq.any(axis=1) & (self.pos >= 0)
        self.used -= int(np.count_nonzero(emptied))
        self.pos[emptied] = -1
        self.shift[emptied] = 0
        return emptied

    def rm(self, idx: np.ndarray) -> None:
        self._changed()
        self.used -= int(np.count_nonzero(self.pos[idx] >= 0))
        self.pos[idx] = -1
        self.shift[idx] = 0
        self.seq[idx] = False

    def set_tokens(self, idx: np.ndarray, pos: np.ndarray, seq: np.ndarray) -> None:
        """Place tokens (pos[i], seq[i]) in cells idx[i]; the cells must be empty."""
        assert (self.pos[idx] < 0).all(), "set_tokens: target cells must be empty"
        self.used += len(idx)
        self.pos[idx] = pos
        self.seq[idx, seq] = True
        if len(idx) > 32:  # a prefill: recount when asked
            self._changed()
            return
        if self._max_p1 is not None:
            self._max_p1 = max(self._max_p1, int(idx.max()) + 1)
        if self._pos_max is not None:
            for p, s in zip(pos.tolist(), seq.tolist()):
                if p > self._pos_max.get(s, -1):
                    self._pos_max[s] = p

    def unown(self, idx: np.ndarray, s: int) -> None:
        """Take sequence s off cells idx (a cell left without owners is not freed here: _drop_empty does that)."""
        self._changed()
        self.seq[idx, s] = False

    def seq_rm(self, s: int, p0: int, p1: int) -> np.ndarray:
        """Remove s (every sequence when s < 0) from cells with pos in [p0, p1); returns freed cells."""
        self._changed()
        m = self.in_range(s, p0, p1)
        if s < 0:
            self.seq[m] = False
        else:
            self.seq[m, s] = False
        return self._drop_empty(m)

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        """Add dst to every cell of src in [p0, p1): shares the cells, copies no data."""
        self._changed()
        self.seq[self.in_range(src, p0, p1), dst] = True

    def seq_keep(self, s: int) -> np.ndarray:
        self._changed()
        keep = self.seq[:, s].copy()
        self.seq[:] = False
        self.seq[keep, s] = True
        return self._drop_empty(self.pos >= 0)

    def seq_add(self, s: int, p0: int, p1: int, delta: int) -> np.ndarray:
        """Shift positions of s's cells in [p0, p1) by delta; cells pushed below 0 are freed."""
        self._changed()
        m = self.in_range(s, p0, p1)
        gone = m & (self.pos + delta < 0)
        self.rm(gone)  # before the shift, while they still count as used
        m &= ~gone
        self.pos[m] += delta
        self.shift[m] += delta
        self.has_shift = self.has_shift or bool(m.any())
        return gone

    def reset_shift(self) -> None:
        self.shift[:] = 0
        self.has_shift = False

    # -- snapshots (for the dry-run prepare) ---------------------------------------------------
    def snapshot(self) -> tuple:
        return self.pos.copy(), self.seq.copy(), self.shift.copy(), self.has_shift

    def restore(self, snap: tuple) -> None:
        self._changed()
        self.pos[:], self.seq[:], self.shift[:], self.has_shift = snap
        self.used = int(np.count_nonzero(self.pos >= 0))
