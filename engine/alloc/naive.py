"""What frameworks do by default: each sequence owns K/V tensors that grow as tokens arrive.

After HF transformers' DynamicCache: every batch a sequence takes part in allocates new K and V
tensors one batch longer and copies the old rows over (``growth="cat"``, what ``torch.cat``
does), or, with ``growth="double"``, doubles the capacity when it runs out. Every growth is a
real allocation on the layer's tier, counted; when a sequence ends, its tensors are dropped
and the allocator (malloc or the CUDA caching allocator) gets the bytes back. Fragmentation
therefore shows up where it really appears: in the process allocator, not in kvbench.

- ``seq_cp`` copies rows (there is nothing to share), ``seq_rm`` of part of a sequence
  re-allocates the rows that stay, ``seq_add`` re-rotates K in place.
- ``cache.size`` caps the tokens held in total, so a full naive memory fails a batch the same
  way a full pool does and the scheduler can preempt.
- Attention runs once per sequence over that sequence's rows: no mask over other sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.batch import Batch, UBatch
from engine.errors import MemoryFullError
from engine.memory.base import AttnInput, MemoryStats, MemoryStatus, norm_range
from engine.memory.kv_cache import KVCache


@dataclass
class SeqKV:
    pos: np.ndarray  # (n,) positions of the rows, in row order
    k: list[torch.Tensor]  # per layer: (cap, row_elems) storage, rows [0, n) live
    v: list[torch.Tensor]

    @property
    def n(self) -> int:
        return len(self.pos)

    @property
    def cap(self) -> int:
        return self.k[0].shape[0]


@dataclass
class NaiveGroup:
    seq: int
    rows: torch.Tensor  # ubatch rows of this sequence
    r0: int  # its new rows go to [r0, r0 + len(rows))
    n: int  # rows attention reads: [0, n)
    mask: torch.Tensor | None


class NaiveKV(KVCache):
    kind = "naive"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seqs: dict[int, SeqKV] = {}
        self._swa_drop: dict[int, int] = {}  # seq -> first position kept, for the batch being prepared
        self.reserved_peak = 0

    # -- storage -------------------------------------------------------------------------------
    def _realloc(self, sk: SeqKV, keep: np.ndarray | None, cap: int) -> None:
        """New tensors of ``cap`` rows holding the kept rows (all when keep is None), on each layer's tier.

        Layer by layer, like torch.cat in a DynamicCache: while a layer's rows are copied its old
        and new tensors both exist, which is the transient peak ``reserved_peak_bytes`` records.
        """
        src = None if keep is None else torch.from_numpy(keep)
        n = sk.n if keep is None else len(keep)
        row = self.row_bytes_k + self.row_bytes_v
        held = self.usage()[1]
        old_cap = sk.cap if sk.k[0] is not None else 0
        for il in range(self.n_layers):
            self.reserved_peak = max(self.reserved_peak, held + cap * row)
            held += (cap - old_cap) * row
            k, v = self.empty_rows(il, cap)
            if n:
                old_k, old_v = sk.k[il], sk.v[il]
                k[:n] = old_k[:n] if src is None else old_k.index_select(0, src.to(old_k.device))
                v[:n] = old_v[:n] if src is None else old_v.index_select(0, src.to(old_v.device))
            sk.k[il], sk.v[il] = k, v
        if keep is not None:
            sk.pos = sk.pos[keep]

    def _new_seq(self) -> SeqKV:
        return SeqKV(np.zeros(0, np.int64), [None] * self.n_layers, [None] * self.n_layers)

    @property
    def used(self) -> int:
        return sum(sk.n for sk in self.seqs.values())

    # -- batch protocol ------------------------------------------------------------------------
    def init_batch(self, batch: Batch, n_ubatch: int):
        # SWA: rows the next token of a sequence can no longer see (p <= next - n_swa) are dropped,
        # but only once the batch is known to fit: _prepare counts them as already gone.
        self._swa_drop = {}
        if self.n_swa > 0:
            for s in set(batch.seq_id):
                thr = self.seq_pos_max(s) + 1 - self.n_swa + 1
                if thr > 0 and s in self.seqs:
                    self._swa_drop[s] = thr
        ctx = super().init_batch(batch, n_ubatch)
        if ctx.status is MemoryStatus.SUCCESS:
            for s, thr in self._swa_drop.items():
                self.seq_rm(s, 0, thr)
        self._swa_drop = {}
        return ctx

    def _prepare(self, ubs: list[UBatch]) -> list | None:
        dropped = sum(int(np.count_nonzero(self.seqs[s].pos < thr)) for s, thr in self._swa_drop.items())
        total = self.used - dropped
        for ub in ubs:
            total += ub.n_tokens
            if total > self.size:
                return None
        return [None] * len(ubs)

    def _apply(self, plan, ub: UBatch) -> list[NaiveGroup]:
        groups = []
        n_total = 0
        for s in dict.fromkeys(ub.seq_host.tolist()):
            rows = np.flatnonzero(ub.seq_host == s)
            sk = self.seqs.get(s)
            if sk is None:
                sk = self.seqs[s] = self._new_seq()
            r0, m = sk.n, len(rows)
            if self.spec.growth == "cat" or sk.k[0] is None or r0 + m > sk.cap:
                cap = r0 + m if self.spec.growth == "cat" else max(2 * sk.cap if sk.k[0] is not None else 0, r0 + m, 16)
                self._realloc(sk, None, cap)
            qpos = ub.pos_host[rows]
            sk.pos = np.concatenate((sk.pos, qpos))
            mask = None
            if m > 1 or self.n_swa > 0:
                vis = sk.pos[None, :] <= qpos[:, None]
                if self.n_swa > 0:
                    vis &= (qpos[:, None] - sk.pos[None, :]) < self.n_swa
                mask = torch.from_numpy(vis).to(self.device)
            groups.append(NaiveGroup(s, torch.from_numpy(rows).to(self.device), r0, sk.n, mask))
            n_total += sk.n
        self.n_kv_last = n_total
        return groups

    def _store(self, il: int, view: list[NaiveGroup], k: torch.Tensor, v: torch.Tensor) -> None:
        ks, vs = self.encode(k, v)
        self._store_rows(il, view, ks, vs)

    def _store_rows(self, il: int, view: list[NaiveGroup], ks: torch.Tensor, vs: torch.Tensor) -> None:
        for g in view:
            sk = self.seqs[g.seq]
            m = len(g.rows)
            sk.k[il][g.r0 : g.r0 + m] = ks[g.rows].to(sk.k[il].device)
            sk.v[il][g.r0 : g.r0 + m] = vs[g.rows].to(sk.v[il].device)

    def _attn_inputs(self, il: int, view: list[NaiveGroup]) -> list[AttnInput]:
        out = []
        for g in view:
            sk = self.seqs[g.seq]
            k, v = self.decode(sk.k[il][: g.n], sk.v[il][: g.n])
            rows = None if len(view) == 1 else g.rows
            out.append(AttnInput(rows, k, v, g.mask))
        return out

    # -- sequence operations -------------------------------------------------------------------
    def clear(self, data: bool = True) -> None:
        self.seqs = {}

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        if seq_id >= 0:
            self.check_seq_ids([seq_id])
        p0, p1 = norm_range(p0, p1)
        for s in ([seq_id] if seq_id >= 0 else list(self.seqs)):
            sk = self.seqs.get(s)
            if sk is None:
                continue
            keep = np.flatnonzero((sk.pos < p0) | (sk.pos >= p1))
            if len(keep) == 0:
                del self.seqs[s]
            elif len(keep) < sk.n:
                self._realloc(sk, keep, len(keep) if self.spec.growth == "cat" else sk.cap)
        return True

    def seq_cp(self, seq_src: int, seq_dst: int, p0: int = -1, p1: int = -1) -> None:
        self.check_seq_ids([seq_src, seq_dst])
        if seq_src == seq_dst or seq_src not in self.seqs:
            return
        p0, p1 = norm_range(p0, p1)
        src = self.seqs[seq_src]
        take = np.flatnonzero((src.pos >= p0) & (src.pos < p1))
        if len(take) == 0:
            return
        if self.used + len(take) > self.size:
            raise MemoryFullError(f"naive: copying {len(take)} rows to sequence {seq_dst} exceeds cache.size "
                                  f"{self.size} ({self.used} held)")
        dst = self.seqs.get(seq_dst)
        pos = src.pos[take] if dst is None else np.concatenate((dst.pos, src.pos[take]))
        order = np.argsort(pos, kind="stable")
        new = self._new_seq()
        for il in range(self.n_layers):
            k, v = self.empty_rows(il, len(pos))
            it = torch.from_numpy(take)
            ks = src.k[il].index_select(0, it.to(src.k[il].device))
            vs = src.v[il].index_select(0, it.to(src.v[il].device))
            if dst is not None:
                ks = torch.cat((dst.k[il][: dst.n], ks))
                vs = torch.cat((dst.v[il][: dst.n], vs))
            o = torch.from_numpy(order)
            k[:] = ks.index_select(0, o.to(ks.device))
            v[:] = vs.index_select(0, o.to(vs.device))
            new.k[il], new.v[il] = k, v
        new.pos = pos[order]
        self.seqs[seq_dst] = new

    def seq_keep(self, seq_id: int) -> None:
        self.check_seq_ids([seq_id])
        self.seqs = {s: sk for s, sk in self.seqs.items() if s == seq_id}

    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        self.check_seq_ids([seq_id])
        p0, p1 = norm_range(p0, p1)
        sk = self.seqs.get(seq_id)
        if sk is None or shift == 0 or p0 == p1:
            return
        m = np.flatnonzero((sk.pos >= p0) & (sk.pos < p1))
        if len(m) == 0:
            return
        sk.pos[m] += shift
        delta = torch.full((len(m),), shift, dtype=torch.int64)
        idx = torch.from_numpy(m)
        for k in sk.k:
            it = idx.to(k.device)
            k.index_copy_(0, it, self.rotate_rows(k.index_select(0, it), delta))
        if (sk.pos < 0).any():  # positions pushed below 0 are gone, as in llama.cpp
            keep = np.flatnonzero(sk.pos >= 0)
            if len(keep) == 0:
                del self.seqs[seq_id]
            else:
                self._realloc(sk, keep, len(keep))

    def seq_pos_min(self, seq_id: int) -> int:
        sk = self.seqs.get(seq_id)
        return int(sk.pos.min()) if sk is not None and sk.n else -1

    def seq_pos_max(self, seq_id: int) -> int:
        sk = self.seqs.get(seq_id)
        return int(sk.pos.max()) if sk is not None and sk.n else -1

    # -- state ---------------------------------------------------------------------------------
    def _snapshot(self):
        return {s: SeqKV(sk.pos.copy(), list(sk.k), list(sk.v)) for s, sk in self.seqs.items()}

    def _restore(self, snap) -> None:
        self.seqs = snap

    def _import_fits(self, st, seq_id) -> bool:
        """Naive copies a shared token to every owner: room for the sum of owners."""
        return self.used + sum(len(s) for s in st.seqs) <= self.size

    def _export(self, seq_id):
        seqs = [seq_id] if seq_id is not None else sorted(self.seqs)
        pos, owners = [], []
        k = [[] for _ in range(self.n_layers)]
        v = [[] for _ in range(self.n_layers)]
        for s in seqs:
            sk = self.seqs.get(s)
            if sk is None:
                continue
            order = torch.from_numpy(np.argsort(sk.pos, kind="stable"))
            pos.append(sk.pos[order.numpy()])
            owners += [np.asarray([s], np.int32)] * sk.n
            for il in range(self.n_layers):
                k[il].append(sk.k[il][: sk.n].index_select(0, order.to(sk.k[il].device)).cpu())
                v[il].append(sk.v[il][: sk.n].index_select(0, order.to(sk.v[il].device)).cpu())

        def to_bytes(parts: list[torch.Tensor]) -> bytes:
            return torch.cat(parts).contiguous().view(torch.uint8).numpy().tobytes() if parts else b""

        p = np.concatenate(pos).astype(np.int32) if pos else np.zeros(0, np.int32)
        return p, owners, [to_bytes(x) for x in k], [to_bytes(x) for x in v]

    # -- accounting ----------------------------------------------------------------------------
    def _reserved_rows_by_layer(self):
        cap = sum(sk.cap for sk in self.seqs.values() if sk.k[0] is not None)
        return [(cap, cap)] * self.n_layers

    def usage(self) -> tuple[int, int]:
        cap = sum(sk.cap for sk in self.seqs.values() if sk.k[0] is not None)
        return self.used * self.bytes_per_token, cap * self.bytes_per_token

    def reset_peak(self) -> None:
        self.reserved_peak = self.usage()[1]

    def stats(self) -> MemoryStats:
        used = self.used
        return MemoryStats(
            reserved_bytes=sum(self.memory_breakdown().values()),
            live_bytes=used * self.bytes_per_token,
            n_cells=self.size,
            used_cells=used,
            seq_tokens=used,
            n_kv=self.n_kv_last,
            free_cells=self.size - used,
            largest_free_run=self.size - used,
            n_seqs=len(self.seqs),
            alloc_calls=self.alloc_calls,
            alloc_calls_last_step=self.alloc_calls_last_step,
            reserved_peak_bytes=max(self.reserved_peak, self.usage()[1]),
        )
