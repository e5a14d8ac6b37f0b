"""Mamba-2 mixer (llama.cpp's build_mamba2_layer; HF's GraniteMoeHybridMambaLayer) and its scan.

The mixer works on a ``split_equal`` ubatch (S sequences x T tokens) and continues from the state
the memory holds, like Mamba-1's (engine/model/mamba.py). What differs: one projection gives
z, the conv input xBC and dt; B and C go through the conv with x and are shared by groups of
heads; the decay is one scalar per head; the output is gated by silu(z) *before* a grouped RMS
norm:

    z, xBC, dt = in_proj(h).split(d_inner, d_inner + 2 ng ds, nh)
    x, B, C    = silu(conv1d(cat(conv_state, xBC)) + b).split(d_inner, ng ds, ng ds)
    dt         = softplus(dt + dt_bias)                       # (S, T, nh)
    s_t[h]     = exp(dt_t[h] A[h]) s_{t-1}[h] + dt_t[h] x_t[h] (x) B_t[g(h)]   # (hd, ds) per head
    y_t[h]     = s_t[h] C_t[g(h)] + D[h] x_t[h]
    out        = out_proj(group_rms(y * silu(z)) * norm)

The recurrence runs chunked (``scan_chunked``, the SSD form of the Mamba-2 paper): within a chunk
of Q tokens the outputs are one masked (Q x Q) matrix product per head, and only the state
crosses chunks, so a 512-token prefill is 8 steps of batched matmuls instead of 512 small ones.
``scan_loop`` is the recurrence as written, the reference the tests hold it to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.model.layers import Linear

CHUNK = 64  # tokens per chunk: the (Q x Q) decay matrices stay small, 512 tokens take 8 state hand-offs


def scan_loop(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence token by token. x (S, T, H, P), dt (S, T, H), A (H,), B and C (S, T, G, N),
    s (S, H, P, N) -> y (S, T, H, P), s_T."""
    rep = x.shape[2] // B.shape[2]
    B, C = B.repeat_interleave(rep, dim=2), C.repeat_interleave(rep, dim=2)  # (S, T, H, N)
    ys = []
    for t in range(x.shape[1]):
        dA = torch.exp(dt[:, t] * A)  # (S, H)
        s = s * dA[..., None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("shpn,shn->shp", s, C[:, t]))
    return torch.stack(ys, dim=1), s


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """a (..., Q) -> (..., Q, Q): [t, u] = a[u+1] + ... + a[t] for u <= t, -inf above the diagonal.
    Summed per segment rather than as a difference of cumulative sums, so a long chunk of strong
    decay does not cancel digits."""
    Q = a.shape[-1]
    x = a[..., :, None].expand(*a.shape, Q)  # [t, u] = a[t]
    x = x.masked_fill(~torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril(-1), 0.0)
    seg = torch.cumsum(x, dim=-2)
    return seg.masked_fill(~torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril(0), float("-inf"))


def scan_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 s: torch.Tensor, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """scan_loop's result, chunk by chunk (same shapes). Per chunk, with a = dt A:
    y = (C B^T masked by the decays) (dt x) + decay * C s;  s <- decay_all * s + sum_u decay_u (dt x)_u (x) B_u."""
    S, T, H, P = x.shape
    rep = H // B.shape[2]
    B, C = B.repeat_interleave(rep, dim=2), C.repeat_interleave(rep, dim=2)  # (S, T, H, N)
    a = (dt * A).transpose(1, 2)  # (S, H, T), <= 0
    xdt = x * dt[..., None]  # (S, T, H, P)
    ys = []
    for t0 in range(0, T, chunk):
        t1 = min(t0 + chunk, T)
        seg = _segsum(a[:, :, t0:t1])  # (S, H, Q, Q)
        L = torch.exp(seg)
        Cc, Bc, xc = C[:, t0:t1], B[:, t0:t1], xdt[:, t0:t1]
        W = torch.einsum("sthn,suhn->shtu", Cc, Bc) * L  # (S, H, Q, Q): how much u's input reaches t
        y = torch.einsum("shtu,suhp->sthp", W, xc)  # within the chunk
        into = torch.exp(seg[..., :, 0] + a[:, :, t0, None])  # (S, H, Q): decay from the chunk's start to t
        y = y + torch.einsum("sthn,shpn,sht->sthp", Cc, s, into)  # the state carried in
        to_end = torch.exp(seg[..., -1, :])  # (S, H, Q): decay from u to the chunk's end
        s = s * into[..., -1, None, None] + torch.einsum("suhp,suhn,shu->shpn", xc, Bc, to_end)
        ys.append(y)
    return torch.cat(ys, dim=1), s


class Mamba2Mixer(nn.Module):
    chunked = True  # tests/bench/test_scan_speed.py turns it off to time the loop beside it

    def __init__(self, cfg: ModelConfig, il: int) -> None:
        super().__init__()
        self.il = il
        di, ds, ng, nh = cfg.ssm_d_inner, cfg.ssm_d_state, cfg.ssm_n_group, cfg.ssm_dt_rank
        self.d_inner, self.d_state, self.n_group, self.n_head = di, ds, ng, nh
        self.head_dim = di // nh
        self.conv_dim = cfg.ssm_conv_dim
        self.eps = cfg.rms_eps
        self.in_proj = Linear(cfg.n_embd, di + self.conv_dim + nh)
        self.conv1d_weight = nn.Parameter(torch.empty(self.conv_dim, cfg.ssm_d_conv), requires_grad=False)
        self.conv1d_bias = nn.Parameter(torch.empty(self.conv_dim), requires_grad=False)
        self.dt_bias = nn.Parameter(torch.empty(nh), requires_grad=False)
        self.A = nn.Parameter(torch.empty(nh, 1), requires_grad=False)  # already -exp(A_log)
        self.D = nn.Parameter(torch.empty(nh, 1), requires_grad=False)
        self.norm = nn.Parameter(torch.empty(ng, di // ng), requires_grad=False)
        self.out_proj = Linear(di, cfg.n_embd)

    def forward(self, h: torch.Tensor, mctx) -> torch.Tensor:
        """h (S*T, n_embd) -> (S*T, n_embd); reads and writes the ubatch's states in mctx."""
        S = max(mctx.ubatch.n_seqs, 1)
        T = h.shape[0] // S
        di, nh, hd, ng, ds = self.d_inner, self.n_head, self.head_dim, self.n_group, self.d_state
        z, xBC, dt = self.in_proj(h).view(S, T, -1).split([di, self.conv_dim, nh], dim=-1)
        conv_state, ssm_state = mctx.rs_get(self.il)  # (S, d_conv-1, conv_dim), (S, d_inner, d_state)
        conv_in = torch.cat((conv_state.to(xBC.dtype), xBC), dim=1)  # (S, d_conv-1+T, conv_dim)
        new_conv = conv_in[:, T:]
        xc = F.conv1d(conv_in.transpose(1, 2), self.conv1d_weight.unsqueeze(1), self.conv1d_bias, groups=self.conv_dim)
        xc = F.silu(xc.transpose(1, 2))  # (S, T, conv_dim)
        x, B, C = xc.split([di, ng * ds, ng * ds], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (S, T, nh); llama.cpp: inside ggml_ssm_scan
        scan = scan_chunked if self.chunked else scan_loop
        y, s = scan(x.float().reshape(S, T, nh, hd), dt, self.A.float().view(nh),
                    B.float().reshape(S, T, ng, ds), C.float().reshape(S, T, ng, ds),
                    ssm_state.float().view(S, nh, hd, ds))
        y = (y + x.float().reshape(S, T, nh, hd) * self.D.float().view(nh, 1)).reshape(S, T, di)
        y = y * F.silu(z.float())  # gate before the norm (HF norm_before_gate=False)
        y = F.rms_norm(y.view(S, T, ng, di // ng), (di // ng,), eps=self.eps) * self.norm.float()
        mctx.rs_set(self.il, new_conv, s.reshape(S, di, ds))
        return self.out_proj(y.to(h.dtype).reshape(S * T, di))
