"""engine.kernels.wkv7 (RWKV-7's recurrence, in parallel over state rows) against the token loop it replaces
(engine/model/rwkv7.py wkv7_loop), run in float64 on the same float32 inputs.

Bound, per state row i of a head (a vector over keys j), from the kernel's float32 operations:
- one step computes S_ij w_j + v_i k_j + sa_i b_j with sa_i = sum_j S_ij a_j: three products and two sums,
  at most 5u of the sum of their magnitudes m_ij, plus sa_i's own summation error N u sum_j |S_ij a_j|,
  times |b_j|;
- an error e already in the row goes through the step as e (diag(w) + a b^T), so its 2-norm grows by at most
  that matrix's spectral norm, computed here from the data;
- y_i = sum_j S_ij r_j adds the row's error times ||r|| and its own N u sum_j |S_ij r_j|.
(u = 2^-24.) The recursion is run along the float64 trajectory."""

import pytest
import torch

from engine import kernels
from engine.model.rwkv7 import wkv7_loop

U = 2.0**-24


def _inputs(S, T, H, N, seed):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(S, T, H, N, generator=g) for _ in range(3))
    w = torch.exp(-0.6065 * torch.rand(S, T, H, N, generator=g))  # RWKV-7's decays, in (0.55, 1)
    kk = torch.nn.functional.normalize(torch.randn(S, T, H, N, generator=g), dim=-1)
    iclr = torch.rand(S, T, H, N, generator=g)
    s0 = torch.randn(S, H, N, N, generator=g)
    return r, w, k, v, -kk, kk * iclr, s0


def _bounds(r, w, k, v, a, b, s):
    S, T, H, N = r.shape
    err = torch.zeros(S, H, N, dtype=torch.float64)
    ys = []
    for t in range(T):
        rt, wt, kt, vt, at, bt = (x[:, t] for x in (r, w, k, v, a, b))
        sa = s @ at[..., None]  # (S, H, N, 1)
        mag = (s * wt[:, :, None]).abs() + (vt[..., None] * kt[:, :, None]).abs() + (sa * bt[:, :, None]).abs()
        local = 5 * U * mag + N * U * (s.abs() @ at.abs()[..., None]) * bt.abs()[:, :, None]
        M = torch.diag_embed(wt) + at[..., :, None] * bt[..., None, :]  # (S, H, N, N)
        err = torch.linalg.matrix_norm(M, ord=2)[..., None] * err + torch.linalg.vector_norm(local, dim=-1)
        s = s * wt[:, :, None] + vt[..., None] * kt[:, :, None] + sa * bt[:, :, None]
        ys.append(err * torch.linalg.vector_norm(rt, dim=-1)[..., None] + N * U * (s.abs() @ rt.abs()[..., None])[..., 0])
    return torch.stack(ys, dim=1), err


@pytest.mark.parametrize("S, T, H, N", [(1, 1, 1, 64), (2, 37, 2, 64), (1, 300, 2, 64), (3, 20, 4, 32), (1, 5, 1, 7)])
def test_wkv7_equals_the_token_loop(S, T, H, N):
    x = _inputs(S, T, H, N, seed=S * T + N)
    s0 = x[-1].clone()
    y, s = kernels.wkv7(*x)
    y_ref, s_ref = wkv7_loop(*(t.double() for t in x))
    by, bs = _bounds(*(t.double() for t in x))
    assert ((y.double() - y_ref).abs() <= by).all(), ((y.double() - y_ref).abs() / by).max().item()
    # the state's rows: the 2-norm of each row's error
    assert (torch.linalg.vector_norm(s.double() - s_ref, dim=-1) <= bs).all()
    assert torch.equal(x[-1], s0)  # the caller's state is not written
