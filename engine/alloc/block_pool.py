"""A pool of fixed-size KV blocks in plain Python, after vLLM's v1/core/block_pool.py.

Design choices:
- The free queue is FIFO: a freed block goes to the back, so the blocks freed longest ago are
  reused first (vLLM keeps them as evictable prefix-cache entries in that order; kvbench has
  no prefix cache, but the order makes runs reproducible and easy to reason about).
- A block's reference count is the number of sequences whose block table lists it. Sharing a
  prefix (``seq_cp``) adds the source's blocks to the destination's table and bumps the count:
  no data moves. A block returns to the free queue when its count drops to zero.
- Tables keep allocation order; the last block of a table is where the sequence appends.

The pool knows nothing about tokens or tensors: ``PagedKV`` decides which blocks a sequence
needs and keeps the tables consistent with its cells.
"""

from __future__ import annotations

from collections import deque


class BlockPool:
    def __init__(self, n_blocks: int) -> None:
        assert n_blocks > 0
        self.n_blocks = n_blocks
        self.free: deque[int] = deque(range(n_blocks))
        self.ref: list[int] = [0] * n_blocks
        self.tables: dict[int, list[int]] = {}

    @property
    def n_free(self) -> int:
        return len(self.free)

    def take(self, seq_id: int) -> int:
        """Pop the oldest free block for seq_id (appended to its table)."""
        assert self.free, "take: no free block (callers check n_free first)"
        b = self.free.popleft()
        assert self.ref[b] == 0
        self.ref[b] = 1
        self.tables.setdefault(seq_id, []).append(b)
        return b

    def share(self, seq_id: int, b: int) -> None:
        """Add a block in use to seq_id's table (prefix sharing)."""
        assert self.ref[b] > 0, "share: block must be in use"
        table = self.tables.setdefault(seq_id, [])
        assert b not in table, "share: block already in the table"
        table.append(b)
        self.ref[b] += 1

    def release(self, seq_id: int, b: int) -> None:
        """Drop b from seq_id's table; a block nobody references goes back to the free queue."""
        table = self.tables[seq_id]
        table.remove(b)
        if not table:
            del self.tables[seq_id]
        self.ref[b] -= 1
        assert self.ref[b] >= 0
        if self.ref[b] == 0:
            self.free.append(b)

    def snapshot(self):
        return deque(self.free), list(self.ref), {s: list(t) for s, t in self.tables.items()}

    def restore(self, snap) -> None:
        free, ref, tables = snap
        self.free, self.ref, self.tables = deque(free), list(ref), {s: list(t) for s, t in tables.items()}

    def check(self) -> None:
        """Invariants: every block is either free (ref 0, once in the queue) or referenced by
        exactly ref[b] tables; no table lists a block twice."""
        counts = [0] * self.n_blocks
        for table in self.tables.values():
            assert len(set(table)) == len(table), "a table lists a block twice"
            for b in table:
                counts[b] += 1
        assert counts == self.ref, "reference counts disagree with the tables"
        assert len(set(self.free)) == len(self.free), "a block is twice in the free queue"
        assert set(self.free) == {b for b in range(self.n_blocks) if self.ref[b] == 0}, "free queue != unreferenced"
