"""RWKV-7 ("Goose"), as llama.cpp runs it (src/models/rwkv7.cpp, rwkv7-base.cpp) and HF-format checkpoints
(fla / rwkv7-hf) define it.

Every layer is recurrent: a time mix (the wkv7 recurrence, RWKV's attention) and a channel mix (its
feed-forward), each fed by *token shift*, the previous token's normalised row. A sequence's state per layer
is therefore two rows (the last inputs of both mixes, ``r``) and one N x N matrix per head (``s``), kept in
the same recurrent memory and allocators as Mamba's; nothing grows with context.

    x = LN0(emb[token])
    per layer:  a = LN(x);  x += TimeMix(a, a shifted);  f = LN(x);  x += ChannelMix(f, f shifted)
    logits = head(LN(x))

TimeMix, per token (sx = previous row - row; the lerp weights give six mixes r, w, k, v, a, g):
    r, k, v = R xr, K xk, V xv
    w  = exp(-e^-0.5 sigmoid(w0 + w2 tanh(w1 xw)))          # decay per channel, in (e^-0.61, 1)
    v  = v + (v_first - v) sigmoid(v0 + v2 v1 xv)            # layers > 0; v_first is layer 0's v
    a  = sigmoid(a0 + a2 a1 xa);  g = g2 sigmoid(g1 xg)
    kk = l2norm_per_head(k k_k);  k = k (1 + (a - 1) k_a)
    S  = S diag(w) + v k^T + (S (-kk)) (kk a)^T;  y = S r   # per head
    y  = GroupNorm(heads, eps 64e-5)(y) + ((r k r_k) summed per head) v
    out = O (y g)
ChannelMix: k = relu(K (x + sx lerp_k))^2;  out = V k.

The GroupNorm eps is llama.cpp's constant 64e-5 (HF: head size x norm_eps, the same at 64 and 1e-5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine import kernels
from engine.config import ModelConfig
from engine.model.layers import Embedding, Linear
from engine.model.llama import Transformer

GROUP_NORM_EPS = 64e-5
DECAY_SCALE = math.exp(-0.5)


def wkv7_loop(r, w, k, v, a, b, s):
    """The recurrence token by token (llama.cpp's ggml_rwkv_wkv7 with a = -kk, b = kk * iclr): the reference
    for engine.kernels.wkv7 and the path off the CPU. (S, T, H, N) inputs, s (S, H, N[value], N[key])."""
    ys = []
    for t in range(r.shape[1]):
        sa = s @ a[:, t, :, :, None]  # (S, H, N, 1)
        s = s * w[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :] + sa * b[:, t, :, None, :]
        ys.append((s @ r[:, t, :, :, None]).squeeze(-1))
    return torch.stack(ys, dim=1), s


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def _shifted(x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Each row's previous row within its sequence, the first from the stored state: (S, T, C), (S, C)."""
    return torch.cat((prev.unsqueeze(1).to(x.dtype), x[:, :-1]), dim=1)


class TimeMix(nn.Module):
    native = True  # the native wkv7 where the kernels are built; tests/bench/test_scan_speed.py times both

    def __init__(self, cfg: ModelConfig, il: int) -> None:
        super().__init__()
        C, self.N = cfg.n_embd, cfg.wkv_head_size
        self.H = C // self.N
        self.first = il == 0
        self.lerp = nn.Parameter(torch.empty(6, 1, 1, C), requires_grad=False)  # r, w, k, v, a, g
        for name in ("w0", "a0", "v0", "k_k", "k_a", "r_k"):
            setattr(self, name, nn.Parameter(torch.empty(C), requires_grad=False))
        self.w1, self.w2 = Linear(C, cfg.n_lora_decay), Linear(cfg.n_lora_decay, C)
        self.a1, self.a2 = Linear(C, cfg.n_lora_iclr), Linear(cfg.n_lora_iclr, C)
        rv = cfg.n_lora_iclr if self.first else cfg.n_lora_value_res_mix  # layer 0's are unused copies of a1/a2
        self.v1, self.v2 = Linear(C, rv), Linear(rv, C)
        self.g1, self.g2 = Linear(C, cfg.n_lora_gate), Linear(cfg.n_lora_gate, C)
        self.receptance, self.key, self.value, self.output = (Linear(C, C) for _ in range(4))
        self.ln = LayerNorm(C, GROUP_NORM_EPS)

    def forward(self, x: torch.Tensor, prev: torch.Tensor, v_first: torch.Tensor | None, state: torch.Tensor):
        """x (S, T, C) normalised; prev (S, C); state (S, H, N, N) -> out (S, T, C), v_first, state."""
        S, T, C = x.shape
        H, N = self.H, self.N
        xr, xw, xk, xv, xa, xg = (x + (_shifted(x, prev) - x) * self.lerp).unbind(0)  # six (S, T, C)
        flat = lambda t: t.reshape(S * T, C)  # noqa: E731  (Linear takes rows)
        r, k, v = self.receptance(flat(xr)), self.key(flat(xk)), self.value(flat(xv))
        w = torch.exp(-DECAY_SCALE * torch.sigmoid(self.w2(torch.tanh(self.w1(flat(xw)))) + self.w0))
        if self.first:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v2(self.v1(flat(xv))) + self.v0)
        a = torch.sigmoid(self.a2(self.a1(flat(xa))) + self.a0)
        g = self.g2(torch.sigmoid(self.g1(flat(xg))))
        kk = F.normalize((k * self.k_k).view(S * T, H, N), dim=-1, eps=1e-12).view(S * T, C)
        k = k * (1 + (a - 1) * self.k_a)
        heads = lambda t: t.float().reshape(S, T, H, N)  # noqa: E731
        native = self.native and state.device.type == "cpu" and kernels.fused_available()
        y, state = (kernels.wkv7 if native else wkv7_loop)(heads(r), heads(w), heads(k), heads(v), heads(-kk),
                                                           heads(kk * a), state.float())
        y = F.group_norm(y.reshape(S * T, C), H, self.ln.weight, self.ln.bias, GROUP_NORM_EPS).to(x.dtype)
        rk = (r * k * self.r_k).view(S * T, H, N).sum(-1, keepdim=True)  # (S*T, H, 1)
        y = y + (rk * v.view(S * T, H, N)).view(S * T, C)
        return self.output(y * g).view(S, T, C), v_first, state


class ChannelMix(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.lerp_k = nn.Parameter(torch.empty(cfg.n_embd), requires_grad=False)
        self.key = Linear(cfg.n_embd, cfg.n_ff)
        self.value = Linear(cfg.n_ff, cfg.n_embd)

    def forward(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        S, T, C = x.shape
        xk = x + (_shifted(x, prev) - x) * self.lerp_k
        return self.value(torch.relu(self.key(xk.reshape(S * T, C))).square()).view(S, T, C)


class RWKV7Block(nn.Module):
    def __init__(self, cfg: ModelConfig, il: int) -> None:
        super().__init__()
        self.il = il
        self.attn_norm = LayerNorm(cfg.n_embd, cfg.norm_eps)
        self.time_mix = TimeMix(cfg, il)
        self.ffn_norm = LayerNorm(cfg.n_embd, cfg.norm_eps)
        self.channel_mix = ChannelMix(cfg)

    def forward(self, x: torch.Tensor, v_first, mctx):
        """x (S, T, C) -> x, v_first; reads and writes this layer's token shifts and wkv state in mctx."""
        shift, state = mctx.rs_get(self.il)  # (S, 2, C): the rows that last entered the two mixes; (S, H, N, N)
        a = self.attn_norm(x)
        h, v_first, state = self.time_mix(a, shift[:, 0], v_first, state)
        x = x + h
        f = self.ffn_norm(x)
        x = x + self.channel_mix(f, shift[:, 1])
        mctx.rs_set(self.il, torch.stack((a[:, -1], f[:, -1]), dim=1).float(), state)
        return x, v_first


class RWKV7LM(Transformer):
    """The Transformer's loading (Weights, fast mode) with RWKV-7's blocks, LayerNorms and forward."""

    def __init__(self, cfg: ModelConfig) -> None:
        nn.Module.__init__(self)
        self.config = cfg
        self.tok_embeddings = Embedding(cfg.n_vocab, cfg.n_embd)
        self.emb_norm = LayerNorm(cfg.n_embd, cfg.norm_eps)
        self.layers = nn.ModuleList(RWKV7Block(cfg, il) for il in range(cfg.n_layer))
        self.norm = LayerNorm(cfg.n_embd, cfg.norm_eps)
        self.output = Linear(cfg.n_embd, cfg.n_vocab)

    def forward(self, token: torch.Tensor, pos: torch.Tensor, mctx, out_rows: torch.Tensor | None = None) -> torch.Tensor:
        """token, pos: (S*T,) of a split_equal ubatch -> logits (n_out, n_vocab) float32."""
        S = max(mctx.ubatch.n_seqs, 1)
        x = self.emb_norm(self.tok_embeddings(token).to(self.norm.weight.dtype))
        x = x.view(S, token.shape[0] // S, -1)  # (S, T, C)
        v_first = None
        for layer in self.layers:
            x, v_first = layer(x, v_first, mctx)
        x = x.reshape(token.shape[0], -1)
        if out_rows is not None:
            x = x[out_rows]
        return self.output(self.norm(x)).float()
