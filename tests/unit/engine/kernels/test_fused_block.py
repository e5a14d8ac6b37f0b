"""engine.kernels' fused decode ops (attn_qkv, ffn_block) against the unfused ops they replace.

No tolerance: the fused ops run the same operations in the same order as the module path (this file's
rms_norm, qmm, rope and silu_mul ops, float32 adds), and every matmul output row is computed by
one thread whatever the split, so the results must be equal bit for bit. The interleaved (x16) layout is
checked against the row-major kernels in test_qmm.py; here it is one more storage the ops must accept.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from engine import kernels
from tests.unit.engine.kernels.test_qmm import random_weights

pytestmark = pytest.mark.skipif(not kernels.fused_available(), reason="the fused ops are native only")

E, NFF = 256, 512  # n_embd and n_ff: whole blocks of every type (K-quants: 256), whole x16 tiles
H, HKV, D = 4, 2, 64


def weight(t: T, n: int, k: int, seed: int, x16: bool = False) -> tuple[torch.Tensor, int]:
    """(bytes, kernel type) of a random (n, k) matrix of type t, row-major or interleaved."""
    data = torch.from_numpy(random_weights(t, n, k, seed=seed).reshape(-1).copy())
    if x16:
        return kernels.repack_x16(data, t, n, k), kernels.X16[t]
    return data, int(t)


def mm(x: torch.Tensor, w: tuple[torch.Tensor, int], n: int) -> torch.Tensor:
    return kernels.qmm(x, w[0], w[1], n, x.shape[1], "q16")


LAYOUTS = [(T.F16, False), (T.Q8_0, False), (T.Q4_0, False), (T.Q4_0, True), (T.Q4_1, True), (T.Q4_K, False),
           (T.BF16, False)]
IDS = [f"{t.name}{'-x16' if x else ''}" for t, x in LAYOUTS]


@pytest.mark.parametrize("t, x16", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("bias, neox", [(False, False), (True, True)], ids=["llama", "qwen2"])
def test_attn_qkv_equals_the_unfused_ops(t, x16, m, bias, neox):
    gen = torch.Generator().manual_seed(m)
    n = (H + 2 * HKV) * D
    x, nw = torch.randn(m, E, generator=gen), torch.rand(E, generator=gen) + 0.5
    w = weight(t, n, E, seed=int(t), x16=x16)
    b = torch.randn(n, generator=gen) if bias else None
    theta = torch.arange(m, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, D, 2) / D)
    cs = (theta.cos().float()[:, None, :], theta.sin().float()[:, None, :])

    y = mm(kernels.rms_norm(x, nw, 1e-5), w, n)
    if b is not None:
        y = y + b
    q, k, v = y.split([H * D, HKV * D, HKV * D], dim=-1)
    want = (kernels.rope(q.view(m, H, D), *cs, neox), kernels.rope(k.view(m, HKV, D), *cs, neox), v.view(m, HKV, D))
    got = kernels.attn_qkv(x, nw, 1e-5, [(*w, n)], b, cs, neox, H, HKV, D, D, "q16")
    for g, e in zip(got, want, strict=True):
        assert g.shape == e.shape and torch.equal(g, e)
    no_rope = kernels.attn_qkv(x, nw, 1e-5, [(*w, n)], b, None, neox, H, HKV, D, D, "q16")
    assert torch.equal(no_rope[0], q.reshape(m, H, D)) and torch.equal(no_rope[1], k.reshape(m, HKV, D))


@pytest.mark.parametrize("m", [1, 3])
def test_attn_qkv_takes_parts_of_mixed_types(m):
    """A Q4_K_M file's q and k are Q4_K and its v Q6_K: they stay separate matrices (a CatWeight), and the op
    takes them as parts of one pass, cut by rows: an x16 part is split only at whole tiles whichever thread
    takes it. Equal to the parts' products side by side."""
    gen = torch.Generator().manual_seed(40 + m)
    x, nw = torch.randn(m, E, generator=gen), torch.rand(E, generator=gen) + 0.5
    parts = [(*weight(T.Q4_0, H * D, E, 1, x16=True), H * D), (*weight(T.Q4_K, HKV * D, E, 2), HKV * D),
             (*weight(T.Q6_K, HKV * D, E, 3), HKV * D)]
    xn = kernels.rms_norm(x, nw, 1e-5)
    y = torch.cat([mm(xn, (p[0], p[1]), p[2]) for p in parts], dim=-1)
    got = kernels.attn_qkv(x, nw, 1e-5, parts, None, None, False, H, HKV, D, D, "q16")
    assert torch.equal(torch.cat([g.reshape(m, -1) for g in got], dim=-1), y)
    with pytest.raises(RuntimeError, match="q, k and v need"):
        kernels.attn_qkv(x, nw, 1e-5, parts[:2], None, None, False, H, HKV, D, D, "q16")


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_attn_qkv_cuts_interleaved_parts_at_whole_tiles(threads):
    """Parts whose boundaries fall anywhere: an x16 part of 176 rows (11 tiles) between 40-row parts, N = 256 rows
    split across 2-4 threads, so thread boundaries fall inside a tile (row 128 is row 88 of the x16 part)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(threads)
        x, nw = torch.randn(2, E, generator=gen), torch.ones(E)
        parts = [(*weight(T.Q6_K, 40, E, 1), 40), (*weight(T.Q4_0, 176, E, 2, x16=True), 176),
                 (*weight(T.Q8_0, 40, E, 3), 40)]
        y = torch.cat([mm(kernels.rms_norm(x, nw, 1e-5), (p[0], p[1]), p[2]) for p in parts], dim=-1)
        got = kernels.attn_qkv(x, nw, 1e-5, parts, None, None, False, 2, 1, D, D, "q16")
        assert torch.equal(torch.cat([g.reshape(2, -1) for g in got], dim=-1), y)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("t, x16", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("m", [1, 2, 5, 16])
def test_ffn_block_equals_the_unfused_ops(t, x16, m):
    gen = torch.Generator().manual_seed(100 + m)
    x, a = torch.randn(m, E, generator=gen), torch.randn(m, H * D, generator=gen)
    nw = torch.rand(E, generator=gen) + 0.5
    wo, w1, w3 = (weight(t, E, H * D, 1, x16), weight(t, NFF, E, 2, x16), weight(t, NFF, E, 3, x16))
    w2 = weight(t, E, NFF, 4, x16)

    h = x + mm(a, wo, E)
    hn = kernels.rms_norm(h, nw, 1e-5)
    want = h + mm(kernels.silu_mul(mm(hn, w1, NFF), mm(hn, w3, NFF)), w2, E)
    got = kernels.ffn_block(x, a, wo, nw, 1e-5, w1, w3, w2, NFF, "q16")
    assert torch.equal(got, want)


def test_ffn_block_with_mixed_types():
    """A Q4_K_M file mixes types inside a block (Q6_K down, Q4_K gate/up): gate and up still share one pass."""
    gen = torch.Generator().manual_seed(7)
    x, a, nw = torch.randn(2, E, generator=gen), torch.randn(2, H * D, generator=gen), torch.ones(E)
    wo, w1 = weight(T.Q8_0, E, H * D, 1), weight(T.Q4_K, NFF, E, 2)
    w3, w2 = weight(T.Q4_0, NFF, E, 3, x16=True), weight(T.Q6_K, E, NFF, 4)
    h = x + mm(a, wo, E)
    hn = kernels.rms_norm(h, nw, 1e-5)
    want = h + mm(kernels.silu_mul(mm(hn, w1, NFF), mm(hn, w3, NFF)), w2, E)
    assert torch.equal(kernels.ffn_block(x, a, wo, nw, 1e-5, w1, w3, w2, NFF, "q16"), want)


@pytest.mark.parametrize("n", [1, 7, 8, 2816, 2821])
def test_silu_mul_is_within_its_roundings_of_float64(n):
    """silu(g) * u as g / (1 + exp(-g)) * u in float32 (u = 2**-24): exp within 1 ulp (2 u relative: SLEEF's u10 on
    8-lane blocks, std::exp on the tail), the sum 1 + e, the division and the product one rounding each. 1 + e
    carries e's error at most in full (e / (1 + e) <= 1), so the result is within 5 u of silu(g) u relative, to
    first order; 6 u covers the second. Where exp(-g) overflows (g < -88) the float result is -0 against a true
    value under 1e-36 in size: an absolute 1e-30 allows that."""
    gen = torch.Generator().manual_seed(n)
    g = torch.randn(n, generator=gen) * 8
    g[: min(n, 3)] = torch.tensor([-100.0, 100.0, 0.0])[: min(n, 3)]
    u = torch.randn(n, generator=gen)
    got = kernels.silu_mul(g, u).double()
    gd, ud = g.double(), u.double()
    want = gd / (1 + torch.exp(-gd)) * ud
    assert (got - want).abs().le(6 * 2.0**-24 * want.abs() + 1e-30).all()


def test_interleaving_needs_whole_tiles():
    data = torch.from_numpy(np.zeros(24 * 18 * 8, dtype=np.uint8))
    with pytest.raises(RuntimeError, match="n % 16"):
        kernels.repack_x16(data, T.Q4_0, 24, 256)
