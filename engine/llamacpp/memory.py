"""kvbench's ``Memory`` interface over llama.cpp's KV cache (``llama_memory_*``).

Every ``seq_*`` verb is llama.cpp's own call: this class changes nothing in how llama.cpp places,
shares or frees cells. What llama.cpp does not expose it reads where llama.cpp states it:

* **reserved bytes**: the KV buffer llama.cpp allocates at context creation, all cells of all
  streams, ``cells x bytes per token``; checked against the size llama.cpp logs (to its 0.01 MiB).
* **used cells**: llama.cpp has no call that returns them. ``_Shadow`` follows llama.cpp's documented
  cell semantics for the verbs that pass through here (a decoded token takes one cell; ``seq_cp``
  within a stream adds the destination to the source's cells, across streams copies them; a cell
  is free when no sequence holds it). tests/integration/llamacpp checks it against llama.cpp's own
  state size, which grows by a fixed number of bytes per used cell.
* **per-sequence state bytes**: ``llama_state_seq_get_size``, as llama.cpp would save the sequence.

Two memories, one knob (``kv_unified``): one pool of cells shared by all sequences (the analogue of
kvbench's pooled allocator), or one stream of ``n_ctx / n_seq_max`` cells per sequence (the
analogue of per-sequence memory). llama.cpp's find_slot takes any free cells in a stream
(non-contiguous), so free room is never split: external fragmentation is 0 by construction.
"""

from __future__ import annotations

import ctypes
from collections import Counter
from typing import BinaryIO

from engine.errors import ConfigError, MemoryFullError, UnsupportedError
from engine.llamacpp.lib import MEMORY_KINDS
from engine.memory.base import MemoryStats, norm_range


class _Shadow:
    """Which cell holds each (sequence, position), as llama.cpp assigns them; cells are opaque ids."""

    def __init__(self, n_seq_max: int, unified: bool) -> None:
        self.unified = unified
        self.seqs: list[dict[int, int]] = [{} for _ in range(n_seq_max)]  # seq -> {pos: cell id}
        self.refs: Counter[int] = Counter()  # cell id -> sequences holding it
        self.stream_of: dict[int, int] = {}  # cell id -> stream
        self.next_id = 0

    def stream(self, seq: int) -> int:
        return 0 if self.unified else seq

    def _drop(self, cell: int) -> None:
        self.refs[cell] -= 1
        if self.refs[cell] == 0:
            del self.refs[cell], self.stream_of[cell]

    def add(self, seq: int, pos: int) -> None:
        cell, self.next_id = self.next_id, self.next_id + 1
        self.seqs[seq][pos] = cell
        self.refs[cell] = 1
        self.stream_of[cell] = self.stream(seq)

    def rm(self, seq: int, p0: int, p1: int) -> None:
        held = self.seqs[seq]
        for p in [p for p in held if p0 <= p < p1]:
            self._drop(held.pop(p))

    def cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        if src == dst:
            return
        if self.stream(src) == self.stream(dst):  # same stream: cells gain a sequence, no data moves
            for p, cell in self.seqs[src].items():
                if p0 <= p < p1 and p not in self.seqs[dst]:
                    self.seqs[dst][p] = cell
                    self.refs[cell] += 1
            return
        # across streams llama.cpp copies the whole source stream into the destination's (llama-kv-cache.cpp)
        for p in list(self.seqs[dst]):
            self._drop(self.seqs[dst].pop(p))
        for p in sorted(self.seqs[src]):
            self.add(dst, p)

    def keep(self, seq: int) -> None:
        # llama.cpp's seq_keep walks the cells of seq's own stream only: with one stream per sequence
        # the other sequences keep their cells (measured: tests/integration/llamacpp)
        for s in range(len(self.seqs)):
            if s != seq and self.stream(s) == self.stream(seq):
                self.rm(s, 0, 2**62)

    def shift(self, seq: int, p0: int, p1: int, delta: int) -> None:
        held = self.seqs[seq]
        moved = {p: held.pop(p) for p in [p for p in held if p0 <= p < p1]}
        for p, cell in moved.items():
            if p + delta < 0:  # llama.cpp frees cells shifted below position 0
                self._drop(cell)
            else:
                held[p + delta] = cell

    def clear(self) -> None:
        for held in self.seqs:
            held.clear()
        self.refs.clear()
        self.stream_of.clear()

    def used(self, stream: int | None = None) -> int:
        if stream is None:
            return len(self.refs)
        return sum(1 for s in self.stream_of.values() if s == stream)

    def seq_tokens(self) -> int:
        return sum(len(h) for h in self.seqs)


class LlamaCppMemory:
    """The ``Memory`` of a llama.cpp context. Built by ``LlamaCppEngine``, which owns the context."""

    alloc_calls_last_step = 0  # llama.cpp allocates its KV buffer once, when the context is created

    def __init__(self, lib, ctx, n_seq_max: int, unified: bool, cells_per_stream: int, n_stream: int,
                 bytes_per_token: int, row_bytes: tuple[int, int], n_buffers: int) -> None:
        self.lib, self.ctx, self.mem = lib, ctx, lib.llama_get_memory(ctx)
        self.n_seq_max, self.unified = n_seq_max, unified
        self.kind = MEMORY_KINDS[0] if unified else MEMORY_KINDS[1]
        # within one stream a prefix is shared cell by cell; across streams llama.cpp copies whole streams
        self.shares_partial_prefix = unified
        self.cells_per_stream, self.n_stream = cells_per_stream, n_stream
        self.n_cells = cells_per_stream * n_stream
        self.bytes_per_token = bytes_per_token
        self.row_bytes_k, self.row_bytes_v = row_bytes  # summed over layers
        self.alloc_calls = n_buffers
        self.shadow = _Shadow(n_seq_max, unified)
        self.peak_seq_state_bytes = 0
        self._grown: set[int] = set()

    # -- what the engine tells it --------------------------------------------------------------
    def committed(self, pos: list[int], seq: list[int]) -> None:
        """A batch llama_decode accepted: one new cell per token."""
        for p, s in zip(pos, seq):
            self.shadow.add(s, p)
        self._grown |= set(seq)  # their saved state is at its largest now: measured at the next usage()

    def _measure_grown(self) -> None:
        """llama_state_seq_get_size of the sequences that grew since the last call. Not inside decode: the
        call walks every cell, and the scheduler times decode; the trackers call usage() after each step."""
        for s in self._grown:
            self.peak_seq_state_bytes = max(self.peak_seq_state_bytes, self.seq_state_bytes(s))
        self._grown.clear()

    # -- llama.cpp's seq_* verbs ---------------------------------------------------------------
    def check_seq_ids(self, seq_ids) -> None:
        bad = [s for s in seq_ids if not 0 <= s < self.n_seq_max]
        if bad:
            raise ConfigError(f"sequence id {bad[0]} is outside [0, {self.n_seq_max}) (llama.cpp n_seq_max)")

    def clear(self, data: bool = True) -> None:
        if self._grown:
            self._measure_grown()
        self.lib.llama_memory_clear(self.mem, data)
        self.shadow.clear()

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        if self._grown:  # a finished sequence is removed before the trackers look: measure it first
            self._measure_grown()
        ok = bool(self.lib.llama_memory_seq_rm(self.mem, seq_id, p0, p1))
        if ok:
            if seq_id < 0:
                for s in range(self.n_seq_max):
                    self.shadow.rm(s, *norm_range(p0, p1))
            else:
                self.shadow.rm(seq_id, *norm_range(p0, p1))
        return ok

    def seq_cp(self, seq_src: int, seq_dst: int, p0: int = -1, p1: int = -1) -> None:
        self.check_seq_ids((seq_src, seq_dst))
        if not self.unified and seq_src != seq_dst and (p0 > 0 or (0 <= p1 <= self.seq_pos_max(seq_src))):
            raise MemoryFullError(f"llama.cpp copies whole streams between sequences ({self.kind}); "
                                  f"[{p0}, {p1}) of sequence {seq_src} is part of one")
        self.lib.llama_memory_seq_cp(self.mem, seq_src, seq_dst, p0, p1)
        self.shadow.cp(seq_src, seq_dst, *norm_range(p0, p1))

    def seq_keep(self, seq_id: int) -> None:
        self.lib.llama_memory_seq_keep(self.mem, seq_id)
        self.shadow.keep(seq_id)

    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        self.lib.llama_memory_seq_add(self.mem, seq_id, p0, p1, shift)
        self.shadow.shift(seq_id, *norm_range(p0, p1), shift)

    def seq_pos_min(self, seq_id: int) -> int:
        return int(self.lib.llama_memory_seq_pos_min(self.mem, seq_id))

    def seq_pos_max(self, seq_id: int) -> int:
        return int(self.lib.llama_memory_seq_pos_max(self.mem, seq_id))

    def seq_state_bytes(self, seq_id: int) -> int:
        """Bytes llama.cpp writes when it saves this sequence (``llama_state_seq_get_size``)."""
        return int(self.lib.llama_state_seq_get_size(self.ctx, seq_id))

    def state_write(self, f: BinaryIO, seq_id: int | None = None) -> None:
        s = -1 if seq_id is None else seq_id
        n = self.lib.llama_state_seq_get_size(self.ctx, s)
        buf = (ctypes.c_uint8 * n)()
        if self.lib.llama_state_seq_get_data(self.ctx, buf, n, s) != n:
            raise MemoryFullError(f"llama.cpp wrote an incomplete state of sequence {s}")
        f.write(bytes(buf))

    def state_read(self, f: BinaryIO, seq_id: int | None = None) -> None:
        raise UnsupportedError("restoring a saved state into llama.cpp's memory is not wired up; "
                               "use the torch backend for state round trips")

    def init_batch(self, batch, n_ubatch: int):
        raise UnsupportedError("llama.cpp plans its own ubatches inside llama_decode; run batches through "
                               "LlamaCppEngine.decode")

    # -- accounting ----------------------------------------------------------------------------
    def usage(self) -> tuple[int, int]:
        if self._grown:
            self._measure_grown()
        return self.shadow.used() * self.bytes_per_token, self.n_cells * self.bytes_per_token

    def stats(self) -> MemoryStats:
        used = self.shadow.used()
        free = self.n_cells - used
        live, reserved = self.usage()
        n_seqs = sum(1 for h in self.shadow.seqs if h)
        return MemoryStats(reserved_bytes=reserved, live_bytes=live, n_cells=self.n_cells, used_cells=used,
                           seq_tokens=self.shadow.seq_tokens(), n_kv=0,  # not exposed by llama.cpp
                           free_cells=free, largest_free_run=free,  # find_slot takes any free cells
                           n_seqs=n_seqs, alloc_calls=self.alloc_calls, alloc_calls_last_step=0,
                           reserved_peak_bytes=reserved)

    def memory_breakdown(self) -> dict[str, int]:
        return {"k.device": self.n_cells * self.row_bytes_k, "v.device": self.n_cells * self.row_bytes_v}

    def reset_peak(self) -> None:
        self.peak_seq_state_bytes = 0
        self._grown.clear()

    def can_admit(self, n_tokens: int) -> bool:
        if self.unified:
            return self.n_cells - self.shadow.used() >= n_tokens
        return n_tokens <= self.cells_per_stream  # a free slot's stream is empty

    def parts(self):
        return self, None

    def close(self) -> None:  # the engine frees the context
        pass
