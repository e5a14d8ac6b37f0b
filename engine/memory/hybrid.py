"""Hybrid memory: a KV cache for the attention layers and a recurrent memory for the SSM layers
(llama.cpp's llama_memory_hybrid), moved as one.

Batches are split with ``split_equal`` (the recurrent part needs it; the KV part takes any split),
and both parts must find room for a batch or neither changes. Sequence operations go to both; a
partial ``seq_rm`` the recurrent part refuses is refused as a whole, before the KV part is touched.
"""

from __future__ import annotations

import io
import struct
from typing import BinaryIO

from engine.batch import Batch
from engine.errors import KvbenchError, StateFileError
from engine.memory.base import MemoryStats, MemoryStatus
from engine.memory.kv_cache import KVCache
from engine.memory.recurrent import RecurrentMemory
from engine.memory.state import StateFiles

_MAGIC = b"KVBHYBR1"


class HybridMemory(StateFiles):
    shares_partial_prefix = False

    def __init__(self, kv: KVCache, rs: RecurrentMemory) -> None:
        assert kv.n_swa == 0, "hybrid memories with sliding-window attention are not supported"
        self.kv, self.rs = kv, rs
        self.kind = kv.kind
        self.cfg = kv.cfg
        self.n_seq_max = kv.n_seq_max

    @property
    def bytes_per_token(self) -> int:
        return self.kv.bytes_per_token

    @property
    def alloc_calls(self) -> int:
        return self.kv.alloc_calls + self.rs.alloc_calls

    @property
    def alloc_calls_last_step(self) -> int:
        return self.kv.alloc_calls_last_step + self.rs.alloc_calls_last_step

    def check_seq_ids(self, seq_ids) -> None:
        self.kv.check_seq_ids(seq_ids)

    def parts(self):
        return self.kv, self.rs

    def init_batch(self, batch: Batch, n_ubatch: int) -> HybridContext:
        self.kv.check_seq_ids(set(batch.seq_id))
        ubs = self.rs.split(batch, n_ubatch)  # equal splits: what the recurrent part needs, any split suits KV
        kv_ctx = self.kv.init_ubatches(ubs)
        rs_ctx = self.rs.init_ubatches(ubs)
        ok = kv_ctx.status is MemoryStatus.SUCCESS and rs_ctx.status is MemoryStatus.SUCCESS
        return HybridContext(kv_ctx, rs_ctx, MemoryStatus.SUCCESS if ok else MemoryStatus.FAILED_PREPARE)

    def can_admit(self, n_tokens: int) -> bool:
        return self.kv.can_admit(n_tokens) and self.rs.can_admit(n_tokens)

    # -- sequence operations ---------------------------------------------------------------------
    def clear(self, data: bool = True) -> None:
        self.kv.clear(data)
        self.rs.clear(data)

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        if not self.rs.seq_rm(seq_id, p0, p1):  # refuses without changing anything
            return False
        return self.kv.seq_rm(seq_id, p0, p1)

    def seq_cp(self, seq_src: int, seq_dst: int, p0: int = -1, p1: int = -1) -> None:
        self.kv.seq_cp(seq_src, seq_dst, p0, p1)
        self.rs.seq_cp(seq_src, seq_dst, p0, p1)

    def seq_keep(self, seq_id: int) -> None:
        self.kv.seq_keep(seq_id)
        self.rs.seq_keep(seq_id)

    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        self.kv.seq_add(seq_id, p0, p1, shift)
        self.rs.seq_add(seq_id, p0, p1, shift)

    def seq_pos_min(self, seq_id: int) -> int:
        return self.kv.seq_pos_min(seq_id)

    def seq_pos_max(self, seq_id: int) -> int:
        return max(self.kv.seq_pos_max(seq_id), self.rs.seq_pos_max(seq_id))

    # -- accounting ------------------------------------------------------------------------------
    def memory_breakdown(self) -> dict[str, int]:
        return {**self.kv.memory_breakdown(), **self.rs.memory_breakdown()}

    def usage(self) -> tuple[int, int]:
        (a, b), (c, d) = self.kv.usage(), self.rs.usage()
        return a + c, b + d

    def reset_peak(self) -> None:
        self.kv.reset_peak()
        self.rs.reset_peak()

    def stats(self) -> MemoryStats:
        k, r = self.kv.stats(), self.rs.stats()
        k.reserved_bytes += r.reserved_bytes
        k.live_bytes += r.live_bytes
        k.reserved_peak_bytes += r.reserved_peak_bytes
        k.alloc_calls += r.alloc_calls
        k.alloc_calls_last_step += r.alloc_calls_last_step
        return k

    # -- state: the KV part and the recurrent part, one after the other ---------------------------
    def state_write(self, f: BinaryIO, seq_id: int | None = None) -> None:
        a, b = io.BytesIO(), io.BytesIO()
        self.kv.state_write(a, seq_id)
        self.rs.state_write(b, seq_id)
        f.write(_MAGIC + struct.pack("<Q", len(a.getvalue())) + a.getvalue() + b.getvalue())

    def state_read(self, f: BinaryIO, seq_id: int | None = None, source: str = "state") -> None:
        blob = f.read()
        if blob[:8] != _MAGIC or len(blob) < 16:
            raise StateFileError(f"{source}: not a hybrid-memory state (magic {blob[:8]!r})")
        n = struct.unpack_from("<Q", blob, 8)[0]
        if 16 + n > len(blob):
            raise StateFileError(f"{source}: truncated")
        # Each part leaves itself unchanged when it refuses a state. The recurrent part goes first, with a
        # copy of it taken through its own state file (a few KB per sequence), so that a KV part that then
        # refuses can be answered by putting the recurrent part back: all or nothing, through the parts'
        # public interface only.
        backup = io.BytesIO()
        self.rs.state_write(backup)
        self.rs.state_read(io.BytesIO(blob[16 + n:]), seq_id, source)
        try:
            self.kv.state_read(io.BytesIO(blob[16:16 + n]), seq_id, source)
        except KvbenchError:
            self.rs.state_read(io.BytesIO(backup.getvalue()), None, source=f"{source} (the recurrent part as it was)")
            raise

    def close(self) -> None:
        self.kv.close()
        self.rs.close()


class HybridContext:
    def __init__(self, kv_ctx, rs_ctx, status: MemoryStatus) -> None:
        self.kv_ctx, self.rs_ctx, self.status = kv_ctx, rs_ctx, status

    @property
    def ubatch(self):
        return self.kv_ctx.ubatch

    def apply(self) -> None:
        self.kv_ctx.apply()
        self.rs_ctx.apply()

    def next(self) -> bool:
        a, b = self.kv_ctx.next(), self.rs_ctx.next()
        assert a == b
        return a

    def store(self, il, k, v) -> None:
        self.kv_ctx.store(il, k, v)

    def attn_inputs(self, il):
        return self.kv_ctx.attn_inputs(il)

    def kv_storage(self, il):
        return self.kv_ctx.kv_storage(il)

    def kv_stack(self, n_layer):
        return None  # the one-op forward is a pure attention stack's; a hybrid's layers alternate kinds

    def rs_get(self, il):
        return self.rs_ctx.rs_get(il)

    def rs_set(self, il, r, s) -> None:
        self.rs_ctx.rs_set(il, r, s)
