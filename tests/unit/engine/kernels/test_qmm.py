"""engine.kernels against gguf.quants (nobody here wrote it) and against float64 arithmetic.

Every bound is derived from the operations the kernel performs (u = 2**-24, float32's unit roundoff):

* ``dequant`` rounds each weight as gguf.quants does (qmm.cpp, ``madd``): equal bit for bit, and
  its bf16 output is that float32 value rounded to nearest even, as torch's ``.to(bfloat16)``.
* ``qmm(act="q8")`` for quantized W first quantizes x per 32 values (d = max|x|/127, q = round(x/d)); the
  test repeats that step with the same float32 operations, so both sides multiply the same x'.
  What is left is float32 accumulation: per 32-value group an exact integer dot (|sum| < 2**24),
  one rounded scale product and one fused multiply-add into one of two chains per lane, then
  8 lanes summed and the minimum terms added. That is at most G + 8 roundings along any path
  (G = K/32 groups), each of relative size u, of terms bounded by |x'| (|w| + 2 |mn|) (the kernel
  adds s*q and mn separately, with |s*q| <= |w| + |mn|): |err| <= (G + 8) u sum_k |x'_k| (|w_k| + 2|mn_k|).
* ``qmm(act="q16")``: x as 16-bit fixed point per 32 values, X = round(x * (32512 / max|x|)) moved one
  unit up where X + 128 is a multiple of 256, x' = X * (max|x| / 32512); the test repeats that step. The
  kernel dots (w - mn) with x' in integers (exact), and mn with float sums of x per 16 values, or, where mn is
  an integer offset of the scale (Q4_0's -8 d on the AVX-512 path), with x' inside the integer dot: the
  reference takes x, and the bound adds |x' - x| @ |mn| for that choice. Float32 part:
  per group a conversion of the integer dot (|q X| can pass 2^24), one scale product and one FMA into a
  chain (G along a path), lanes summed (4 steps for 16 lanes, plus 2 for the chains); the minima add
  15 roundings per 16-value sum and 2 per group along the scalar chain: |err| <= (2 G + 24) u
  (|x'| @ |w - mn| + |x| @ |mn|).
* F32/F16/BF16 W: x is not quantized; chains of K/8/4 FMAs, then 4 + 3 additions: (K/8 + 8) u |x| @ |W|.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from engine import kernels

U = 2.0**-24
TYPES = sorted(kernels.KERNEL_TYPES, key=int)
QTYPES = sorted(kernels.QUANTIZED, key=int)
# Bytes of a block that hold scales and minima; every other byte holds quant bits.
HEADER = {T.Q8_0: [(0, 2)], T.Q4_0: [(0, 2)], T.Q4_1: [(0, 4)], T.Q5_0: [(0, 2)], T.Q5_1: [(0, 4)],
          T.Q4_K: [(0, 16)], T.Q5_K: [(0, 16)], T.Q6_K: [(192, 210)]}
F16_FIELDS = {T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q4_K: [0, 2],
              T.Q5_K: [0, 2], T.Q6_K: [208]}


def random_weights(t: T, n: int, k: int, seed: int = 0) -> np.ndarray:
    """(n, row_bytes) uint8: every quant bit random (all nibble and high-bit patterns occur), scales and
    minima random finite f16 in [-0.05, 0.05]; F16/BF16 from normal values."""
    rng = np.random.default_rng(seed)
    if t in (T.F16, T.BF16):
        w = rng.standard_normal((n, k)).astype(np.float32)
        return (w.astype(np.float16).view(np.uint8) if t == T.F16 else gq.quantize(w, T.BF16).view(np.uint8)).reshape(n, -1)
    block, size = GGML_QUANT_SIZES[t]
    raw = rng.integers(0, 256, (n, k // block * size), dtype=np.uint8)
    blocks = raw.reshape(n, -1, size)
    for off in F16_FIELDS[t]:
        vals = rng.uniform(-0.05, 0.05, blocks.shape[:2]).astype(np.float16)
        blocks[..., off:off + 2] = vals.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return raw


def reference(t: T, raw: np.ndarray, k: int) -> torch.Tensor:
    if t == T.F16:
        return torch.from_numpy(raw.view(np.float16).astype(np.float32)).reshape(-1, k)
    return torch.from_numpy(gq.dequantize(raw, t)).reshape(-1, k)


def minima(t: T, raw: np.ndarray, k: int) -> torch.Tensor:
    """mn per weight: the block dequantized with every quant bit zeroed (w = s*0 + mn)."""
    if t not in HEADER:
        return torch.zeros(raw.shape[0], k)
    _, size = GGML_QUANT_SIZES[t]
    z = np.zeros_like(raw).reshape(raw.shape[0], -1, size)
    src = raw.reshape(z.shape)
    for a, b in HEADER[t]:
        z[..., a:b] = src[..., a:b]
    return reference(t, z.reshape(raw.shape), k)


def quantize_x(x: torch.Tensor) -> torch.Tensor:
    """The kernel's activation step in the same float32 operations: d = amax/127, q = round(x * (1/d))."""
    xb = x.view(x.shape[0], -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return (torch.round(xb * inv) * d).view_as(x)


def test_kernels_are_built():
    """The README's install builds the C++ kernels; a silent fallback would make every fast-mode figure wrong."""
    assert kernels.backend().startswith("native"), (
        "engine/kernels/_qmm is not built: install with `pip install --no-build-isolation -e .` after torch")


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
def test_dequant_equals_gguf(t, bf16):
    n, k = 37, 512
    raw = random_weights(t, n, k, seed=int(t))
    ref = reference(t, raw, k)
    data = torch.from_numpy(raw.reshape(-1).copy())
    got = kernels.dequant(data, t, n, k, bf16=bf16)
    want = ref.to(torch.bfloat16) if bf16 else ref
    assert got.dtype == want.dtype and torch.equal(got, want)
    rows = torch.tensor([5, 0, 36, 5])
    assert torch.equal(kernels.dequant(data, t, n, k, rows=rows), ref[rows])


@pytest.mark.parametrize("t", QTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9, 16])
def test_qmm_int8_activations(t, m):
    n, k = 37, 512
    raw = random_weights(t, n, k, seed=int(t))
    w, mn = reference(t, raw, k).double(), minima(t, raw, k).double()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    x[0, :32] = 0  # an all-zero block: scale 0, no division by it
    got = kernels.qmm(x, torch.from_numpy(raw.reshape(-1).copy()), t, n, k, act="q8").double()
    xq = quantize_x(x).double()
    want = xq @ w.t()
    bound = (k // 32 + 8) * U * (xq.abs() @ (w.abs() + 2 * mn.abs()).t())
    assert (got - want).abs().le(bound).all(), ((got - want).abs() / bound).max().item()


def quantize_x16(x: torch.Tensor) -> torch.Tensor:
    """The kernel's q16 step in the same float32 operations (qmm.cpp, quantize16_rows)."""
    xb = x.view(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax == 0, torch.zeros_like(amax), torch.tensor(32512.0) / amax)
    X = torch.round(xb * inv).clamp(-32512, 32512)
    X = torch.where((X + 128).remainder(256) == 0, X + 1, X)
    return (X.double() * (amax / 32512).double()).view(x.shape)


@pytest.mark.parametrize("t", QTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9, 16])
@pytest.mark.parametrize("blocks", [16, 3], ids=["even", "odd"])
def test_qmm_q16_activations(t, m, blocks):
    """odd: three blocks, so the AVX-512 path's last 32-weight block runs alone."""
    n, k = 37, blocks * GGML_QUANT_SIZES[t][0]
    raw = random_weights(t, n, k, seed=int(t))
    w, mn = reference(t, raw, k).double(), minima(t, raw, k).double()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    x[0, :32] = 0  # an all-zero block: scale 0, no division by it
    x[-1, 32:64] *= 1e3  # one block far larger than the rest: its own scale
    got = kernels.qmm(x, torch.from_numpy(raw.reshape(-1).copy()), t, n, k, act="q16").double()
    x16, xd = quantize_x16(x), x.double()
    want = x16 @ (w - mn).t() + xd @ mn.t()
    bound = (2 * (k // 32) + 24) * U * (x16.abs() @ (w - mn).abs().t() + xd.abs() @ mn.abs().t()) \
        + (x16 - xd).abs() @ mn.abs().t()
    assert (got - want).abs().le(bound).all(), ((got - want).abs() / bound).max().item()
    # and what that costs against x itself: |x - x'| <= 1.5 max|x| / 32512 per value
    amax = x.view(m, -1, 32).abs().amax(-1, keepdim=True).expand(m, k // 32, 32).reshape(m, k).double()
    assert (x16 - xd).abs().le(1.5 * amax / 32512).all()


@pytest.mark.parametrize("t", QTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 2, 4, 5, 16])
def test_qmm_float_activations(t, m):
    """x as it is: per 32 values 4 products summed into 2 chains per lane, times the scale (one
    rounding each), accumulated over G groups, 8 lanes summed, minima added: (G + 12) u bound as above."""
    n, k = 37, 512
    raw = random_weights(t, n, k, seed=int(t))
    w, mn = reference(t, raw, k).double(), minima(t, raw, k).double()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).double()
    got = kernels.qmm(x.float(), torch.from_numpy(raw.reshape(-1).copy()), t, n, k).double()
    want = x @ w.t()
    bound = (k // 32 + 12) * U * (x.abs() @ (w.abs() + 2 * mn.abs()).t())
    assert (got - want).abs().le(bound).all(), ((got - want).abs() / bound).max().item()


X16_TYPES = sorted(kernels.X16, key=int)


@pytest.mark.parametrize("t", X16_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("k", [512, 480])  # blocks a row: even (Q4_0 / Q8_0 tile-blocks all in pairs), odd (one alone)
def test_x16_layout_keeps_every_weight(t, k):
    """Interleaving 16 rows only moves bytes: dequantized, every row equals gguf.quants' bit for bit."""
    n = 48
    raw = random_weights(t, n, k, seed=int(t))
    ref = reference(t, raw, k)
    x16 = kernels.repack_x16(torch.from_numpy(raw.reshape(-1).copy()), t, n, k)
    assert x16.numel() == raw.size
    assert torch.equal(kernels.dequant(x16, kernels.X16[t], n, k), ref)
    assert torch.equal(kernels.dequant(x16, kernels.X16[t], n, k, bf16=True), ref.to(torch.bfloat16))
    rows = torch.tensor([47, 0, 17, 16, 17])
    assert torch.equal(kernels.dequant(x16, kernels.X16[t], n, k, rows=rows), ref[rows])


@pytest.mark.parametrize("t", X16_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 2, 4, 5, 16])
@pytest.mark.parametrize("act", ["q8", "q16", "f32"])
@pytest.mark.parametrize("k", [512, 480])
def test_qmm_x16(t, m, act, k):
    """The interleaved kernel (AVX-512 VNNI; elsewhere each row is put back in the file's order and the
    row-major kernels run) against float64 on the same quantized activations. Float32 part, per block: the
    exact integer dot converted (one rounding), one scale product, one FMA into the tile's accumulator, and for
    Q4_1 one more FMA of the minima with the block's activation sum (itself 2 roundings of float sums of 16): a
    chain of 2G FMAs, no lane sums. So the row-major tests' bounds hold with 2G in place of G."""
    n = 48
    G = k // 32
    raw = random_weights(t, n, k, seed=int(t))
    w, mn = reference(t, raw, k).double(), minima(t, raw, k).double()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    x[0, :32] = 0  # an all-zero block: scale 0, no division by it
    x[-1, 32:64] *= 1e3  # one block far larger than the rest: its own scale
    data = kernels.repack_x16(torch.from_numpy(raw.reshape(-1).copy()), t, n, k)
    got = kernels.qmm(x, data, kernels.X16[t], n, k, act).double()
    if act == "q8":
        xq = quantize_x(x).double()
        want, bound = xq @ w.t(), (2 * G + 8) * U * (xq.abs() @ (w.abs() + 2 * mn.abs()).t())
    elif act == "q16":
        x16, xd = quantize_x16(x), x.double()
        want = x16 @ (w - mn).t() + xd @ mn.t()
        bound = (2 * (2 * G) + 24) * U * (x16.abs() @ (w - mn).abs().t() + xd.abs() @ mn.abs().t()) \
            + (x16 - xd).abs() @ mn.abs().t()
    else:  # float32 activations read each row back in the file's order: the row-major result, bit for bit
        xd = x.double()
        want, bound = xd @ w.t(), (G + 12) * U * (xd.abs() @ (w.abs() + 2 * mn.abs()).t())
        row_major = kernels.qmm(x, torch.from_numpy(raw.reshape(-1).copy()), t, n, k, act).double()
        assert torch.equal(got, row_major)
    assert (got - want).abs().le(bound).all(), ((got - want).abs() / bound).max().item()


@pytest.mark.parametrize("t", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 3, 4, 16])
def test_qmm_float_weights(t, m):
    n, k = 37, 520  # not a multiple of 32: the scalar tail runs too
    if t == T.F32:
        raw = np.random.default_rng(3).standard_normal((n, k)).astype(np.float32).view(np.uint8)
        w = torch.from_numpy(raw.view(np.float32)).double()
    else:
        raw = random_weights(t, n, k, seed=3)
        w = reference(t, raw, k).double()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    got = kernels.qmm(x, torch.from_numpy(raw.reshape(-1).copy()), t, n, k).double()
    want = x.double() @ w.t()
    bound = (k // 8 + 8) * U * (x.double().abs() @ w.abs().t())
    assert (got - want).abs().le(bound).all()


def test_fallback_is_exact_float32(monkeypatch):
    """Without the extension: dequantization is gguf's own, the product an ordinary float32 GEMM
    (K-term dot products: (K + 2) u |x| @ |W|)."""
    monkeypatch.setattr(kernels, "_load", lambda: False)
    assert kernels.backend() == "torch"
    n, k = 21, 256
    for t in TYPES:
        raw = random_weights(t, n, k, seed=7)
        data = torch.from_numpy(raw.reshape(-1).copy())
        ref = reference(t, raw, k)
        assert torch.equal(kernels.dequant(data, t, n, k), ref)
        assert torch.equal(kernels.dequant(data, t, n, k, rows=torch.tensor([3, 3])), ref[[3, 3]])
        x = torch.randn(3, k)
        got = kernels.qmm(x, data, t, n, k).double()
        want = x.double() @ ref.double().t()
        assert (got - want).abs().le((k + 2) * U * (x.double().abs() @ ref.double().abs().t())).all(), t.name


def test_bad_shapes_are_refused():
    raw = torch.from_numpy(random_weights(T.Q4_0, 4, 64).reshape(-1).copy())
    with pytest.raises(RuntimeError, match="bytes do not hold"):
        kernels.qmm(torch.randn(1, 64), raw, T.Q4_0, 5, 64)
    with pytest.raises(RuntimeError, match=r"x must be \(M, 64\)"):
        kernels.qmm(torch.randn(1, 32), raw, T.Q4_0, 4, 64)
    with pytest.raises(RuntimeError, match="out of"):
        kernels.dequant(raw, T.Q4_0, 4, 64, rows=torch.tensor([4]))


def test_rms_norm_is_rounded_once_per_step():
    """Sum of squares in double, then 1/sqrt(mean + eps) in float32 (mean, add, sqrt, divide: 4 roundings),
    x * scale and * w (2 more): |y - y64| <= 6 u |y| + the double sum's own error (negligible)."""
    x = torch.randn(7, 576, generator=torch.Generator().manual_seed(0)) * 3
    w = torch.rand(576, generator=torch.Generator().manual_seed(1)) + 0.5
    got = kernels.rms_norm(x, w, 1e-5).double()
    x64 = x.double()
    want = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert (got - want).abs().le(6 * U * want.abs() + 1e-30).all()


@pytest.mark.parametrize("neox", [False, True])
def test_rope_equals_the_torch_expression(neox):
    """The native op does the layer's float32 operations (x0*cos - x1*sin, x0*sin + x1*cos) in the same
    order, on a strided view (q sliced out of the fused qkv), so the results are equal bit for bit."""
    from engine.config import ModelConfig
    from engine.model.layers import Rope

    cfg = ModelConfig(arch="llama", n_vocab=10, n_embd=256, n_layer=1, n_head=4, n_head_kv=4, n_ff=8,
                      n_rot=48, rope_type="neox" if neox else "norm")
    rope = Rope(cfg)
    qkv = torch.randn(5, 3 * 256)
    x = qkv[:, :256].view(5, 4, 64)  # (T, H, D), not contiguous
    cs = rope.angles(torch.tensor([0, 3, 7, 100, 4095]), torch.float32)
    want = rope.apply(x, cs)
    rope.fused = True
    assert torch.equal(rope.apply(x, cs), want)
