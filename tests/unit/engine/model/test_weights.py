"""engine/model/weights.py: where fast mode's packed matrices live (huge pages) and that moving them changes nothing
the kernels compute."""

from __future__ import annotations

import mmap

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from engine import kernels
from engine.model import weights as wmod
from engine.model.weights import (
    HAS_HUGE_PAGES,
    HUGE_PAGE,
    PackedWeight,
    huge_page_buffer,
    place_in_huge_pages,
)


def _blocks(ggml_type: T, n: int, k: int, seed: int) -> torch.Tensor:
    """Random blocks of a type whose scales are sane fp16 (1.0): the bytes of a (n, k) matrix."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, n * kernels.row_bytes(ggml_type, k), dtype=np.uint8)
    if ggml_type in (T.Q4_0, T.Q8_0):
        bb = {T.Q4_0: 18, T.Q8_0: 34}[ggml_type]
        data.reshape(-1, bb)[:, 0:2] = (0x00, 0x3C)
    else:  # Q4_K: d and dmin of each 256-value super-block
        data.reshape(-1, 144)[:, 0:4] = (0x00, 0x3C, 0x00, 0x3C)
    return torch.from_numpy(data)


@pytest.mark.skipif(not HAS_HUGE_PAGES, reason="no MADV_HUGEPAGE on this OS")
def test_huge_page_buffer_is_aligned_zeroed_and_writable():
    b = huge_page_buffer(3 * HUGE_PAGE + 100)
    assert b is not None and b.dtype == torch.uint8 and b.numel() == 3 * HUGE_PAGE + 100
    assert b.data_ptr() % HUGE_PAGE == 0
    assert int(b.count_nonzero()) == 0
    b[-1] = 7
    assert int(b[-1]) == 7


def test_huge_page_buffer_without_the_advice(monkeypatch):
    monkeypatch.delattr(mmap, "MADV_HUGEPAGE", raising=False)
    assert huge_page_buffer(HUGE_PAGE) is None
    assert huge_page_buffer(0) is None


@pytest.mark.skipif(not HAS_HUGE_PAGES, reason="no MADV_HUGEPAGE on this OS")
def test_huge_page_buffer_without_address_space(monkeypatch):
    """A mapping the OS refuses (ENOMEM under a ulimit -v) is no error: the matrices stay where they are."""
    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", refuse)
    assert huge_page_buffer(HUGE_PAGE) is None


@pytest.mark.skipif(not HAS_HUGE_PAGES, reason="no MADV_HUGEPAGE on this OS")
def test_place_in_huge_pages_moves_interleaves_and_keeps_the_product():
    """Every matrix ends in one buffer, each on a 64-byte boundary, interleaved where interleave() would have
    interleaved it in place (the same bytes), the rest copied as they were; products equal bit for bit."""
    specs = [(T.Q4_0, 64, 256), (T.Q8_0, 32, 128), (T.Q4_K, 16, 256), (T.Q4_0, 8, 64)]  # 8 rows: no whole tile
    moved = [PackedWeight(_blocks(t, n, k, i), t, n, k) for i, (t, n, k) in enumerate(specs)]
    twins = [PackedWeight(w.data.clone(), w.qtype, w.n, w.k) for w in moved]
    for w in twins:
        w.interleave()
    x = {k: torch.randn(3, k, generator=torch.Generator().manual_seed(k)) for _, _, k in specs}
    total = place_in_huge_pages(moved + moved[:1])  # a shared matrix (tied output) moves once
    assert total == sum(-(-w.data.nbytes // 64) * 64 for w in moved)
    base = moved[0].data.untyped_storage().data_ptr()
    assert moved[0].data.data_ptr() % HUGE_PAGE == 0  # the first matrix starts the aligned buffer
    for w, twin in zip(moved, twins, strict=True):
        assert w.data.untyped_storage().data_ptr() == base and w.data.data_ptr() % 64 == 0
        assert w.ktype == twin.ktype and torch.equal(w.data, twin.data)
        assert torch.equal(w(x[w.k]), twin(x[w.k]))
    assert moved[0].ktype == (kernels.X16[T.Q4_0] if kernels.x16_available() else T.Q4_0)
    assert moved[2].ktype == T.Q4_K and moved[3].ktype == T.Q4_0  # not interleavable: copied as they were


def test_place_in_huge_pages_without_huge_pages_moves_nothing(monkeypatch):
    monkeypatch.setattr(wmod, "huge_page_buffer", lambda nbytes: None)
    w = PackedWeight(_blocks(T.Q4_0, 32, 64, 0), T.Q4_0, 32, 64)
    data = w.data
    assert place_in_huge_pages([w]) == 0
    assert w.data is data and w.ktype == T.Q4_0  # the caller interleaves in place


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_dense_prefill_is_the_bf16_gemm(dtype):
    """Fast mode's large batches on an F16/BF16 matrix: one bf16 GEMM on the weights rounded to bf16 (to nearest
    even; the kernel's conversion stands in for torch's .to(bfloat16), 9x faster here), so equal bit for bit to
    torch's own GEMM on torch's own conversion."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g).to(dtype)
    x = torch.randn(kernels.MAX_QMM_ROWS + 7, 256, generator=g)
    got = wmod.DenseWeight(w, fast=True)(x)
    want = torch.nn.functional.linear(x.to(torch.bfloat16), w.to(torch.bfloat16)).float()
    assert got.dtype == torch.float32 and torch.equal(got, want)
