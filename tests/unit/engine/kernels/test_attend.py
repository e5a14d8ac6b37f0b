"""engine.kernels.attend_small against float64 attention.

Bound, from the kernel's float32 operations (u = 2**-24): a score is a d-term dot in one 8-lane FMA chain (the
AVX2 path, d % 8 == 0: 8 keys' chains reduced together in 3 levels) or two (elsewhere), the lanes summed and the
scale applied: |ds| <= delta = (d/8 + 6) u scale sum_i |q_i k_i|. exp(s - max) is
within 2 ulp and the subtraction adds 1; the sum of n weights and the normalisation add (n + 2) u relative;
a score error delta moves a weight by at most 2 delta relative. The output accumulates n products w v with
one FMA each: (n + 1) u. So |y - y*| <= sum_j p_j |v_j| (2 delta + (2 n + 8) u).
With fewer than 4 work items (rows x KV heads x head groups), or n >= 2048 keys, a cache of n > 256 keys is attended
in nc = ceil(n / 256) chunks, merged: a weight is exp(s - m_c) (3 u), rescaled by exp(m_c - m) (3 u) over a sum of nc chunk sums
((nc + 1) u beyond the chunk's own) and the reciprocal's product (2 u); each chunk's output is a chain of at most
n FMAs, the merge one of nc: at most (2 n + 2 nc + 12) u. The bound below takes that for every n."""

import pytest
import torch

from engine import kernels

U = 2.0**-24


def reference(q, k, v, mask, scale, dot_roundings=None):
    """float64 attention, and the bound above per output value (``dot_roundings``: the roundings along a
    score's dot, d/8 + 6 for the kernel's 8-lane chains; d + 6 for a dot summed in any order)."""
    T, H, d = q.shape
    n, hkv, dv = v.shape
    g = H // hkv
    qd, kd, vd = q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = torch.einsum("thd,nhd->thn", qd, kd) * scale  # (T, H, n)
    sa = torch.einsum("thd,nhd->thn", qd.abs(), kd.abs()) * scale
    if mask is None:
        mask = torch.arange(n)[None, :] <= (n - T + torch.arange(T))[:, None]
    s = s.masked_fill(~mask[:, None, :], float("-inf"))
    p = torch.softmax(s, -1)
    y = torch.einsum("thn,nhd->thd", p, vd)
    delta = ((d / 8 + 6 if dot_roundings is None else dot_roundings) * U * sa.masked_fill(~mask[:, None, :], 0)).amax(-1, keepdim=True)
    nc = -(-n // 256)
    bound = torch.einsum("thn,nhd->thd", p, vd.abs()) * (2 * delta + (2 * n + 2 * nc + 12) * U)
    return y.reshape(T, -1), bound.reshape(T, -1)


@pytest.mark.parametrize("T, H, hkv, d, n", [(1, 9, 3, 64, 140), (4, 16, 16, 128, 37), (16, 8, 2, 64, 300),
                                             (2, 4, 1, 20, 5), (1, 9, 3, 64, 700), (2, 8, 1, 64, 600),
                                             # split by length (4 items or more): 9 and 8 chunks, a row's heads per chunk
                                             (1, 16, 4, 64, 2100), (3, 8, 2, 64, 2048), (1, 16, 4, 64, 2047)])
@pytest.mark.parametrize("masked", [False, True])
def test_attend_small_equals_float64_attention(T, H, hkv, d, n, masked):
    gen = torch.Generator().manual_seed(T * 1000 + n)
    q, k = torch.randn(T, H, d, generator=gen), torch.randn(n, hkv, d, generator=gen) * 3
    v = torch.randn(n, hkv, d + 8, generator=gen)
    mask = torch.rand(T, n, generator=gen) < 0.6 if masked else None
    if mask is not None:
        mask[:, 0] = True  # every row may attend something
    scale = d**-0.5
    got = kernels.attend_small(q, k, v, mask, scale).double()
    want, bound = reference(q, k, v, mask, scale)
    assert got.shape == want.shape
    assert (got - want).abs().le(bound).all(), ((got - want).abs() / bound).max().item()


def test_chunks_a_row_sees_nothing_of_or_one_key_in():
    """Split attention (2 rows x 1 KV head, 600 keys: 3 chunks) where row 0 sees only the last chunk's keys and row
    1 one key of the first chunk: chunks without a visible key add nothing to the merge, and a single visible key
    is its V row exactly (weight exp(0) = 1, sums of 1)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 3, 64, generator=g), torch.randn(600, 1, 64, generator=g), torch.randn(600, 1, 64, generator=g)
    mask = torch.zeros(2, 600, dtype=torch.bool)
    mask[0, 530:] = True
    mask[1, 5] = True
    got = kernels.attend_small(q, k, v, mask, 0.125)
    want, bound = reference(q[:1], k, v, mask[:1], 0.125)
    assert (got[:1].double() - want).abs().le(bound).all()
    assert torch.equal(got[1], v[5, 0].repeat(3))


def test_strided_cache_views_and_a_row_that_sees_nothing():
    """k and v as views of a larger cache (row stride > row length), and a fully masked row: zeros."""
    cache = torch.randn(50, 2, 2, 32)  # (cells, K/V, heads, d)
    k, v = cache[:20, 0], cache[:20, 1]
    q = torch.randn(2, 4, 32)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1] = False
    got = kernels.attend_small(q, k, v, mask, 0.2)
    want, bound = reference(q[:1], k, v, mask[:1], 0.2)
    assert (got[:1].double() - want).abs().le(bound).all()
    assert torch.equal(got[1], torch.zeros(4 * 32))


@pytest.mark.parametrize("masked", [False, True])
def test_the_torch_expression_off_the_native_build_agrees(monkeypatch, masked):
    """engine/model/layers.attend_small without the native op (GPUs, KVBENCH_KERNELS=torch): bmm, softmax, bmm in
    float32. BLAS may sum a score's d terms in any order: up to d - 1 roundings, so the bound takes d + 6."""
    from engine.memory.base import AttnInput
    from engine.model import layers

    gen = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(3, 8, 64, generator=gen), torch.randn(50, 2, 64, generator=gen), torch.randn(50, 2, 64, generator=gen)
    mask = torch.rand(3, 50, generator=gen) < 0.7 if masked else None
    if mask is not None:
        mask[:, 0] = True
    monkeypatch.setattr(kernels, "fused_available", lambda: False)
    got = layers.attend_small(q, AttnInput(None, k, v, mask), 0.125).double()
    want, bound = reference(q, k, v, mask, 0.125, dot_roundings=64 + 6)
    assert (got - want).abs().le(bound).all(), ((got - want).abs() / bound).max().item()


@pytest.mark.parametrize("H, hkv", [(8, 2), (9, 3), (12, 2), (14, 2), (5, 1), (16, 4)])
@pytest.mark.parametrize("n", [3, 37, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_heads_equal_their_one_head_per_kv_head_expansion(H, hkv, n, dtype):
    """Query heads that share a KV head are attended together (groups of 4, 3, 2 or 1: 4, 3, 6 = 3 + 3, 7 = 1 x 7
    heads a KV head here) with the same chains, roundings and weights as one head at a time: equal bit for bit to the
    same attention with K and V repeated per head (one head a KV head), masked or causal, past the prefetch distance.
    Two rows keep every layout here at 4 work items or more: one pass, no split (test_chunks_* covers the split)."""
    g = torch.Generator().manual_seed(H * 100 + n)
    T, d = 2, 64
    q = torch.randn(T, H, d, generator=g)
    k, v = (torch.randn(n, hkv, d, generator=g).to(dtype) for _ in range(2))
    mask = torch.rand(T, n, generator=g) < 0.6
    mask[:, 0] = True
    ke, ve = k.repeat_interleave(H // hkv, 1), v.repeat_interleave(H // hkv, 1)
    for m in (None, mask):
        assert torch.equal(kernels.attend_small(q, k, v, m, 0.125), kernels.attend_small(q, ke, ve, m, 0.125))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cache_is_read_as_it_is(dtype):
    """f16 / bf16 K and V (a float cache's storage, AttnInput) widen exactly in registers: the result equals
    attention over the same values converted to float32 first, bit for bit; a strided cache view included."""
    gen = torch.Generator().manual_seed(9)
    cache = torch.randn(90, 2, 4, 72, generator=gen).to(dtype)  # (cells, K/V, heads, d): strided views below
    k, v = cache[:83, 0], cache[:83, 1]
    q = torch.randn(3, 8, 72, generator=gen)
    mask = torch.rand(3, 83, generator=gen) < 0.7
    mask[:, 0] = True
    for m in (None, mask):
        assert torch.equal(kernels.attend_small(q, k, v, m, 0.1), kernels.attend_small(q, k.float(), v.float(), m, 0.1))
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        kernels.attend_small(q, k.double(), v, None, 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("indexed", [False, True])
def test_kv_attend_is_store_then_attend_small(dtype, indexed):
    """kv_attend writes k, v into the storage rows it is given (a run [slot0, slot0 + T) or index slots, the
    f32 -> f16 / bf16 cast rounding as torch's does) and attends over the rows it is told to read (a prefix
    [0, n_kv) or index cells): the same storage and the same output, bit for bit, as the three steps apart."""
    T, H, hkv, d, size = 3, 8, 2, 64, 40
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(T, h, d, generator=g) for h in (H, hkv, hkv))
    kc0 = torch.randn(size, hkv * d, generator=g).to(dtype)
    vc0 = torch.randn(size, hkv * d, generator=g).to(dtype)
    if indexed:
        slots, slot0 = torch.tensor([17, 3, 29]), 0
        cells = torch.tensor([3, 8, 17, 29, 0, 12, 5])
        n_kv = len(cells)
        mask = torch.rand(T, n_kv, generator=g) < 0.7
        mask[torch.arange(T), torch.tensor([1, 0, 3])] = True  # every row attends somewhere
    else:
        slots, slot0, cells, n_kv, mask = None, 9, None, 12, None  # rows [9, 12) are the last 3 of [0, 12)
    kc, vc = kc0.clone(), vc0.clone()
    y = kernels.kv_attend(q, k, v, kc, vc, slots, slot0, cells, n_kv, mask, 0.125)
    kr, vr = kc0.clone(), vc0.clone()
    where = slots if indexed else torch.arange(slot0, slot0 + T)
    kr[where], vr[where] = k.reshape(T, -1).to(dtype), v.reshape(T, -1).to(dtype)
    read = cells if indexed else torch.arange(n_kv)
    want = kernels.attend_small(q, kr[read].view(-1, hkv, d), vr[read].view(-1, hkv, d), mask, 0.125)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    assert torch.equal(y, want)
