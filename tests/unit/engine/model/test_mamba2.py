"""Mamba-2's chunked scan against the recurrence as written (engine/model/mamba2.py)."""

import pytest
import torch

from engine.model.mamba2 import scan_chunked, scan_loop

EPS32 = torch.finfo(torch.float32).eps


def _inputs(S, T, H, P, G, N, seed, dt_max=0.1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, T, H, P, generator=g, dtype=torch.float64)
    dt = torch.rand(S, T, H, generator=g, dtype=torch.float64) * dt_max
    A = -torch.arange(1, H + 1, dtype=torch.float64)
    B = torch.randn(S, T, G, N, generator=g, dtype=torch.float64)
    C = torch.randn(S, T, G, N, generator=g, dtype=torch.float64)
    s = torch.randn(S, H, P, N, generator=g, dtype=torch.float64)
    return x, dt, A, B, C, s


def _bound(x, dt, A, B, C, s, chunk):
    """Per element bounds on the float32 chunked result's rounding error against the float64 loop, for y
    and for the final state.

    Each output is a sum of terms C.B decay dt x (and C.s decay for the carried state); the same sums over
    absolute values (the loop on |x|, |B|, |C|, |s|; decays are <= 1) bound every partial sum: M for y,
    M_s for the state. A term's relative error is at most: N + Q for the two dot products and the in-chunk
    sum, a few for exp and the products, and the error of its exponent (a sum of at most Q terms a = dt A,
    off by Q eps max|a over a chunk|); a state crossing k chunks accumulates k such errors. So
    |err| <= (N + 2Q + 8 + Q max_chunk|a|) * n_chunks * eps32 * M."""
    M, M_s = scan_loop(x.abs(), dt, A, B.abs(), C.abs(), s.abs())
    T = x.shape[1]
    Q = min(chunk, T)
    a = dt * A.abs()
    seg = max(a[:, t0:t0 + Q].sum(1).max().item() for t0 in range(0, T, Q))
    k = (B.shape[-1] + 2 * Q + 8 + Q * seg) * -(-T // Q) * EPS32
    return k * M, k * M_s


@pytest.mark.parametrize("S, T, H, P, G, N, chunk", [
    (1, 1, 4, 8, 1, 16, 64),      # one decode step
    (2, 100, 8, 16, 2, 16, 64),   # a partial last chunk, two groups of heads
    (3, 64, 4, 8, 4, 8, 16),      # whole chunks, a group per head
    (1, 512, 8, 32, 2, 16, 64),   # a prefill
])
def test_chunked_equals_loop(S, T, H, P, G, N, chunk):
    x, dt, A, B, C, s = _inputs(S, T, H, P, G, N, seed=T)
    y_ref, s_ref = scan_loop(x, dt, A, B, C, s)
    f = [t.float() for t in (x, dt, A, B, C, s)]
    y, s_out = scan_chunked(*f, chunk=chunk)
    bound, bound_s = _bound(x, dt, A, B, C, s, chunk)
    assert ((y.double() - y_ref).abs() <= bound).all(), (y.double() - y_ref).abs().max().item()
    assert ((s_out.double() - s_ref).abs() <= bound_s).all()


def test_strong_decay_does_not_lose_the_state():
    """dt up to 5 on A = -8: decays of e^-40 per token; segment sums keep them exact enough."""
    x, dt, A, B, C, s = _inputs(1, 128, 8, 8, 2, 16, seed=5, dt_max=5.0)
    y_ref, s_ref = scan_loop(x, dt, A, B, C, s)
    y, s_out = scan_chunked(*(t.float() for t in (x, dt, A, B, C, s)))
    assert torch.isfinite(y).all() and torch.isfinite(s_out).all()
    bound, bound_s = _bound(x, dt, A, B, C, s, 64)
    assert ((y.double() - y_ref).abs() <= bound).all() and ((s_out.double() - s_ref).abs() <= bound_s).all()


def test_split_prompt_continues_the_state():
    """Two ubatches carrying the state equal one: what a 48-token ubatch does to a 200-token prompt."""
    x, dt, A, B, C, s = (t.float() for t in _inputs(2, 90, 4, 8, 2, 16, seed=9))
    y_all, s_all = scan_chunked(x, dt, A, B, C, s)
    y1, s1 = scan_chunked(x[:, :37], dt[:, :37], A, B[:, :37], C[:, :37], s)
    y2, s2 = scan_chunked(x[:, 37:], dt[:, 37:], A, B[:, 37:], C[:, 37:], s1)
    # float32 against float32 through different chunk boundaries: both within the bound of the exact result
    ref, s_ref = scan_loop(*(t.double() for t in (x, dt, A, B, C, s)))
    bound, bound_s = _bound(*(t.double() for t in (x, dt, A, B, C, s)), 64)
    assert ((torch.cat([y1, y2], 1).double() - ref).abs() <= bound).all()
    assert ((y_all.double() - ref).abs() <= bound).all()
    assert ((s2.double() - s_ref).abs() <= bound_s).all() and ((s_all.double() - s_ref).abs() <= bound_s).all()
