"""KV memories whose rows live in one pre-allocated pool of cells per layer (pooled, paged).

Both keep llama.cpp's cell bookkeeping (``KVCells``: position and owner set per cell) and one
K and one V tensor of ``size`` rows per layer, allocated once on the layer's tier: after
start-up no decode step allocates KV storage. They differ in how they choose cells for new
tokens (``_plan``) and in what attention reads (``_view`` / ``_attn_inputs``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.batch import Batch, UBatch
from engine.memory.base import AttnInput, KVStack, KVStorage, MemoryStats, norm_range
from engine.memory.cells import KVCells
from engine.memory.kv_cache import KVCache


@dataclass
class CellPlan:
    idxs: np.ndarray  # cell of each ubatch token, in token order


@dataclass
class CellView:
    slots: torch.Tensor | slice  # where this ubatch's rows go
    mask: torch.Tensor  # (T, n_attended) bool
    cells: torch.Tensor | slice  # cells attention reads, in mask column order ([0, n) when a slice)

    def places(self) -> tuple:
        """(slots, slot0, cells, n_kv, mask) as KVStorage holds them: index tensors, or the runs' bounds."""
        sl, cl = self.slots, self.cells
        slots, slot0 = (None, sl.start) if isinstance(sl, slice) else (sl, 0)
        if isinstance(cl, slice):
            assert cl.start in (0, None), "a run of cells attention reads starts at cell 0"
            return slots, slot0, None, cl.stop, self.mask
        return slots, slot0, cl, len(cl), self.mask


class CellKVCache(KVCache):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cells = KVCells(self.size, self.n_seq_max)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for i in range(self.n_layers):
            k, v = self.empty_rows(i, self.size)
            self.k.append(k)
            self.v.append(v)
        # Slots whose rows attention can read as stored (KVStorage): float types, on the compute device. A
        # quantized or rotated type needs a decode, another tier a copy: those keep store / attn_inputs.
        float_rows = self.codec_k.block_size == 1 and self.codec_v.block_size == 1 and not (self.rot_k or self.rot_v)
        self.raw = [float_rows and self.k[i].device == self.device == self.v[i].device for i in range(self.n_layers)]
        self._places: tuple[CellView | None, tuple] = (None, ())
        self.stackable = all(self.raw) and self.layers == list(range(self.n_layers))  # _kv_stack's lists as they are

    # -- hooks for pooled / paged --------------------------------------------------------------
    def _plan(self, ub: UBatch):
        raise NotImplementedError

    def _commit(self, plan, ub: UBatch) -> None:
        """Bookkeeping for a planned ubatch: cells (and blocks) now hold its tokens."""
        raise NotImplementedError

    def _view(self, plan, ub: UBatch) -> CellView:
        raise NotImplementedError

    def _after_rm(self, freed: np.ndarray, seqs: list[int]) -> None:
        """Cells in ``freed`` became empty and ``seqs`` lost cells (head / block tables follow)."""

    def _after_cp(self, seq_dst: int) -> None:
        """seq_dst gained cells through seq_cp."""

    def _extra_snapshot(self):
        return None

    def _extra_restore(self, snap) -> None:
        pass

    # -- batch protocol ------------------------------------------------------------------------
    def _snapshot(self):
        return self.cells.snapshot(), self._extra_snapshot()

    def _restore(self, snap) -> None:
        self.cells.restore(snap[0])
        self._extra_restore(snap[1])

    def _prepare(self, ubs: list[UBatch]) -> list | None:
        # _plan changes nothing; each ubatch is planned as if the ones before it were committed, so those are
        # committed on the way and undone at the end. The last one needs no commit: a decode step's single
        # ubatch plans without a snapshot (the snapshot copies every cell's bookkeeping).
        if len(ubs) == 1:
            plan = self._plan(ubs[0])
            return None if plan is None else [plan]
        snap = self._snapshot()
        plans = []
        try:
            for ub in ubs:
                plan = self._plan(ub)
                if plan is None:
                    return None
                self._commit(plan, ub)
                plans.append(plan)
            return plans
        finally:
            self._restore(snap)

    def _apply(self, plan, ub: UBatch) -> CellView:
        self._commit(plan, ub)
        return self._view(plan, ub)

    @staticmethod
    def _slots(idxs: np.ndarray, device) -> torch.Tensor | slice:
        i0 = int(idxs[0])
        if len(idxs) == 1 or (np.diff(idxs) == 1).all():
            return slice(i0, i0 + len(idxs))  # one contiguous run: a plain copy, no index tensor
        return torch.from_numpy(idxs).to(device)

    def _store(self, il: int, view: CellView, k: torch.Tensor, v: torch.Tensor) -> None:
        ks, vs = self.encode(k, v)
        self._store_rows(il, view, ks, vs)

    def _store_rows(self, il: int, view: CellView, ks: torch.Tensor, vs: torch.Tensor) -> None:
        kc, vc = self.k[il], self.v[il]
        if isinstance(view.slots, slice):
            kc[view.slots] = ks.to(kc.device)
            vc[view.slots] = vs.to(vc.device)
        else:
            kc.index_copy_(0, view.slots.to(kc.device), ks.to(kc.device))
            vc.index_copy_(0, view.slots.to(vc.device), vs.to(vc.device))

    def build_mask(self, ub: UBatch, cells: np.ndarray | None, n: int) -> torch.Tensor:
        """(T, n) bool over the given cells (or cells [0, n)): True where token t may attend."""
        c = self.cells
        pos = c.pos[:n] if cells is None else c.pos[cells]
        seq = c.seq[:n] if cells is None else c.seq[cells]
        vis = seq[:, ub.seq_host].T  # the cell belongs to the token's sequence (T, n)
        vis &= pos[None, :] <= ub.pos_host[:, None]  # causal; empty cells have no sequence
        if self.n_swa > 0:
            vis &= (ub.pos_host[:, None] - pos[None, :]) < self.n_swa
        return torch.from_numpy(vis).to(self.device)

    def _attn_inputs(self, il: int, view: CellView):
        if isinstance(view.cells, slice):
            ks, vs = self.k[il][view.cells], self.v[il][view.cells]
        else:
            ks = self.k[il].index_select(0, view.cells.to(self.k[il].device))
            vs = self.v[il].index_select(0, view.cells.to(self.v[il].device))
        k, v = self.decode(ks, vs)
        return [AttnInput(None, k, v, view.mask)]

    def _kv_storage(self, il: int, view: CellView) -> KVStorage | None:
        if not self.raw[il]:
            return None
        return KVStorage(self.k[il], self.v[il], *self._view_places(view))

    def _kv_stack(self, n_layer: int, view: CellView) -> KVStack | None:
        # the K and V lists as they are (every layer's storage, allocated once): a decode step of a 30-layer model
        # asked 30 layers one by one before, ~3 us each with the caches just flushed by the weights' stream
        if not self.stackable or n_layer != self.n_layers:
            return super()._kv_stack(n_layer, view)
        return KVStack(self.k, self.v, *self._view_places(view))

    def _view_places(self, view: CellView) -> tuple:
        """view.places(), once per ubatch: every layer (and the stack) asks for the same view's."""
        if self._places[0] is not view:
            self._places = (view, view.places())
        return self._places[1]

    # -- K-shift -------------------------------------------------------------------------------
    def update(self) -> None:
        c = self.cells
        if not c.has_shift:
            return
        idx = np.flatnonzero((c.shift != 0) & (c.pos >= 0))
        if len(idx):
            delta = torch.from_numpy(c.shift[idx])
            for k in self.k:
                it = torch.from_numpy(idx).to(k.device)
                k.index_copy_(0, it, self.rotate_rows(k.index_select(0, it), delta))
        c.reset_shift()

    # -- sequence operations -------------------------------------------------------------------
    def clear(self, data: bool = True) -> None:
        self.cells = KVCells(self.size, self.n_seq_max)
        self._after_clear()
        if data:
            for t in self.k + self.v:
                t.zero_()

    def _after_clear(self) -> None:
        pass

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        if seq_id >= 0:
            self.check_seq_ids([seq_id])
        p0, p1 = norm_range(p0, p1)
        seqs = list(range(self.n_seq_max)) if seq_id < 0 else [seq_id]
        freed = self.cells.seq_rm(seq_id, p0, p1)
        self._after_rm(freed, seqs)
        return True

    def seq_cp(self, seq_src: int, seq_dst: int, p0: int = -1, p1: int = -1) -> None:
        if seq_src == seq_dst:
            return
        self.check_seq_ids([seq_src, seq_dst])
        p0, p1 = norm_range(p0, p1)
        self.cells.seq_cp(seq_src, seq_dst, p0, p1)
        self._after_cp(seq_dst)

    def seq_keep(self, seq_id: int) -> None:
        self.check_seq_ids([seq_id])
        freed = self.cells.seq_keep(seq_id)
        self._after_rm(freed, [s for s in range(self.n_seq_max) if s != seq_id])

    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        self.check_seq_ids([seq_id])
        p0, p1 = norm_range(p0, p1)
        if shift == 0 or p0 == p1:
            return
        freed = self.cells.seq_add(seq_id, p0, p1, shift)
        # a cell pushed below 0 is freed for all its owners (it may be shared)
        self._after_rm(freed, list(range(self.n_seq_max)) if freed.any() else [seq_id])

    def seq_pos_min(self, seq_id: int) -> int:
        return self.cells.seq_pos_min(seq_id)

    def seq_pos_max(self, seq_id: int) -> int:
        return self.cells.seq_pos_max(seq_id)

    # -- state ---------------------------------------------------------------------------------
    def _import_fits(self, st, seq_id) -> bool:
        """Place every import group in the bookkeeping only (plan + commit, never _apply), then undo."""
        snap = self._snapshot()
        try:
            for s, idx in self._import_groups(st, seq_id):
                b = Batch()
                for t in idx:
                    b.add(0, int(st.pos[t]), s)
                ubs = b.split(max(len(b), 1), self.device)
                plans = self._prepare(ubs)
                if plans is None:
                    return False
                for plan, ub in zip(plans, ubs):
                    self._commit(plan, ub)
            return True
        finally:
            self._restore(snap)

    def _export(self, seq_id):
        c = self.cells
        m = (c.pos >= 0) if seq_id is None else c.seq[:, seq_id]
        idx = np.flatnonzero(m)
        idx = idx[np.argsort(c.pos[idx], kind="stable")]
        seqs = [np.flatnonzero(c.seq[i]).astype(np.int32) for i in idx]
        it = torch.from_numpy(idx)
        k = [self._row_bytes(t, it) for t in self.k]
        v = [self._row_bytes(t, it) for t in self.v]
        return c.pos[idx].astype(np.int32), seqs, k, v

    @staticmethod
    def _row_bytes(t: torch.Tensor, idx: torch.Tensor) -> bytes:
        rows = t.index_select(0, idx.to(t.device)).cpu().contiguous()
        return rows.view(torch.uint8).numpy().tobytes()

    # -- accounting ----------------------------------------------------------------------------
    def _reserved_rows_by_layer(self):
        return [(self.size, self.size)] * self.n_layers

    def usage(self) -> tuple[int, int]:
        return self.cells.used * self.bytes_per_token, self.size * self.bytes_per_token

    def _stats(self, **extra) -> MemoryStats:
        c = self.cells
        used = c.used
        n_free, run = c.free_runs()
        fields = dict(
            reserved_bytes=sum(self.memory_breakdown().values()),
            live_bytes=used * self.bytes_per_token,
            n_cells=self.size,
            used_cells=used,
            seq_tokens=int(c.seq.sum()),
            n_kv=self.n_kv_last,
            free_cells=n_free,
            largest_free_run=run,
            n_seqs=int(c.seq.any(axis=0).sum()),
            alloc_calls=self.alloc_calls,
            alloc_calls_last_step=self.alloc_calls_last_step,
            reserved_peak_bytes=self.size * self.bytes_per_token,  # allocated once, never more
        )
        fields.update(extra)
        return MemoryStats(**fields)
