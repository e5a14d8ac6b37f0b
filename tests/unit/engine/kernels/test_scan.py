"""engine.kernels.ssm_scan against the sequential torch loop it replaces (engine/model/mamba.py scan_loop).

The state update is the same two float32 roundings per step in both (a product, then a sum), so the final state
is equal bit for bit. y_t = sum_n s_t[n] C_t[n] is summed in another order (the loop uses einsum): float32
summation of ds terms, |dy| <= 2 (ds - 1) u sum_n |s_t[n] C_t[n]| (u = 2**-24, both sides' error)."""

import pytest
import torch

from engine import kernels
from engine.model.mamba import scan_loop

U = 2.0**-24


@pytest.mark.parametrize("S, T, di, ds", [(1, 1, 8, 4), (2, 37, 16, 16), (3, 200, 64, 16), (1, 512, 32, 8)])
def test_scan_equals_the_sequential_loop(S, T, di, ds):
    g = torch.Generator().manual_seed(S * T)
    dA = torch.rand(S, T, di, ds, generator=g) * 0.5 + 0.5  # decays in (0.5, 1)
    dBx = torch.randn(S, T, di, ds, generator=g)
    C = torch.randn(S, T, ds, generator=g)
    s0 = torch.randn(S, di, ds, generator=g)
    s0_copy = s0.clone()
    y, s = kernels.ssm_scan(dA, dBx, C, s0)
    y_ref, s_ref = scan_loop(dA, dBx, C, s0.clone())
    assert torch.equal(s, s_ref)
    # the states along the way, to bound y: rerun the loop keeping them
    states, st = [], s0.clone()
    for t in range(T):
        st = dA[:, t] * st + dBx[:, t]
        states.append(st)
    mag = torch.stack([(x.abs() * C[:, t].abs()[:, None, :]).sum(-1) for t, x in enumerate(states)], dim=1)
    assert (y - y_ref).abs().le(2 * (ds - 1) * U * mag + 1e-30).all()
    assert torch.equal(s0, s0_copy)  # the caller's state is not written
