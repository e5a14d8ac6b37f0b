"""KV cache element types (llama.cpp's -ctk / -ctv): f32, f16, bf16, q8_0, q4_0.

Every cache row (one token of one layer: ``n_embd_k_gqa`` or ``n_embd_v_gqa`` values) is
stored with one :class:`Codec`:

- ``f32`` / ``f16`` / ``bf16``: one storage element per value; encoding is a dtype cast
  (round-to-nearest-even for f16 and bf16), decoding a cast back.
- ``q8_0`` / ``q4_0``: ggml's block layouts, stored as raw bytes (``torch.uint8``). A row is
  cut into blocks of 32 values; each block starts with its scale ``d`` as a little-endian
  fp16 (2 bytes), then:

  - q8_0 (34 bytes per block): 32 x int8 ``q``; value ``i`` = ``d * q[i]``.
    ``d = amax / 127`` where ``amax`` is the block's largest magnitude, ``q = roundf(x / d)``.
  - q4_0 (18 bytes per block): 16 bytes of nibbles; byte ``j`` holds value ``j`` in its low
    nibble and value ``j + 16`` in its high nibble; value = ``d * (nibble - 8)``.
    ``d = m / -8`` where ``m`` is the signed value of largest magnitude (first one on ties),
    nibble = ``trunc(x / d + 8.5)`` clipped to [0, 15].

  Sizes come from ``gguf.GGML_QUANT_SIZES``. Encode and decode replicate
  ``gguf.quants.quantize`` / ``gguf.quants.dequantize`` (and so ggml's reference
  ``quantize_row_q8_0_ref`` / ``quantize_row_q4_0_ref``) bit for bit, for finite inputs: the
  same float32 operations in the same order, ``1 / d`` as a true reciprocal (never a
  multiplication by a precomputed ``1/127``), the fp16 scale rounded to nearest even. Where
  ``1 / d`` overflows (a block whose largest magnitude is below ~1e-36; its fp16 scale is 0
  anyway) the quantized values are written as 0, which is what numpy's cast gives on x86.

Why decode happens per attention step: a quantized row cannot be fed to a matmul as it is.
Like ggml (whose attention kernels dequantize K/V blocks on the fly), the cache keeps only the
compact bytes - that is the point of a quantized cache, and what kvbench measures - and the
attention step decodes the ``[0, n_kv)`` cells it reads into a temporary float tensor that is
dropped after the step. Decoding is a few vectorized elementwise ops over the whole span (no
Python loops over rows or blocks) and runs on whatever device holds the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from engine.errors import ConfigError

CACHE_TYPES: dict[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0,
}


def bytes_per_value(cache_type: str) -> float:
    block, size = GGML_QUANT_SIZES[CACHE_TYPES[cache_type]]
    return size / block


@dataclass(frozen=True)
class Codec:
    """How one cache element type stores rows. This base class is the float (cast) codec."""

    name: str  # "f32" | "f16" | "bf16" | "q8_0" | "q4_0"
    ggml_type: GGMLQuantizationType
    storage_dtype: torch.dtype  # float32 / float16 / bfloat16 / uint8
    block_size: int  # values per block (1 for float types)
    type_size: int  # bytes per block

    # -- sizes ---------------------------------------------------------------------------------
    def row_elems(self, n_values: int) -> int:
        """Storage elements per row of ``n_values`` values (bytes for the uint8 types)."""
        check_row(self, n_values, "cache type")
        n_elems = n_values // self.block_size * self.type_size
        return n_elems // _itemsize(self.storage_dtype)

    def row_bytes(self, n_values: int) -> int:
        return self.row_elems(n_values) * _itemsize(self.storage_dtype)

    # -- encode / decode -----------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n_values) float rows -> (..., row_elems) ``storage_dtype``, on x's device (x itself where it
        already is that dtype: callers copy the rows into their storage)."""
        if self.block_size == 1:  # a float cast, one op: a decode step stores two rows per layer
            return x.to(self.storage_dtype)
        out = torch.empty(*x.shape[:-1], self.row_elems(x.shape[-1]), dtype=self.storage_dtype, device=x.device)
        self.encode_into(x, out)
        return out

    def encode_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Write ``encode(x)`` into ``out`` (any strided view of the right shape and dtype)."""
        self._check_out(x, out)
        if x.numel():
            self._encode_into(x, out)

    def decode(self, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(..., row_elems) storage -> (..., n_values) ``dtype``.

        When storage already is ``dtype`` (an f32 cache read in f32) this is ``s`` itself, not a
        copy: attention only reads it, and copying [0, n_kv) of every layer each step is what
        an f32 cache is chosen to avoid.
        """
        if s.dtype != self.storage_dtype:
            raise TypeError(f"{self.name} decode expects {self.storage_dtype} storage, got {s.dtype}")
        return self._decode(s, dtype)

    # -- per-type parts (float types here) -----------------------------------------------------
    def _encode_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(x)  # f32 -> f16 / bf16 casts round to nearest even

    def _decode(self, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return s if s.dtype == dtype else s.to(dtype)

    def _check_out(self, x: torch.Tensor, out: torch.Tensor) -> None:
        want = (*x.shape[:-1], self.row_elems(x.shape[-1]))
        if out.dtype != self.storage_dtype or tuple(out.shape) != want or out.device != x.device:
            raise ValueError(
                f"{self.name} encode_into needs a {self.storage_dtype} tensor of shape {want} on {x.device}, "
                f"got {out.dtype} {tuple(out.shape)} on {out.device}"
            )


@dataclass(frozen=True)
class _BlockCodec(Codec):
    """ggml block types: 32 values -> fp16 scale + packed quants, stored as uint8."""

    def _encode_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        lead, nb = x.shape[:-1], x.shape[-1] // self.block_size
        blocks = x.to(torch.float32).reshape(*lead, nb, self.block_size)
        d, qs = self._quantize_blocks(blocks)  # d: (..., nb, 1) float32, qs: (..., nb, type_size - 2) uint8
        out3 = out.view(*lead, nb, self.type_size)  # splitting the last dim is a view for any strides
        out3[..., :2].copy_(d.to(torch.float16).view(torch.uint8))
        out3[..., 2:].copy_(qs)

    def _decode(self, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if s.shape[-1] % self.type_size:
            raise ValueError(f"{self.name} rows are whole {self.type_size}-byte blocks, got {s.shape[-1]} bytes")
        lead, nb = s.shape[:-1], s.shape[-1] // self.type_size
        s3 = s.view(*lead, nb, self.type_size)
        d_bytes = s3[..., :2]
        try:
            d16 = d_bytes.view(torch.float16)  # no copy when strides/offset are even (cache rows are)
        except RuntimeError:
            d16 = d_bytes.contiguous().view(torch.float16)
        x = self._dequantize_blocks(d16.to(torch.float32), s3[..., 2:])
        x = x.reshape(*lead, nb * self.block_size)
        return x if dtype == torch.float32 else x.to(dtype)

    def _quantize_blocks(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _dequantize_blocks(self, d: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class _Q8_0(_BlockCodec):
    def _quantize_blocks(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = _div(blocks.abs().amax(dim=-1, keepdim=True), 127.0)
        q = _roundf(blocks * _inv(d))
        return d, _zero_nonfinite(q).to(torch.int8).view(torch.uint8)

    def _dequantize_blocks(self, d: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
        return qs.view(torch.int8).to(torch.float32).mul_(d)


@dataclass(frozen=True)
class _Q4_0(_BlockCodec):
    def _quantize_blocks(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        imax = blocks.abs().argmax(dim=-1, keepdim=True)  # first index on ties, like numpy
        d = _div(blocks.gather(-1, imax), -8.0)
        q = torch.trunc(blocks * _inv(d) + 8.5)
        q = _zero_nonfinite(q).clamp_(0, 15).to(torch.uint8)
        half = self.block_size // 2
        return d, q[..., :half] | (q[..., half:] << 4)

    def _dequantize_blocks(self, d: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).view(torch.int8).sub_(8)  # int8 in [-8, 7]
        return q.to(torch.float32).mul_(d)


# -- exact float32 helpers -----------------------------------------------------------------------
def _div(a: torch.Tensor, b: float) -> torch.Tensor:
    # A 0-dim tensor on a's device, not a Python scalar: CUDA turns ``a / scalar`` into
    # ``a * (1 / scalar)``, which is not bit-exact.
    return torch.div(a, torch.full((), b, dtype=a.dtype, device=a.device))


def _inv(d: torch.Tensor) -> torch.Tensor:
    """``1 / d`` where ``d != 0`` else 0 (as gguf/ggml)."""
    return torch.where(d == 0, torch.zeros_like(d), torch.reciprocal(d))


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` (half away from zero), computed like ``gguf.quants.np_roundf``."""
    a = x.abs()
    floored = a.floor()
    return x.sign() * (floored + (2 * (a - floored)).floor())


def _zero_nonfinite(q: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(q), q, torch.zeros_like(q))


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


_T = GGMLQuantizationType
_CODECS: dict[str, Codec] = {
    "f32": Codec("f32", _T.F32, torch.float32, 1, 4),
    "f16": Codec("f16", _T.F16, torch.float16, 1, 2),
    "bf16": Codec("bf16", _T.BF16, torch.bfloat16, 1, 2),
    "q8_0": _Q8_0("q8_0", _T.Q8_0, torch.uint8, *GGML_QUANT_SIZES[_T.Q8_0]),
    "q4_0": _Q4_0("q4_0", _T.Q4_0, torch.uint8, *GGML_QUANT_SIZES[_T.Q4_0]),
}
assert _CODECS.keys() == CACHE_TYPES.keys()


def get_codec(name: str) -> Codec:
    """The codec for a cache type name (``-ctk`` / ``-ctv`` spelling)."""
    codec = _CODECS.get(name)
    if codec is None:
        raise ConfigError(f"unknown KV cache type {name!r}; valid types are {', '.join(_CODECS)}")
    return codec


def check_row(codec: Codec, n_values: int, what: str) -> None:
    """ConfigError unless a row of ``n_values`` values splits into whole ``codec`` blocks."""
    if n_values <= 0 or n_values % codec.block_size:
        need = f"a multiple of {codec.block_size}" if codec.block_size > 1 else "at least 1 value"
        raise ConfigError(
            f"{what} {codec.name} needs rows that are {need}; layer row has {n_values} values "
            f"(use f16, bf16 or f32 for this model)"
        )
