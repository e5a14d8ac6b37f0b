"""llama.cpp's unified KV cache: one pre-allocated K and one V tensor per layer, ``size`` cells.

Design (after src/llama-kv-cache.cpp):
- ``find_slot`` collects free cells for a ubatch scanning from a head pointer (restarting at 0
  when plenty of cells below the head are free, to keep the used range compact). Slots need
  not be contiguous: tokens are scattered into cells by index.
- On sliding-window models a cell owned by one sequence whose position the sequence's next
  token can no longer see is reusable; overwriting it also drops that sequence's older
  positions, so each sequence stays gap-free.
- Attention spans cells ``[0, n_kv)``, ``n_kv`` = highest used cell + 1 (padded to ``n_pad``):
  holes below it cost compute as well as memory. A mask hides other sequences' cells, future
  positions and, on SWA layers, positions outside the window.
- ``init_batch`` is a dry run over all ubatches (snapshot, place, restore): a batch that does
  not fit leaves the cache exactly as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.memory.base import MemoryStats, MemoryStatus, norm_range
from engine.memory.cells import KVCells
from engine.model.config import ModelConfig
from engine.model.layers import AttnInput, Rope
from engine.runtime.batch import Batch, UBatch


class KVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        size: int,
        n_seq_max: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        rope: Rope | None = None,
        n_pad: int = 1,
    ) -> None:
        assert size > 0 and n_seq_max > 0 and n_pad > 0
        self.cfg = cfg
        self.size = size
        self.n_pad = n_pad
        self.dtype = dtype
        self.device = torch.device(device)
        self.rope = rope  # needed only for K-shift (seq_add)
        # One window for the whole cache: kvbench's SWA architectures window every layer.
        self.n_swa = cfg.n_swa if all(cfg.swa_layers) else 0
        self.cells = KVCells(size, n_seq_max)
        self.head = 0
        self.k = [torch.zeros(size, cfg.n_embd_k_gqa, dtype=dtype, device=self.device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(size, cfg.n_embd_v_gqa, dtype=dtype, device=self.device) for _ in range(cfg.n_layer)]
        self.alloc_calls = 2 * cfg.n_layer
        self.alloc_calls_last_step = 0

    # -- slots ---------------------------------------------------------------------------------
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

    def find_slot(self, ub: UBatch) -> np.ndarray | None:
        """Cells for the ubatch's tokens, in scan order from head; None if they do not fit."""
        n = ub.n_tokens
        if n > self.size:
            return None
        head = self.head
        if head > self.cells.used + 2 * n:
            head = 0
        order = np.concatenate((np.arange(head, self.size), np.arange(0, head)))
        cand = order[self._usable()[order]]
        return cand[:n] if len(cand) >= n else None

    def apply_ubatch(self, idxs: np.ndarray, ub: UBatch) -> None:
        c = self.cells
        taken = idxs[c.pos[idxs] >= 0]  # only SWA-masked cells can be occupied here
        max_rm: dict[int, int] = {}
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
        p = self.n_pad
        return min(self.size, max(p, -(-self.cells.used_max_p1() // p) * p))

    def init_batch(self, batch: Batch, n_ubatch: int) -> KVCacheContext:
        self.update()
        ubatches = batch.split(n_ubatch, self.device)
        snap, head = self.cells.snapshot(), self.head
        slots = []
        for ub in ubatches:
            idxs = self.find_slot(ub)
            if idxs is None:
                break
            self.apply_ubatch(idxs, ub)
            slots.append(idxs)
        self.cells.restore(snap)
        self.head = head
        if len(slots) < len(ubatches):
            return KVCacheContext(self, [], [], MemoryStatus.FAILED_PREPARE)
        return KVCacheContext(self, ubatches, slots, MemoryStatus.SUCCESS)

    def build_mask(self, ub: UBatch, n_kv: int) -> torch.Tensor:
        """(T, n_kv) bool, True where token t may attend cell j."""
        c = self.cells
        pos = c.pos[:n_kv]
        vis = c.seq[:n_kv][:, ub.seq_host].T  # cell belongs to the token's sequence (T, n_kv)
        vis &= pos[None, :] <= ub.pos_host[:, None]  # causal; empty cells have no sequence
        if self.n_swa > 0:
            vis &= (ub.pos_host[:, None] - pos[None, :]) < self.n_swa
        return torch.from_numpy(vis).to(self.device)

    # -- K-shift -------------------------------------------------------------------------------
    def update(self) -> None:
        """Re-rotate cached K of shifted cells (llama.cpp's K-shift): rope(p) then rope(d) = rope(p+d)."""
        c = self.cells
        if not c.has_shift:
            return
        assert self.rope is not None, "K-shift needs the model's rope"
        idx = np.flatnonzero((c.shift != 0) & (c.pos >= 0))
        if len(idx):
            it = torch.from_numpy(idx).to(self.device)
            cs = self.rope.angles(torch.from_numpy(c.shift[idx]).to(self.device), torch.float32)
            hk, d = self.cfg.n_head_kv, self.cfg.n_embd_head_k
            for k in self.k:
                rows = k.index_select(0, it).view(len(idx), hk, d).float()
                k.index_copy_(0, it, self.rope.apply(rows, cs).reshape(len(idx), -1).to(k.dtype))
        c.reset_shift()

    # -- sequence operations -------------------------------------------------------------------
    def _lower_head(self, freed: np.ndarray) -> None:
        nz = np.flatnonzero(freed)
        if len(nz) and nz[0] < self.head:
            self.head = int(nz[0])

    def clear(self, data: bool = True) -> None:
        self.cells = KVCells(self.size, self.cells.n_seq_max)
        self.head = 0
        if data:
            for t in self.k + self.v:
                t.zero_()

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        p0, p1 = norm_range(p0, p1)
        self._lower_head(self.cells.seq_rm(seq_id, p0, p1))
        return True

    def seq_cp(self, seq_src: int, seq_dst: int, p0: int = -1, p1: int = -1) -> None:
        if seq_src == seq_dst:
            return
        p0, p1 = norm_range(p0, p1)
        self.cells.seq_cp(seq_src, seq_dst, p0, p1)

    def seq_keep(self, seq_id: int) -> None:
        self._lower_head(self.cells.seq_keep(seq_id))

    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        p0, p1 = norm_range(p0, p1)
        if shift == 0 or p0 == p1:
            return
        freed = self.cells.seq_add(seq_id, p0, p1, shift)
        nz = np.flatnonzero(freed)
        self.head = int(nz[0]) if len(nz) else 0

    def seq_pos_min(self, seq_id: int) -> int:
        return self.cells.seq_pos_min(seq_id)

    def seq_pos_max(self, seq_id: int) -> int:
        return self.cells.seq_pos_max(seq_id)

    # -- accounting ----------------------------------------------------------------------------
    @property
    def bytes_per_cell(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.k + self.v)

    def memory_breakdown(self) -> dict[str, int]:
        tier = "device" if self.device.type != "cpu" else "host"
        return {
            f"k.{tier}": sum(t.numel() * t.element_size() for t in self.k),
            f"v.{tier}": sum(t.numel() * t.element_size() for t in self.v),
        }

    def stats(self) -> MemoryStats:
        c = self.cells
        used = c.used
        n_free, run = c.free_runs()
        return MemoryStats(
            reserved_bytes=sum(self.memory_breakdown().values()),
            live_bytes=used * self.bytes_per_cell,
            n_cells=self.size,
            used_cells=used,
            n_kv=self.n_kv(),
            free_cells=n_free,
            largest_free_run=run,
            n_seqs=int(c.seq.any(axis=0).sum()),
            alloc_calls=self.alloc_calls,
            alloc_calls_last_step=self.alloc_calls_last_step,
        )


@dataclass
class KVCacheContext:
    cache: KVCache
    ubatches: list[UBatch]
    slots: list[np.ndarray]
    status: MemoryStatus
    i: int = 0
    n_kv: int = 0
    mask: torch.Tensor | None = None
    idx: torch.Tensor | None = None
    span: slice | None = None  # set when the slot is one contiguous run: a plain copy

    @property
    def ubatch(self) -> UBatch:
        return self.ubatches[self.i]

    def apply(self) -> None:
        cache, ub, idxs = self.cache, self.ubatch, self.slots[self.i]
        cache.apply_ubatch(idxs, ub)
        cache.alloc_calls_last_step = 0
        self.n_kv = cache.n_kv()
        self.mask = cache.build_mask(ub, self.n_kv)
        i0 = int(idxs[0])
        if len(idxs) == 1 or (np.diff(idxs) == 1).all():
            self.span, self.idx = slice(i0, i0 + len(idxs)), None
        else:
            self.span, self.idx = None, torch.from_numpy(idxs).to(cache.device)

    def next(self) -> bool:
        self.i += 1
        return self.i < len(self.ubatches)

    def store(self, il: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k: (T, n_head_kv, d_k), v: (T, n_head_kv, d_v) -> the ubatch's cells of layer il."""
        T = k.shape[0]
        kc, vc = self.cache.k[il], self.cache.v[il]
        if self.span is not None:
            kc[self.span] = k.reshape(T, -1)
            vc[self.span] = v.reshape(T, -1)
        else:
            kc.index_copy_(0, self.idx, k.reshape(T, -1).to(kc.dtype))
            vc.index_copy_(0, self.idx, v.reshape(T, -1).to(vc.dtype))

    def attn_inputs(self, il: int) -> list[AttnInput]:
        cfg, n = self.cache.cfg, self.n_kv
        k = self.cache.k[il][:n].view(n, cfg.n_head_kv, cfg.n_embd_head_k)
        v = self.cache.v[il][:n].view(n, cfg.n_head_kv, cfg.n_embd_head_v)
        return [AttnInput(None, k, v, self.mask)]
