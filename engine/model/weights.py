"""Weight matrices as the model consumes them: ``y = x @ W^T`` and row lookup, whatever W's storage.

Two compute modes (``compute=exact|fast``), chosen at load:

* ``exact``: every matrix dequantized to float32 (``DenseWeight``), float32 GEMMs. The parity
  reference against HF transformers and llama.cpp's logits; the default of ``kvbench logits``.
* ``fast``: matrices keep their GGUF bytes (``PackedWeight``, one copy, the file's size). Up to
  ``MAX_QMM_ROWS`` rows (decode) go through engine.kernels.qmm with ``DECODE_ACT`` activations:
  16-bit fixed point per 32 values, dotted in integers (two int8 halves). Larger batches (prefill)
  dequantize W to bf16 for the call and run torch's bf16 GEMM with bf16 activations.
  Why q16 and not llama.cpp's int8 activations (``act="q8"``): on SmolLM2 and real text int8 costs
  5x the KL divergence of the bf16 path (3.7e-3 vs 7e-4); q16 keeps 2^-14 of each block's range,
  for nearly int8's speed. Why not float32 activations (``act="f32"``): the widening costs more
  instructions per weight than the integer dots. docs/engine.md has the measurements.
  F16 and BF16 matrices stay as they are; F32 stays F32; any other type (Q2_K, Q3_K, IQ*)
  is dequantized at load to bf16 (``DenseWeight``) -- see engine.kernels.KERNEL_TYPES.

Norms, rope, attention and the KV cache run in float32 in both modes (the cache has its own
types): the modes differ only in the matmuls.
"""

from __future__ import annotations

import ctypes
import functools
import mmap

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from torch import nn

from engine import kernels
from engine.errors import ConfigError

COMPUTE_MODES = ("exact", "fast")


def check_compute(compute: str) -> str:
    if compute not in COMPUTE_MODES:
        raise ConfigError(f"compute {compute!r}: expected one of {', '.join(COMPUTE_MODES)}")
    return compute


class Weight(nn.Module):
    """A (n, k) matrix. ``forward(x)``: x (M, k) -> (M, n) in x's float type or float32."""

    n: int
    k: int
    ggml_type: str  # storage as GGUF names it ("F32", "Q4_0" ...)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows idx (R,) as (R, k) in the storage's float type (float32 for packed blocks): the embedding lookup."""
        raise NotImplementedError

    def native(self) -> tuple[torch.Tensor, T] | None:
        """(bytes, GGUF type) that engine.kernels' fused decode ops read as they are, with ``DECODE_ACT``
        activations where the type is quantized; None where this matrix must go through ``forward``."""
        return None

    def native_parts(self) -> list[tuple[torch.Tensor, T | int, int]] | None:
        """The matrix as parts stacked along n, (bytes, type, rows) each, for ops that take parts (the fused q/k/v);
        None where any part must go through ``forward``."""
        nat = self.native()
        return None if nat is None else [(*nat, self.n)]

    def dense(self) -> torch.Tensor:
        """The whole matrix as float32 (n, k), for the few consumers that need a plain tensor."""
        return self.rows(torch.arange(self.n)).float()

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers())


class DenseWeight(Weight):
    """A torch tensor in f32, f16 or bf16.

    Exact mode (``fast=False``): float32 (or the tensor's dtype) GEMMs in the shape (F.linear, or
    mm(W, x^T)) that ``kernels.autotune`` timed faster in this run's own calls, per row count (per
    power-of-two bucket above MAX_QMM_ROWS: mm(W, x^T) was 0-40% faster at 32-128 rows here). Fast mode: F32 also has engine.kernels' float32 GEMV among those candidates (it streamed
    llama-small's F32 matrices 2.5x faster than MKL's GEMV here); F16/BF16 go through the kernel
    (widened in registers, float32 sums) at small batches and bf16 GEMM at large ones."""

    def __init__(self, w: torch.Tensor, ggml_type: str | None = None, fast: bool = False) -> None:
        super().__init__()
        self.register_buffer("w", w)  # (n, k)
        self.n, self.k = int(w.shape[0]), int(w.shape[1])
        self.ggml_type = ggml_type or {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[w.dtype]
        self.fast = fast
        self._pick: dict[int, object] = {}  # rows -> the implementation kernels.autotune chose for this shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._buffers["w"]  # not self.w: Module.__getattr__ costs a microsecond a call at decode
        m = x.shape[0]
        if w.device.type != "cpu":
            return F.linear(x.to(w.dtype), w).to(x.dtype)
        if w.dtype == x.dtype:  # exact mode, or an F32 matrix in fast mode
            small = m <= kernels.MAX_QMM_ROWS
            rows = m if small else 1 << (m - 1).bit_length()  # prefill sizes tuned by power-of-two bucket
            f = self._pick.get(rows)
            if f is not None:
                return f(x, w)
            fns = _FAST_F32 if small and self.fast and w.dtype == torch.float32 else _GEMM_SHAPES
            y, f = kernels.autotune((self.n, self.k, rows, w.dtype, len(fns)), fns, x, w)
            if f is not None:
                self._pick[rows] = f
            return y
        # fast mode: f16/bf16 matrices, float32 activations
        if m <= kernels.MAX_QMM_ROWS:
            return kernels.qmm(x, w.view(-1).view(torch.uint8), _TYPES[w.dtype], self.n, self.k)
        if w.dtype == torch.float16:  # bf16 for this call only: the kernel's conversion (the same rounding, to
            # nearest even) took 0.16 ms for a 2816x1024 matrix where torch's .to(bfloat16) took 1.4, against 2.0 for
            # the 128-row GEMM that follows
            w = kernels.dequant(w.view(-1).view(torch.uint8), T.F16, self.n, self.k, bf16=True)
        return F.linear(x.to(torch.bfloat16), w).to(x.dtype)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.w)

    def native(self) -> tuple[torch.Tensor, T] | None:
        # F16/BF16 in fast mode: forward() sends small batches to the kernel anyway. F32 is left out: which of
        # MKL's GEMV or the kernel serves it is the autotuner's per-machine choice.
        w = self._buffers["w"]
        if self.fast and w.device.type == "cpu" and w.dtype in (torch.float16, torch.bfloat16):
            return w.view(-1).view(torch.uint8), _TYPES[w.dtype]
        return None


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def _mm_t(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """mm(W, x^T)^T: MKL's GEMM with the weights as the left operand (one row padded to two: GEMM, not GEMV)."""
    if x.shape[0] == 1:
        return torch.mm(w, torch.cat((x, x)).t()).t()[:1]
    return torch.mm(w, x.t()).t()


def _gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return kernels.qmm(x, w.view(-1).view(torch.uint8), T.F32, w.shape[0], w.shape[1])


_GEMM_SHAPES = (_linear, _mm_t)
_FAST_F32 = (_linear, _mm_t, _gemv)

_TYPES = {torch.float32: T.F32, torch.float16: T.F16, torch.bfloat16: T.BF16}
DECODE_ACT = "q16"  # how PackedWeight's decode path takes activations (engine.kernels.ACTIVATIONS)


class PackedWeight(Weight):
    """GGUF blocks as a flat uint8 buffer: row after row (a view of the file's bytes when mapped), or, after
    ``interleave()``, 16 rows at a time (engine.kernels.X16: the same bytes rearranged, as llama.cpp repacks
    Q4_0 for its CPU kernels). ``qtype`` stays the file's type; ``ktype`` is the layout the kernels are told."""

    def __init__(self, data: torch.Tensor, ggml_type: T, n: int, k: int) -> None:
        super().__init__()
        if ggml_type not in kernels.KERNEL_TYPES:
            raise ConfigError(f"no packed kernel for {ggml_type.name}")
        if data.dtype != torch.uint8 or data.numel() != n * kernels.row_bytes(ggml_type, k):
            raise ConfigError(f"{ggml_type.name} weight ({n}, {k}): {data.numel()} bytes do not hold its blocks")
        self.register_buffer("data", data.view(-1))
        self.qtype = ggml_type
        self.ktype: T | int = ggml_type
        self.n, self.k, self.ggml_type = n, k, ggml_type.name

    def interleavable(self) -> bool:
        """Whether interleave() would rearrange these blocks: Q4_0 / Q4_1 / Q8_0, whole tiles, a build with the kernel."""
        return self.ktype in kernels.X16 and self.n % 16 == 0 and kernels.x16_available()

    def interleave(self, out: torch.Tensor | None = None) -> bool:
        """Rearrange Q4_0 / Q4_1 / Q8_0 blocks 16 rows at a time where the build has that kernel: decode reads 16 rows per
        instruction (engine/kernels/qmm.cpp, "x16"). A copy (into ``out`` where given), so never on a mapped file's
        pages; says whether it did."""
        if not self.interleavable():
            return False
        self.data = kernels.repack_x16(self.data, self.qtype, self.n, self.k, out)
        self.ktype = kernels.X16[self.qtype]
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= kernels.MAX_QMM_ROWS:
            return kernels.qmm(x, self.data, self.ktype, self.n, self.k, DECODE_ACT)
        w = kernels.dequant(self.data, self.ktype, self.n, self.k, bf16=True)  # (n, k) for this call only
        return F.linear(x.to(torch.bfloat16), w).float()

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return kernels.dequant(self.data, self.ktype, self.n, self.k, rows=idx)

    def native(self) -> tuple[torch.Tensor, T | int] | None:
        return (self.data, self.ktype) if self.data.device.type == "cpu" else None

    def move_to(self, buf: torch.Tensor) -> None:
        """Keep the blocks in ``buf`` (uint8, data's size) from now on, interleaved on the way where they can be."""
        if not self.interleave(buf):
            self.data = buf.copy_(self.data)


class CatWeight(Weight):
    """Matrices stacked along n that cannot share one buffer (different types, or views of a mapped
    file): one call per part, outputs concatenated."""

    def __init__(self, parts: list[Weight]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.n, self.k = sum(p.n for p in parts), parts[0].k
        self.ggml_type = "+".join(dict.fromkeys(p.ggml_type for p in parts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)

    def native_parts(self) -> list[tuple[torch.Tensor, T | int, int]] | None:
        parts = [p.native_parts() for p in self.parts]
        return None if any(p is None for p in parts) else [q for p in parts for q in p]

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.dense() for p in self.parts])[idx]


def cat_weights(parts: list[Weight], copy: bool = True) -> Weight:
    """One weight for parts stacked along n (fused q/k/v: one pass over x, one kernel call).

    Parts of one storage type become one buffer (a copy: ``copy=False`` keeps views of a mapped
    file apart instead); mixed types (a Q4_K_M file's Q6_K attn_v beside Q4_K attn_q) stay a
    ``CatWeight``."""
    first = parts[0]
    if copy and all(isinstance(p, DenseWeight) for p in parts) and len({(p.w.dtype, p.fast) for p in parts}) == 1:
        return DenseWeight(torch.cat([p.w for p in parts]), first.ggml_type, first.fast)
    if copy and all(isinstance(p, PackedWeight) and p.ktype == p.qtype == first.qtype and p.k == first.k
                    for p in parts):
        return PackedWeight(torch.cat([p.data for p in parts]), first.qtype, sum(p.n for p in parts), first.k)
    return CatWeight(parts)


HUGE_PAGE = 2 << 20  # x86-64's transparent huge page
HAS_HUGE_PAGES = hasattr(mmap, "MADV_HUGEPAGE")  # the OS takes the advice (Linux)


def huge_page_buffer(nbytes: int) -> torch.Tensor | None:
    """nbytes of fresh memory (uint8, zero) starting on a 2 MiB boundary, which the kernel is asked to back with
    transparent huge pages (madvise MADV_HUGEPAGE: the "madvise" THP setting most distributions ship only gives
    them to memory that asks); None where the OS has no such advice. The tensor keeps the mapping alive."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or nbytes <= 0:
        return None
    # private and anonymous (a shared mapping is shmem, whose THP setting is another), untouched: no page exists yet
    try:
        m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:  # no address space for it (a ulimit -v): the matrices stay where they are
        return None
    try:
        m.madvise(advice)
    except OSError:  # a kernel built without THP
        m.close()
        return None
    t = torch.frombuffer(m, dtype=torch.uint8)
    off = -t.data_ptr() % HUGE_PAGE
    return t[off:off + nbytes]


def place_in_huge_pages(weights: list[PackedWeight]) -> int:
    """Move packed matrices (fast mode on the CPU) into one buffer of transparent huge pages, interleaving their
    blocks on the way (PackedWeight.move_to), one matrix at a time: each old copy is freed and its pages handed
    back to the OS as its bytes move (malloc_trim: glibc keeps freed heap chunks mapped; without it the peak RSS
    of loading llama-small Q4_0 was 331 MB instead of 320, the same as before the move). Returns the bytes moved
    (0 where huge pages are not available: then nothing moves, and the caller interleaves in place).

    Why: decode streams every matrix once per step. With 4 KiB pages that is a TLB miss and a page walk every
    4 KiB (13,500 a llama-small Q4_0 step, where the L2 TLB holds 3,072); with 2 MiB pages, 28. In-process A/B,
    two copies of the model loaded either way, 8 alternating rounds of 64 steps: a Q4_0 step 0.92x the time
    and Q8_0 0.92x (every round faster), SmolLM2 0.94x (7 rounds of 8). F16/BF16/F32 rows are left where the
    reader put them: numpy already asks huge pages for arrays of 4 MiB and more (115 of llama-small F16's 203
    MiB, 297 of F32's 407), and moving the rest gave no clear change. llama.cpp's buffers here are all 4 KiB pages
    (its process's AnonHugePages and FilePmdMapped are 0)."""
    mats = [w for w in dict.fromkeys(weights) if w.data.device.type == "cpu"]
    align = 64  # every matrix starts on a cache line
    total = sum(-(-w.data.nbytes // align) * align for w in mats)
    arena = huge_page_buffer(total)
    if arena is None:
        return 0
    off = 0
    for w in mats:
        n = w.data.nbytes
        w.move_to(arena[off:off + n])
        off += -(-n // align) * align
        _release_freed()
    return off


def _release_freed() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim, which also releases whole free pages inside
    the heap); nothing where the C library has no such call."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(None)
