"""KV memory: what every allocator shares, whatever the place its rows live.

``KVCache`` implements the ``Memory`` protocol for attention layers. Subclasses decide where a
token's K/V rows live and how attention finds them:

- ``engine.alloc.pooled.PooledKV``: llama.cpp's cell pool (one tensor per layer, find_slot).
- ``engine.alloc.paged.PagedKV``: vLLM's blocks (free-block queue, block tables, ref counts).
- ``engine.alloc.naive.NaiveKV``: per-sequence tensors that grow as tokens arrive.

Shared here: cache element types (codecs), storage tiers, the batch protocol (``init_batch`` is
a dry run over every ubatch; ``apply`` commits one), the state file, stats and breakdowns.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import BinaryIO

import numpy as np
import torch

from engine.batch import Batch
from engine.config import ModelConfig
from engine.errors import ConfigError, MemoryFullError, StateFileError, UnsupportedError
from engine.memory.base import (
    AttnInput,
    BatchContext,
    KVStack,
    KVStorage,
    MemoryStats,
    MemoryStatus,
    Rotary,
)
from engine.memory.codecs import CACHE_TYPES, Codec, check_row, get_codec
from engine.memory.layered import LayeredMemory
from engine.memory.state import read_state, write_state
from engine.memory.tiers import tier_of_layer

GROWTH = ("cat", "double")


@dataclass(frozen=True)
class CacheSpec:
    """How a KV memory is laid out. Field names are the harness's ``cache.*`` keys."""

    allocator: str = "pooled"
    size: int = 0  # cells (tokens) in total; 0 = the model's n_ctx_train
    block_size: int = 16  # paged: tokens per block
    type_k: str = "f32"
    type_v: str = "f32"
    offload: str = "device"  # device | host | disk
    offload_layers: int = 0  # with host/disk: the first N layers stay on the device
    n_seq_max: int = 1  # sequence ids must be in [0, n_seq_max)
    growth: str = "cat"  # naive: cat (HF DynamicCache) | double (capacity doubling)
    n_pad: int = 1  # pooled: n_kv padded to a multiple of this
    # llama.cpp's attention rotation: with a quantized K (V) type and head size a multiple of 64, rows are
    # rotated by an orthonormal Walsh-Hadamard matrix before they are quantized and back after they are read
    attn_rot: bool = True

    def resolve(self, cfg: ModelConfig) -> CacheSpec:
        """Fill defaults from the model and validate; errors name the config key."""
        s = self if self.size else replace(self, size=cfg.n_ctx_train)
        if s.size <= 0:
            raise ConfigError(f"cache.size {s.size}: must be positive")
        if s.n_seq_max <= 0:
            raise ConfigError(f"parallel / n_seq_max {s.n_seq_max}: must be positive")
        if s.allocator == "paged":
            if s.block_size <= 0:
                raise ConfigError(f"cache.block_size {s.block_size}: must be positive")
            if s.size % s.block_size:
                raise ConfigError(f"cache.block_size {s.block_size} does not divide cache.size {s.size}; "
                                  f"use a size that is a multiple of the block size")
        if s.growth not in GROWTH:
            raise ConfigError(f"cache.growth {s.growth!r}: expected one of {', '.join(GROWTH)}")
        if s.n_pad <= 0:
            raise ConfigError(f"cache.n_pad {s.n_pad}: must be positive")
        for key in ("type_k", "type_v"):
            if getattr(s, key) not in CACHE_TYPES:
                raise ConfigError(f"cache.{key} {getattr(s, key)!r}: expected one of {', '.join(CACHE_TYPES)}")
            codec = get_codec(getattr(s, key))
            n = cfg.n_embd_k_gqa if key == "type_k" else cfg.n_embd_v_gqa
            check_row(codec, n, f"cache.{key}")
        tier_of_layer(0, s.offload, s.offload_layers)  # validates offload and offload_layers
        return s


def hadamard(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The n x n orthonormal Walsh-Hadamard matrix (n a power of two): symmetric, its own inverse."""
    return _hadamard(n, dtype, torch.device(device))


@functools.lru_cache(maxsize=32)
def _hadamard(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # built once per (size, dtype, device): every read of a rotated cache multiplies by it, every layer, every step
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:  # Sylvester: [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype=dtype, device=device)


def rotation_blocks(cfg: ModelConfig, spec: CacheSpec) -> tuple[int, int]:
    """(K, V) rotation block sizes, 0 for none, as llama.cpp chooses them (llama-kv-cache.cpp, attn_rot_k/v):
    only for a quantized type and a head size that is a multiple of 64; K uses the largest power of two that
    divides the head size, V always 64."""
    if not spec.attn_rot:
        return 0, 0
    k = 0
    if get_codec(spec.type_k).block_size > 1 and cfg.n_embd_head_k and cfg.n_embd_head_k % 64 == 0:
        k = 64
        while cfg.n_embd_head_k % (k * 2) == 0:
            k *= 2
    v = 64 if get_codec(spec.type_v).block_size > 1 and cfg.n_embd_head_v and cfg.n_embd_head_v % 64 == 0 else 0
    return k, v


class KVCache(LayeredMemory):
    def __init__(self, cfg: ModelConfig, spec: CacheSpec, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, rope: Rotary | None = None, layers: list[int] | None = None) -> None:
        spec = spec.resolve(cfg)
        if any(cfg.swa_layers) and not all(cfg.swa_layers):
            raise UnsupportedError("models that mix sliding-window and full-attention layers are not supported yet")
        super().__init__(cfg, spec, device, layers)
        self.size = spec.size
        self.dtype = dtype  # compute dtype: what attention reads
        self.rope = rope  # for K-shift (seq_add)
        self.n_swa = cfg.n_swa if cfg.swa_layers and all(cfg.swa_layers) else 0
        self.codec_k, self.codec_v = get_codec(spec.type_k), get_codec(spec.type_v)
        self.row_bytes_k = self.codec_k.row_bytes(cfg.n_embd_k_gqa)
        self.row_bytes_v = self.codec_v.row_bytes(cfg.n_embd_v_gqa)
        self.rot_k, self.rot_v = rotation_blocks(cfg, spec)

    # -- llama.cpp's attention rotation ----------------------------------------------------------
    # A quantized cache type loses most where a few channels carry outliers. An orthonormal Hadamard
    # rotation spreads every block of values over all of them before quantization, and since H = H^T =
    # H^-1, rotating a row back after it is read gives the same attention as llama.cpp's, which rotates
    # Q (and the attention output for V) instead: (HQ)^T (HK) = Q^T K.
    def _rotate(self, x: torch.Tensor, n: int) -> torch.Tensor:
        if not n:
            return x
        shape = x.shape
        return (x.reshape(-1, n) @ hadamard(n, x.dtype, x.device)).reshape(shape)

    # -- shared helpers ------------------------------------------------------------------------
    def empty_rows(self, i: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Storage for n K rows and n V rows of slot i, on that layer's tier (one allocation each)."""
        t = self.tier(i)
        k = t.empty((n, self.codec_k.row_elems(self.cfg.n_embd_k_gqa)), self.codec_k.storage_dtype)
        v = t.empty((n, self.codec_v.row_elems(self.cfg.n_embd_v_gqa)), self.codec_v.storage_dtype)
        return k, v

    @property
    def bytes_per_token(self) -> int:
        return self.n_layers * (self.row_bytes_k + self.row_bytes_v)

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, n_head_kv, d) K and V -> storage rows (T, row_elems)."""
        T = k.shape[0]
        k, v = self._rotate(k.reshape(T, -1), self.rot_k), self._rotate(v.reshape(T, -1), self.rot_v)
        return self.codec_k.encode(k), self.codec_v.encode(v)

    def decode(self, ks: torch.Tensor, vs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Storage rows -> (n, n_head_kv, d) K and V on the compute device: float storage (f32, f16, bf16) as it
        is, quantized storage dequantized to the compute dtype (AttnInput: attention widens float storage itself,
        in registers on the CPU; converting every cached row each step first cost more than the attention)."""
        c = self.cfg
        k = self._read(self.codec_k, ks, self.rot_k)
        v = self._read(self.codec_v, vs, self.rot_v)
        return k.view(-1, c.n_head_kv, c.n_embd_head_k), v.view(-1, c.n_head_kv, c.n_embd_head_v)

    def _read(self, codec: Codec, s: torch.Tensor, rot: torch.Tensor | None) -> torch.Tensor:
        s = s.to(self.device, non_blocking=True)
        if rot is None and codec.block_size == 1:
            return s
        return self._rotate(codec.decode(s, self.dtype), rot)

    def rotate_rows(self, ks: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """K storage rows re-rotated by position deltas (K-shift): rope(p) then rope(d) = rope(p + d)."""
        assert self.rope is not None, "K-shift needs the model's rope"
        c = self.cfg
        k = self._rotate(self.codec_k.decode(ks.to(self.device), torch.float32), self.rot_k)
        cs = self.rope.angles(delta.to(self.device), torch.float32)
        k = self.rope.apply(k.view(-1, c.n_head_kv, c.n_embd_head_k), cs).reshape(len(k), -1)
        return self.codec_k.encode(self._rotate(k, self.rot_k)).to(ks.device)

    # -- the batch protocol: seq_cp of [0, n) shares exactly those positions (shares_partial_prefix) --
    # Subclass hooks beyond LayeredMemory's (_prepare, _apply): _store and _attn_inputs.
    def _store(self, il: int, view, k: torch.Tensor, v: torch.Tensor) -> None:
        raise NotImplementedError

    def _attn_inputs(self, il: int, view) -> list[AttnInput]:
        raise NotImplementedError

    def _kv_storage(self, il: int, view) -> KVStorage | None:
        """Slot il's storage with the view's places, where a native op may store and read it directly (base.py
        KVStorage); None by default: store and attn_inputs."""
        return None

    def _kv_stack(self, n_layer: int, view) -> KVStack | None:
        """Layers [0, n_layer)' storage at shared places (KVStack), where every one of them has a KVStorage and
        all of those share the view's places; else None."""
        kv = [self._kv_storage(self.slot[il], view) if il in self.slot else None for il in range(n_layer)]
        if any(s is None for s in kv):
            return None
        first = kv[0]
        if not all(_same_places(first, s) for s in kv[1:]):
            return None
        return KVStack([s.k for s in kv], [s.v for s in kv], *first[2:])

    # -- accounting ----------------------------------------------------------------------------
    def memory_breakdown(self) -> dict[str, int]:
        """Bytes the KV store holds from its allocator, by buffer and tier ("k.device", "v.disk", ...)."""
        out: dict[str, int] = {}
        for il, (kb, vb) in enumerate(self._reserved_rows_by_layer()):
            t = self.layer_tier[il]
            out[f"k.{t}"] = out.get(f"k.{t}", 0) + kb * self.row_bytes_k
            out[f"v.{t}"] = out.get(f"v.{t}", 0) + vb * self.row_bytes_v
        return out

    def parts(self):
        return self, None

    def usage(self) -> tuple[int, int]:
        """(live_bytes, reserved_bytes), cheap enough to call every step (stats() is the full picture)."""
        raise NotImplementedError

    def _reserved_rows_by_layer(self) -> list[tuple[int, int]]:
        """(K rows, V rows) reserved per layer."""
        raise NotImplementedError

    def stats(self) -> MemoryStats:
        raise NotImplementedError

    # -- state ---------------------------------------------------------------------------------
    def _state_header(self, seq_id: int | None) -> dict:
        c = self.cfg
        return {
            "arch": c.arch, "model": c.name, "n_layer": self.n_layers, "layers": self.layers,
            "n_embd_k_gqa": c.n_embd_k_gqa,
            "n_embd_v_gqa": c.n_embd_v_gqa, "n_swa": self.n_swa, "rope_type": c.rope_type,
            "rope_freq_base": c.rope_freq_base, "rope_freq_scale": c.rope_freq_scale,
            "type_k": self.spec.type_k, "type_v": self.spec.type_v,
            "row_bytes_k": self.row_bytes_k, "row_bytes_v": self.row_bytes_v, "seq_id": seq_id,
            "rot_k": self.rot_k, "rot_v": self.rot_v,
            "written_by": self.kind,
        }

    # what must match between a state file and the memory restoring it
    _STATE_KEYS = ("arch", "model", "n_layer", "layers", "n_embd_k_gqa", "n_embd_v_gqa", "n_swa", "rope_type",
                   "rope_freq_base", "rope_freq_scale", "type_k", "type_v", "row_bytes_k", "row_bytes_v", "rot_k",
                   "rot_v")

    def state_write(self, f: BinaryIO, seq_id: int | None = None) -> None:
        """Write the whole memory (seq_id None) or one sequence's tokens."""
        self.update()  # a pending K-shift must reach the rows before they are written
        pos, seqs, k, v = self._export(seq_id)
        if seq_id is not None:
            seqs = [np.asarray([seq_id], np.int32) for _ in seqs]
        write_state(f, self._state_header(seq_id), pos, seqs, k, v)

    def state_read(self, f: BinaryIO, seq_id: int | None = None, source: str = "state") -> None:
        """Restore the whole memory (seq_id None) or one sequence into seq_id.

        Everything is checked before anything changes; a failure raises StateFileError and
        leaves the memory as it was.
        """
        st = read_state(f, source)
        h = st.header
        mine = self._state_header(None)
        for key in self._STATE_KEYS:
            if h.get(key) != mine[key]:
                raise StateFileError(
                    f"{source}: saved with {key} = {h.get(key)!r}, this memory has {mine[key]!r}; "
                    "restore into a memory of the same model and cache types"
                )
        if seq_id is None:
            ids = np.concatenate(st.seqs) if st.seqs else np.zeros(0, np.int32)
            if len(ids) and ids.max() >= self.n_seq_max:
                raise StateFileError(f"{source}: holds sequence id {int(ids.max())}, this memory allows "
                                     f"[0, {self.n_seq_max}); raise parallel / n_seq_max")
        else:
            if not 0 <= seq_id < self.n_seq_max:
                raise StateFileError(f"{source}: cannot restore into sequence {seq_id}, this memory allows "
                                     f"[0, {self.n_seq_max})")
            owners = {int(s[0]) for s in st.seqs}
            if any(len(s) != 1 for s in st.seqs) or len(owners) > 1:
                raise StateFileError(f"{source}: holds {len(owners)} sequences; a single-sequence restore needs "
                                     "a state of one sequence (save it with seq_id)")
        # Check that everything fits by placing it in the bookkeeping only; no row is written
        # until it does, so a failure leaves K/V data and bookkeeping exactly as they were.
        self.update()
        snap = self._snapshot()
        self._reset_for_import(seq_id)
        fits = self._import_fits(st, seq_id)
        if not fits:
            self._restore(snap)
            raise StateFileError(f"{source}: does not fit: {len(st.pos)} tokens, "
                                 f"{self.stats().free_cells} cells free after making room; raise cache.size")
        self._import(st, seq_id)

    def _reset_for_import(self, seq_id: int | None) -> None:
        if seq_id is None:
            self.clear(data=False)
        else:
            self.seq_rm(seq_id, -1, -1)

    def _import_groups(self, st, seq_id: int | None) -> list[tuple[int, np.ndarray]]:
        """(sequence, token indices sorted by position): each token under its lowest owner."""
        owners = np.asarray([int(s.min()) if seq_id is None else seq_id for s in st.seqs], dtype=np.int64)
        order = np.lexsort((st.pos, owners)) if len(owners) else np.zeros(0, np.int64)
        groups = []
        for s in dict.fromkeys(owners[order].tolist()):
            groups.append((s, order[owners[order] == s]))
        return groups

    def _import_fits(self, st, seq_id: int | None) -> bool:
        """Would the state's tokens fit, given what the memory holds now? (no side effects)"""
        raise NotImplementedError

    def _import(self, st, seq_id: int | None) -> None:
        """Place the state's tokens and write their rows: each token under its lowest owner,
        then shared with the other owners through seq_cp (so sharing survives a round trip)."""
        rows_k = [self._rows_from_bytes(b, self.codec_k, self.cfg.n_embd_k_gqa) for b in st.k]
        rows_v = [self._rows_from_bytes(b, self.codec_v, self.cfg.n_embd_v_gqa) for b in st.v]
        for s, idx in self._import_groups(st, seq_id):
            b = Batch()
            for t in idx:
                b.add(0, int(st.pos[t]), s)
            it = torch.from_numpy(idx)
            self._place_rows(b, [rk[it] for rk in rows_k], [rv[it] for rv in rows_v])
        if seq_id is None:
            for t, owner_set in enumerate(st.seqs):
                lowest = int(owner_set.min())
                for o in owner_set:
                    if o != lowest:
                        self.seq_cp(lowest, int(o), int(st.pos[t]), int(st.pos[t]) + 1)

    @staticmethod
    def _rows_from_bytes(b: bytes, codec, n_values: int) -> torch.Tensor:
        elems = codec.row_elems(n_values)
        t = torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.zeros(0, dtype=torch.uint8)
        return t.view(codec.storage_dtype).view(-1, elems) if len(t) else torch.zeros(0, elems, dtype=codec.storage_dtype)

    def _place_rows(self, batch: Batch, rows_k: list[torch.Tensor], rows_v: list[torch.Tensor]) -> None:
        """Reserve room for batch's tokens (one ubatch) and write given storage rows instead of computing them."""
        ctx = self.init_batch(batch, max(len(batch), 1))
        if ctx.status is not MemoryStatus.SUCCESS:
            raise MemoryFullError(f"no room for {len(batch)} tokens of sequence {batch.seq_id[0]}")
        ctx.apply()
        for i in range(self.n_layers):
            self._store_rows(i, ctx.view, rows_k[i], rows_v[i])

    def _store_rows(self, il: int, view, ks: torch.Tensor, vs: torch.Tensor) -> None:
        raise NotImplementedError

    def _export(self, seq_id: int | None) -> tuple[np.ndarray, list[np.ndarray], list[bytes], list[bytes]]:
        raise NotImplementedError

    def _snapshot(self):
        raise NotImplementedError

    def _restore(self, snap) -> None:
        raise NotImplementedError


class KVContext(BatchContext):
    """A batch's view of a KV memory; the model's layer index maps to the memory's storage slot."""

    @property
    def cache(self) -> KVCache:
        return self.mem

    def store(self, il: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cache._store(self.cache.slot[il], self.view, k, v)

    def attn_inputs(self, il: int) -> list[AttnInput]:
        return self.cache._attn_inputs(self.cache.slot[il], self.view)

    def kv_storage(self, il: int) -> KVStorage | None:
        return self.cache._kv_storage(self.cache.slot[il], self.view)

    def kv_stack(self, n_layer: int) -> KVStack | None:
        return self.cache._kv_stack(n_layer, self.view)


def _same_places(a: KVStorage, b: KVStorage) -> bool:
    """Whether two layers' storage is written and read at the same places (one ubatch's view)."""
    return a.slots is b.slots and a.cells is b.cells and a.mask is b.mask and a.slot0 == b.slot0 and a.n_kv == b.n_kv


KVCache.context = KVContext  # the view a KV cache hands to the model (defined after both)
