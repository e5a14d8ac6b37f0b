"""vLLM's paged KV cache: fixed-size blocks, a free-block queue, per-sequence block tables.

Cells are addressed ``block * block_size + offset`` in one pre-allocated tensor per layer, so
the per-token bookkeeping (position, owners) is the same ``KVCells`` as the pooled cache. On
top, a ``BlockPool`` hands whole blocks to sequences:

- A sequence appends into the last block of its table while it has room; otherwise it takes
  the oldest free block. Room left in a sequence's last block is reserved for it (internal
  fragmentation, what vLLM trades for no external fragmentation).
- ``seq_cp`` shares blocks: the destination's table lists the source's blocks, ref counts go
  up, no data moves. Appending into a shared, partly filled last block first copies that
  sequence's rows into a fresh block (copy-on-write), as vLLM does.
- Attention gathers the blocks of the ubatch's sequences (the block tables) into one K/V
  view; there are no holes from other sequences' freed cells, unlike the pooled cache.
- On sliding-window models, positions the next token can no longer see are dropped before a
  batch is placed; blocks that empty out return to the free queue.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from engine.alloc.block_pool import BlockPool
from engine.batch import Batch, UBatch
from engine.memory.base import MemoryStatus
from engine.memory.cell_cache import CellKVCache, CellPlan, CellView


@dataclass
class PagedPlan(CellPlan):
    # blocks taken from the free queue, in queue order: ("new", seq, block) or ("cow", seq, block, old_block)
    ops: list[tuple] = field(default_factory=list)


class PagedKV(CellKVCache):
    kind = "paged"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.block_size = self.spec.block_size
        self.n_blocks = self.size // self.block_size
        self.pool = BlockPool(self.n_blocks)

    # -- bookkeeping snapshots -----------------------------------------------------------------
    def _extra_snapshot(self):
        return self.pool.snapshot()

    def _extra_restore(self, snap) -> None:
        self.pool.restore(snap)

    def _after_clear(self) -> None:
        self.pool = BlockPool(self.n_blocks)

    # -- placement -----------------------------------------------------------------------------
    def _tail(self, s: int) -> tuple[int, int] | None:
        """(last block of s, first free offset after s's last cell in it), or None."""
        table = self.pool.tables.get(s)
        if not table:
            return None
        b, bs = table[-1], self.block_size
        mine = np.flatnonzero(self.cells.seq[b * bs : (b + 1) * bs, s])
        return b, int(mine[-1]) + 1

    def _plan(self, ub: UBatch) -> PagedPlan | None:
        bs, free = self.block_size, self.pool.free
        n_taken = 0
        cursor: dict[int, list[int]] = {}
        idxs = np.empty(ub.n_tokens, dtype=np.int64)
        ops: list[tuple] = []
        for i, s in enumerate(ub.seq_host.tolist()):
            cur = cursor.get(s)
            if cur is None:
                tail = self._tail(s)
                if tail is not None and tail[1] < bs:
                    if self.pool.ref[tail[0]] > 1:  # shared, partly filled: copy-on-write
                        if n_taken == len(free):
                            return None
                        ops.append(("cow", s, free[n_taken], tail[0]))
                        tail = (free[n_taken], tail[1])
                        n_taken += 1
                    cur = list(tail)
                cursor[s] = cur
            if cur is None or cur[1] == bs:
                if n_taken == len(free):
                    return None
                ops.append(("new", s, free[n_taken]))
                cur = [free[n_taken], 0]
                n_taken += 1
                cursor[s] = cur
            idxs[i] = cur[0] * bs + cur[1]
            cur[1] += 1
        return PagedPlan(idxs, ops)

    def _commit(self, plan: PagedPlan, ub: UBatch) -> None:
        c, bs = self.cells, self.block_size
        for op in plan.ops:
            b = self.pool.take(op[1])
            assert b == op[2], "the free queue changed between plan and commit"
            if op[0] == "cow":
                s, old = op[1], op[3]
                src = np.arange(old * bs, (old + 1) * bs)
                mine = src[c.seq[src, s]]
                dst = mine - old * bs + b * bs
                c.set_tokens(dst, c.pos[mine], np.full(len(mine), s))
                c.unown(mine, s)
                c._drop_empty(np.isin(np.arange(c.size), mine))
                self.pool.release(s, old)
        c.set_tokens(plan.idxs, ub.pos_host, ub.seq_host)

    def _apply(self, plan: PagedPlan, ub: UBatch) -> CellView:
        bs = self.block_size
        for op in plan.ops:
            if op[0] == "cow":  # the data half of copy-on-write (rows of the copied cells)
                s, b, old = op[1], op[2], op[3]
                offs = np.flatnonzero(self.cells.seq[old * bs : (old + 1) * bs, s])
                src = torch.from_numpy(old * bs + offs)
                dst = torch.from_numpy(b * bs + offs)
                for t in self.k + self.v:
                    t.index_copy_(0, dst.to(t.device), t.index_select(0, src.to(t.device)))
        return super()._apply(plan, ub)

    def _view(self, plan: PagedPlan, ub: UBatch) -> CellView:
        bs = self.block_size
        blocks = list(dict.fromkeys(b for s in dict.fromkeys(ub.seq_host.tolist()) for b in self.pool.tables[s]))
        cells = (np.asarray(blocks, dtype=np.int64)[:, None] * bs + np.arange(bs)).ravel()
        self.n_kv_last = len(cells)
        return CellView(self._slots(plan.idxs, self.device), self.build_mask(ub, cells, len(cells)),
                        torch.from_numpy(cells).to(self.device))

    # -- keeping block tables in step with cells -----------------------------------------------
    def _sync(self, seqs) -> None:
        """Each sequence's table lists exactly the blocks that hold its cells."""
        c, bs = self.cells, self.block_size
        owned = c.seq.reshape(self.n_blocks, bs, self.n_seq_max).any(axis=1)  # (n_blocks, n_seq_max)
        for s in seqs:
            have = set(np.flatnonzero(owned[:, s]).tolist())
            table = self.pool.tables.get(s, [])
            for b in [b for b in table if b not in have]:
                self.pool.release(s, b)
            gained = have - set(table)

            def first_pos(b: int) -> int:
                blk = slice(b * bs, (b + 1) * bs)
                return int(c.pos[blk][c.seq[blk, s]].min())

            for b in sorted(gained, key=first_pos):
                self.pool.share(s, b)

    def _after_rm(self, freed: np.ndarray, seqs: list[int]) -> None:
        self._sync(seqs)

    def _after_cp(self, seq_dst: int) -> None:
        self._sync([seq_dst])

    def init_batch(self, batch: Batch, n_ubatch: int):
        if self.n_swa == 0:
            return super().init_batch(batch, n_ubatch)
        self.update()  # a pending K-shift lands first: the snapshot must not bring it back
        snap = self._snapshot()  # pruning frees blocks the plan may need; undo it if the batch fails
        self._prune_swa(set(batch.seq_id))
        ctx = super().init_batch(batch, n_ubatch)
        if ctx.status is not MemoryStatus.SUCCESS:
            self._restore(snap)
        return ctx

    def _prune_swa(self, seqs) -> None:
        """Drop positions the sequence's next token cannot see (p <= next - n_swa)."""
        for s in seqs:
            if 0 <= s < self.n_seq_max:
                nxt = self.cells.seq_pos_max(s) + 1
                if nxt - self.n_swa >= 0:
                    self.seq_rm(s, 0, nxt - self.n_swa + 1)

    def stats(self):
        n_free = self.pool.n_free
        return self._stats(free_cells=n_free * self.block_size, largest_free_run=n_free * self.block_size,
                           n_blocks=self.n_blocks, used_blocks=self.n_blocks - n_free, free_blocks=n_free,
                           block_size=self.block_size)
