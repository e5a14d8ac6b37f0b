"""Building blocks shared by every architecture: RMSNorm, RoPE (both ggml layouts), SwiGLU,
and attention over whatever a memory context hands back."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine import kernels
from engine.config import ROPE_NEOX, ModelConfig
from engine.memory.base import AttnInput
from engine.model.weights import DenseWeight, Weight


class Linear(nn.Module):
    """y = x W^T (+ b). ``weight`` is a ``Weight`` (engine/model/weights.py): dense float32 in exact
    mode, the file's blocks in fast mode; loading swaps in the real one (built here on the meta
    device, empty)."""

    def __init__(self, n_in: int, n_out: int, bias: bool = False) -> None:
        super().__init__()
        self.weight: Weight = DenseWeight(torch.empty(n_out, n_in))
        self.bias = nn.Parameter(torch.empty(n_out), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.weight.forward(x)  # not self.weight(x): a second Module.__call__ per matmul, ~2 us at decode
        return y if self.bias is None else y + self.bias


class Embedding(nn.Module):
    """Token embeddings: row lookup in a ``Weight`` (kept packed in fast mode, like llama.cpp's get_rows)."""

    def __init__(self, n_vocab: int, n_embd: int) -> None:
        super().__init__()
        self.weight: Weight = DenseWeight(torch.empty(n_vocab, n_embd))

    def forward(self, token: torch.Tensor) -> torch.Tensor:
        return self.weight.rows(token)  # (T, n_embd) float32


class RMSNorm(nn.Module):
    fused = False  # fast mode: one native op (engine.kernels.rms_norm) instead of torch's six at decode sizes

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.dtype == torch.float32 and x.device.type == "cpu":
            return kernels.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Rope(nn.Module):
    fused = False  # fast mode: engine.kernels.rope (the same float32 operations in one op)

    """Rotary position embedding, computed from positions per ubatch.

    Positions come from the batch, not from an index: cells of one ubatch can belong to many
    sequences at many positions, and a K-shift re-rotates cached keys by a position delta.
    ``inv_freq`` folds in linear scaling and llama-3's per-dimension ``rope_freqs`` divisors
    exactly as ggml_rope_ext applies them (theta / freq_factor).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_rot = cfg.n_rot
        self.neox = cfg.rope_type == ROPE_NEOX
        # On the CPU even inside torch.device("meta") (models are built there): meta pow would pull in
        # torch's Python decompositions, 800 modules and 68 MB of RSS, for a vector of n_rot/2 floats.
        i = torch.arange(0, cfg.n_rot, 2, dtype=torch.float64, device="cpu")
        inv = cfg.rope_freq_scale * cfg.rope_freq_base ** (-i / cfg.n_rot)
        self.register_buffer("inv_freq", inv, persistent=False)  # (n_rot/2,) float64

    def set_freq_factors(self, factors: torch.Tensor) -> None:
        self.inv_freq = self.inv_freq / factors.to(torch.float64)

    def angles(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (T, 1, n_rot/2) for integer positions (T,)."""
        # float64: theta reaches n_ctx radians, where float32 would lose ~1e-5 of the angle.
        theta = pos.to(torch.float64)[:, None] * self.inv_freq.to(pos.device)[None, :]
        return theta.cos().to(dtype)[:, None, :], theta.sin().to(dtype)[:, None, :]

    def apply(self, x: torch.Tensor, cs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Rotate x (T, n_head, head_dim) by the angles from ``angles``."""
        if self.n_rot == 0:  # no rope (Jamba's attention layers)
            return x
        cos, sin = cs
        if self.fused and x.dtype == torch.float32 and x.device.type == "cpu":  # fast mode: one native op
            return kernels.rope(x, cos, sin, self.neox)
        n = self.n_rot
        rot, rest = (x, None) if n == x.shape[-1] else (x[..., :n], x[..., n:])
        if self.neox:
            x0, x1 = rot[..., : n // 2], rot[..., n // 2 :]
            out = torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        else:  # NORM: adjacent pairs (x[2i], x[2i+1])
            pairs = rot.unflatten(-1, (n // 2, 2))
            x0, x1 = pairs[..., 0], pairs[..., 1]
            out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
        return out if rest is None else torch.cat((out, rest), dim=-1)


def attend(q: torch.Tensor, inp: AttnInput, scale: float) -> torch.Tensor:
    """q (T, n_head, head_dim) -> (T, n_head * head_dim_v)."""
    T = q.shape[0]
    qh = q.transpose(0, 1).unsqueeze(0)  # (1, n_head, T, d)
    kh = inp.k.to(q.dtype).transpose(0, 1).unsqueeze(0)  # (1, n_head_kv, n_kv, d); a float cache's storage widened
    vh = inp.v.to(q.dtype).transpose(0, 1).unsqueeze(0)
    if inp.mask is None:
        n_kv = kh.shape[2]
        causal = T > 1
        if causal and n_kv != T:
            # rows sit at the end of k/v: row i sees kv[: n_kv - T + i + 1]
            idx = torch.arange(n_kv, device=q.device)
            mask = idx[None, :] <= (n_kv - T + torch.arange(T, device=q.device))[:, None]
            y = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale, enable_gqa=True)
    else:
        y = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=inp.mask, scale=scale, enable_gqa=True)
    return y.squeeze(0).transpose(0, 1).reshape(T, -1)


SMALL_T = 16  # query rows up to which fast mode computes attention as matmuls (attend_small)


def attend_small(q: torch.Tensor, inp: AttnInput, scale: float) -> torch.Tensor:
    """attend() for a few query rows (decode), fast mode only (exact mode keeps torch's kernel, the reference).

    Why: in the engine, torch's CPU flash-attention op took ~70 us a layer at decode sizes whatever n_kv
    (SmolLM2: 30 layers x 70 us of a 15 ms step), and bmm + softmax + bmm ~65 us: mostly threads waking
    between small ops. engine.kernels.attend_small does the same float32 arithmetic inline; off the CPU,
    or without the native build, the torch expression below."""
    if q.device.type == "cpu" and q.dtype == torch.float32 and kernels.fused_available():
        return kernels.attend_small(q, inp.k, inp.v, inp.mask, scale)  # reads f16/bf16 storage as it is
    inp = AttnInput(inp.rows, inp.k.to(q.dtype), inp.v.to(q.dtype), inp.mask)
    T, H, d = q.shape
    n_kv, h_kv, dv = inp.v.shape
    g = H // h_kv
    qh = q.view(T, h_kv, g, d).permute(1, 2, 0, 3).reshape(h_kv, g * T, d)  # (h_kv, g*T, d), heads of a group together
    s = torch.bmm(qh, inp.k.permute(1, 2, 0)).mul_(scale).view(h_kv, g, T, n_kv)  # (h_kv, g, T, n_kv)
    mask = inp.mask
    if mask is None and T > 1:  # rows sit at the end of k/v: row i sees kv[: n_kv - T + i + 1]
        idx = torch.arange(n_kv, device=q.device)
        mask = idx[None, :] <= (n_kv - T + torch.arange(T, device=q.device))[:, None]
    if mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    p = torch.softmax(s.view(h_kv, g * T, n_kv), dim=-1)
    y = torch.bmm(p, inp.v.permute(1, 0, 2))  # (h_kv, g*T, dv)
    return y.view(h_kv, g, T, dv).permute(2, 0, 1, 3).reshape(T, H * dv)


class FeedForward(nn.Module):
    """SwiGLU. Gate and up stay separate: fused into one (2*n_ff, n_embd) matrix they were
    slower at prefill here (9.8 ms vs 2 x 4.1 ms at M=128 on llama-small shapes)."""

    fused = False  # fast mode: silu(gate) * up as one native op (engine.kernels.silu_mul), the fused block's

    def __init__(self, cfg: ModelConfig, n_ff: int = 0) -> None:  # n_ff: another width (a shared expert's)
        super().__init__()
        n_ff = n_ff or cfg.n_ff
        self.w1 = Linear(cfg.n_embd, n_ff)  # gate
        self.w3 = Linear(cfg.n_embd, n_ff)  # up
        self.w2 = Linear(n_ff, cfg.n_embd)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.dtype == torch.float32 and x.device.type == "cpu":
            return self.w2(kernels.silu_mul(self.w1(x), self.w3(x)))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
