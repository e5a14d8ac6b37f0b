"""Mamba-1 mixer (llama.cpp's build_mamba_layer) and the mixture-of-experts feed-forward (Jamba).

The mixer works on a ``split_equal`` ubatch: S sequences x T tokens each, rows sequence after
sequence. Per sequence it continues from the state the memory holds (conv state: the last
d_conv - 1 inputs of the depthwise convolution; SSM state: d_inner x d_state) and writes the
state after its last token back:

    x, z  = in_proj(h).split(d_inner)                  # (S, T, d_inner) each
    xc    = silu(conv1d(cat(conv_state, x)) + b)       # causal depthwise conv over time
    dt, B, C = x_proj(xc).split(dt_rank, d_state, d_state)   [Jamba: RMS-normed]
    dt    = softplus(dt_proj(dt) + dt_bias)
    s_t   = exp(dt * A) * s_{t-1} + dt * B_t * xc_t    # A = -exp(A_log), (d_inner, d_state)
    y_t   = s_t . C_t + D * xc_t
    out   = out_proj(y * silu(z))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine import kernels
from engine.config import ModelConfig
from engine.model.layers import FeedForward, Linear


def scan_loop(dA: torch.Tensor, dBx: torch.Tensor, C: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence as written, sequential in time and batched over sequences: the reference for
    engine.kernels.ssm_scan (one op, parallel over sequence x channel), and the path off the CPU. (S, T, di, ds), (S, T, ds), (S, di, ds) -> y (S, T, di), s_T."""
    ys = []
    for t in range(dA.shape[1]):
        s = dA[:, t] * s + dBx[:, t]
        ys.append(torch.einsum("sdn,sn->sd", s, C[:, t]))
    return torch.stack(ys, dim=1), s


def _rms(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), w, eps)


class MambaMixer(nn.Module):
    # the native scan where the kernels are built (a bit-identical state, so both compute modes use it);
    # tests/bench/test_scan_speed.py turns it off to time the loop beside it
    native_scan = True

    def __init__(self, cfg: ModelConfig, il: int, bc_norms: bool) -> None:
        super().__init__()
        self.il = il
        di, ds, dc, r = cfg.ssm_d_inner, cfg.ssm_d_state, cfg.ssm_d_conv, cfg.ssm_dt_rank
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = di, ds, dc, r
        self.eps = cfg.rms_eps
        self.in_proj = Linear(cfg.n_embd, 2 * di)
        self.conv1d_weight = nn.Parameter(torch.empty(di, dc), requires_grad=False)
        self.conv1d_bias = nn.Parameter(torch.empty(di), requires_grad=False)
        self.x_proj = Linear(di, r + 2 * ds)
        self.dt_proj = Linear(r, di, bias=True)
        self.A = nn.Parameter(torch.empty(di, ds), requires_grad=False)  # already -exp(A_log)
        self.D = nn.Parameter(torch.empty(di), requires_grad=False)
        self.out_proj = Linear(di, cfg.n_embd)
        self.weightless_norms = cfg.ssm_dt_b_c_rms  # falcon-mamba
        if bc_norms:
            self.dt_norm = nn.Parameter(torch.empty(r), requires_grad=False)
            self.b_norm = nn.Parameter(torch.empty(ds), requires_grad=False)
            self.c_norm = nn.Parameter(torch.empty(ds), requires_grad=False)
        else:
            self.dt_norm = self.b_norm = self.c_norm = None

    def forward(self, h: torch.Tensor, mctx) -> torch.Tensor:
        """h (S*T, n_embd) -> (S*T, n_embd); reads and writes the ubatch's states in mctx."""
        S = max(mctx.ubatch.n_seqs, 1)
        T = h.shape[0] // S
        di = self.d_inner
        x, z = self.in_proj(h).view(S, T, 2 * di).split(di, dim=-1)
        conv_state, ssm_state = mctx.rs_get(self.il)  # (S, d_conv-1, di), (S, di, d_state)
        conv_in = torch.cat((conv_state.to(x.dtype), x), dim=1)  # (S, d_conv-1+T, di)
        new_conv = conv_in[:, T:]
        xc = F.conv1d(conv_in.transpose(1, 2), self.conv1d_weight.unsqueeze(1), self.conv1d_bias, groups=di)
        xc = F.silu(xc.transpose(1, 2))  # (S, T, di)
        dt, B, C = self.x_proj(xc.reshape(S * T, di)).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.dt_norm is not None or self.weightless_norms:
            dt, B, C = _rms(dt, self.dt_norm, self.eps), _rms(B, self.b_norm, self.eps), _rms(C, self.c_norm, self.eps)
        # contiguous: a GEMM may hand back a transposed view, and the (S, T, di, d_state) products below would
        # inherit that layout (the scan then copies 2 x 16 MB per layer at 512 tokens)
        dt = F.softplus(self.dt_proj(dt)).contiguous().view(S, T, di)
        B, C = B.view(S, T, self.d_state), C.view(S, T, self.d_state)
        s = ssm_state.float()
        A = self.A.float()
        dA = torch.exp(dt.float().unsqueeze(-1) * A)  # (S, T, di, d_state)
        dBx = (dt * xc).float().unsqueeze(-1) * B.float().unsqueeze(2)  # (S, T, di, d_state)
        native = self.native_scan and s.device.type == "cpu" and kernels.fused_available()
        ys, s = (kernels.ssm_scan if native else scan_loop)(dA, dBx, C.float(), s)
        y = ys.to(xc.dtype) + xc * self.D
        mctx.rs_set(self.il, new_conv, s)
        out = self.out_proj((y * F.silu(z)).reshape(S * T, di))
        return out


class MoEFeedForward(nn.Module):
    """Sparse FFN (llama.cpp build_moe_ffn with softmax gating): softmax over all experts, the top-k
    probabilities weight their experts' SwiGLU outputs. Jamba uses them as they are (norm_w=false;
    HF JambaTopKRouter); Granite renormalises them to sum 1 (norm_w=true; HF's softmax over the top-k
    logits is the same numbers) and adds a shared expert that every token goes through."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, ff, d = cfg.n_expert, cfg.n_ff, cfg.n_embd
        self.k = cfg.n_expert_used
        self.norm_w = cfg.expert_weights_norm
        self.shared = FeedForward(cfg, cfg.n_ff_shexp) if cfg.n_ff_shexp else None
        self.router = nn.Parameter(torch.empty(E, d), requires_grad=False)
        self.gate_exps = nn.Parameter(torch.empty(E, ff, d), requires_grad=False)
        self.up_exps = nn.Parameter(torch.empty(E, ff, d), requires_grad=False)
        self.down_exps = nn.Parameter(torch.empty(E, d, ff), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(F.linear(x, self.router).float(), dim=-1)  # (T, E)
        w, idx = torch.topk(probs, self.k, dim=-1)  # (T, k)
        if self.norm_w:
            w = w / w.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in idx.unique().tolist():
            rows, slot = torch.nonzero(idx == e, as_tuple=True)
            xe = x[rows]
            ye = F.linear(F.silu(F.linear(xe, self.gate_exps[e])) * F.linear(xe, self.up_exps[e]), self.down_exps[e])
            out.index_add_(0, rows, ye * w[rows, slot, None].to(ye.dtype))
        return out if self.shared is None else out + self.shared(x)
