"""LLaMA-family transformer (llama, mistral-style SWA, qwen2) over a pluggable memory.

The forward takes a ubatch of tokens that may mix sequences and positions; which cached
keys and values each token sees is the memory's business (``mctx``), so the same code runs
over a pooled cell cache, paged blocks or per-sequence tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from gguf import GGMLQuantizationType as T
from torch import nn

from engine import kernels
from engine.config import ModelConfig
from engine.model.layers import (
    SMALL_T,
    Embedding,
    FeedForward,
    Linear,
    RMSNorm,
    Rope,
    attend,
    attend_small,
)
from engine.model.weights import (
    DECODE_ACT,
    DenseWeight,
    PackedWeight,
    Weight,
    cat_weights,
    place_in_huge_pages,
)


class Attention(nn.Module):
    fused = False  # fast mode: attend_small for decode-sized ubatches (engine/model/layers.py)

    def __init__(self, cfg: ModelConfig, il: int) -> None:
        super().__init__()
        self.il = il
        self.n_head, self.n_head_kv = cfg.n_head, cfg.n_head_kv
        self.d_k, self.d_v = cfg.n_embd_head_k, cfg.n_embd_head_v
        self.sizes = [self.n_head * self.d_k, self.n_head_kv * self.d_k, self.n_head_kv * self.d_v]
        # q, k and v fused: one matmul (one pass over the weights) per layer.
        self.wqkv = Linear(cfg.n_embd, sum(self.sizes), bias=cfg.attn_bias)
        self.wo = Linear(self.n_head * self.d_v, cfg.n_embd)
        self.scale = cfg.attention_scale or self.d_k**-0.5  # Granite sets its own

    def forward(self, x: torch.Tensor, rope: Rope, cs, mctx) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.wqkv(x).split(self.sizes, dim=-1)
        q = rope.apply(q.view(T, self.n_head, self.d_k), cs)  # (T, n_head, d_k)
        k = rope.apply(k.view(T, self.n_head_kv, self.d_k), cs)  # (T, n_head_kv, d_k)
        v = v.view(T, self.n_head_kv, self.d_v)
        return self.wo(self.attend(q, k, v, mctx))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mctx) -> torch.Tensor:
        """Store this ubatch's k, v in the memory, attend over what it hands back: -> (T, n_head * d_v)."""
        T = q.shape[0]
        mctx.store(self.il, k, v)
        groups = mctx.attn_inputs(self.il)
        att = attend_small if self.fused and T <= SMALL_T else attend
        if len(groups) == 1 and groups[0].rows is None:
            return att(q, groups[0], self.scale)
        y = q.new_empty(T, self.n_head * self.d_v)
        for g in groups:
            y[g.rows] = att(q[g.rows], g, self.scale)
        return y

    def attend_native(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mctx) -> torch.Tensor:
        """attend() for a fused block at decode sizes: where the memory hands out its float rows as stored
        (KVStorage), the store, read and attend_small in one op (engine.kernels.kv_attend), equal bit for bit.
        The module path keeps attend(): it is the reference both are tested against."""
        st = mctx.kv_storage(self.il) if self.fused and q.shape[0] <= SMALL_T else None  # attend_small's domain
        return self.attend(q, k, v, mctx) if st is None else kernels.kv_attend(q, k, v, *st, self.scale)


class NativeBlock(NamedTuple):
    """A block's matrices as engine.kernels' fused decode ops read them: (GGUF bytes, kernel type) each, q/k/v as
    parts with their row counts (Weight.native, native_parts)."""

    wqkv: list[tuple[torch.Tensor, T | int, int]]  # parts stacked along n: (bytes, type, rows); int: an X16 layout
    wo: tuple[torch.Tensor, T | int]
    w1: tuple[torch.Tensor, T | int]
    w3: tuple[torch.Tensor, T | int]
    w2: tuple[torch.Tensor, T | int]
    n_ff: int


class TransformerBlock(nn.Module):
    """Pre-norm attention and SwiGLU feed-forward.

    Fast mode on the CPU (``fuse``): decode-sized ubatches run the block as two native ops around the memory
    (engine.kernels.attn_qkv, then ffn_block), equal bit for bit to the module path. At decode a block's ~20
    torch calls cost more in dispatch than in arithmetic: ~1.8 ms of a 5.4 ms step on llama-small Q4_0."""

    def __init__(self, cfg: ModelConfig, il: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        self.attention = Attention(cfg, il)
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        self.feed_forward = FeedForward(cfg)
        self.native: NativeBlock | None = None

    def fuse(self) -> bool:
        """Take the fused decode path where every matrix is one the native kernels read as it is (not F32,
        whose kernel is chosen per machine; q/k/v may be parts of mixed types); says whether it did."""
        ff = self.feed_forward
        parts = [self.attention.wqkv.weight.native_parts()]
        parts += [lin.weight.native() for lin in (self.attention.wo, ff.w1, ff.w3, ff.w2)]
        if not kernels.fused_available() or any(p is None for p in parts):
            return False
        self.native = NativeBlock(*parts, n_ff=ff.w1.weight.n)
        return True

    def forward(self, x, rope, cs, mctx):
        nb = self.native
        if nb is not None and x.shape[0] <= kernels.MAX_QMM_ROWS and x.dtype == torch.float32 and x.is_cpu:
            at, n1, n2 = self.attention, self.attention_norm, self.ffn_norm
            q, k, v = kernels.attn_qkv(x, n1.weight, n1.eps, nb.wqkv, at.wqkv.bias, cs if rope.n_rot else None,
                                       rope.neox, at.n_head, at.n_head_kv, at.d_k, at.d_v, DECODE_ACT)
            return kernels.ffn_block(x, at.attend_native(q, k, v, mctx), nb.wo, n2.weight, n2.eps, nb.w1, nb.w3, nb.w2,
                                     nb.n_ff, DECODE_ACT)
        h = x + self.attention(self.attention_norm(x), rope, cs, mctx)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    block: type[nn.Module] = TransformerBlock  # HybridLM swaps in blocks that may hold a Mamba mixer

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = Embedding(cfg.n_vocab, cfg.n_embd)
        self.layers = nn.ModuleList(self.block(cfg, il) for il in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        self.output = Linear(cfg.n_embd, cfg.n_vocab)
        if cfg.tied_output:  # one matrix, two uses (the file holds token_embd only)
            self.output.weight = self.tok_embeddings.weight
        self.rope = Rope(cfg)
        self.native = None  # fast mode on the CPU: the stack as one native op (fuse: engine.kernels.decode_stack)

    def forward(self, token: torch.Tensor, pos: torch.Tensor, mctx, out_rows: torch.Tensor | None = None) -> torch.Tensor:
        """token, pos: (T,) -> logits (n_out, n_vocab) float32 for ``out_rows`` (default all)."""
        # activations take the norms' float type: exact mode's dtype (even after .double()), float32 in fast mode
        logits = self._native_forward(token, pos, mctx, out_rows)
        if logits is None:
            x = self.tok_embeddings(token).to(self.norm.weight.dtype)  # (T, n_embd)
            if self.config.embedding_scale:
                x = x * self.config.embedding_scale
            cs = self.rope.angles(pos, x.dtype)
            for layer in self.layers:
                x = layer(x, self.rope, cs, mctx)
            if out_rows is not None:
                x = x[out_rows]
            logits = self.output(self.norm(x)).float()
        return logits / self.config.logit_scale if self.config.logit_scale else logits

    def _native_forward(self, token: torch.Tensor, pos: torch.Tensor, mctx,
                        out_rows: torch.Tensor | None) -> torch.Tensor | None:
        """The whole forward pass in one native op, where the model has one (fast mode: every block fused, the
        embedding and the output matrix read as stored) and the memory hands out every layer's storage with shared
        places (mctx.kv_stack): the logits, equal bit for bit to the module path's; else None. At decode the Python
        around ~30 native calls a step was most of the gap to llama.cpp (~0.8 ms of a 2.8 ms llama-small Q4_0 step)."""
        st = self.native
        if st is None or token.shape[0] > min(kernels.MAX_QMM_ROWS, SMALL_T) or not token.is_cpu:
            return None
        kv = mctx.kv_stack(len(self.layers))
        if kv is None:
            return None
        return st.forward(token, pos, kv.k, kv.v, *kv[2:], out_rows)

    def fuse(self) -> bool:
        """Fast mode on the CPU: fuse every block (TransformerBlock.fuse) and, where all of them fused with the
        same shapes and the embedding and output matrices are ones the kernels read as stored (and the embedding
        is not scaled), hand the flattened model to the one-op forward once (``native``: engine.kernels.decode_stack).
        Says whether it is native."""
        blocks = [b for b in self.layers if isinstance(b, TransformerBlock)]
        fused = [b.fuse() for b in blocks]
        self.native = None
        if not blocks or len(blocks) != len(self.layers) or not all(fused):
            return False
        attn = [b.attention for b in blocks]
        shapes = {(a.n_head, a.n_head_kv, a.d_k, a.d_v, a.scale, a.wqkv.bias is not None) for a in attn}
        eps = {n.eps for b in blocks for n in (b.attention_norm, b.ffn_norm)}
        head, embd = self.output.weight.native(), self.tok_embeddings.weight.native()
        if (len(shapes) != 1 or len(eps) != 1 or head is None or embd is None or not self.norm.fused
                or self.config.embedding_scale or self.norm.weight.dtype != torch.float32):
            return False
        ws, types, rows, nparts, norms = [], [], [], [], []
        e = self.config.n_embd
        for b in blocks:
            nb = b.native
            mats = [*nb.wqkv, (*nb.wo, e), (*nb.w1, nb.n_ff), (*nb.w3, nb.n_ff), (*nb.w2, e)]
            ws += [m[0] for m in mats]
            types += [int(m[1]) for m in mats]
            rows += [m[2] for m in mats]
            nparts.append(len(nb.wqkv))
            norms += [b.attention_norm.weight, b.ffn_norm.weight]
        biases = [a.wqkv.bias for a in attn] if attn[0].wqkv.bias is not None else []
        head = (self.norm.weight, self.norm.eps, *head, self.output.weight.n)
        embd = (*embd, self.tok_embeddings.weight.n)
        a = attn[0]
        self.native = kernels.decode_stack(embd, self.rope.inv_freq if self.rope.n_rot else None, ws, types, rows,
                                           nparts, norms, biases, self.rope.neox, a.n_head, a.n_head_kv, a.d_k, a.d_v,
                                           eps.pop(), a.scale, DECODE_ACT, head)
        return True

    @classmethod
    def from_weights(cls, cfg: ModelConfig, weights: dict[str, torch.Tensor | Weight],
                     device: torch.device | str = "cpu", fuse_copy: bool = True, compute: str = "exact") -> Transformer:
        """Build from kvbench-named parameters (engine.gguf.keymap): tensors, or ``Weight``s for the
        matrices (fast mode). Fuses q, k and v into one matrix; ``fuse_copy=False`` (weights that are
        views of a mapped file) keeps them apart rather than copying mapped pages."""
        with torch.device("meta"):
            model = cls(cfg)
        sd = dict(weights)
        for il in cfg.attn_layers:
            a = f"layers.{il}.attention."
            parts = [_as_weight(sd.pop(a + n + ".weight")) for n in ("wq", "wk", "wv")]
            sd[a + "wqkv.weight"] = cat_weights(parts, copy=fuse_copy)
            if cfg.attn_bias:
                sd[a + "wqkv.bias"] = torch.cat([sd.pop(a + n + ".bias") for n in ("wq", "wk", "wv")])
        if cfg.tied_output:
            sd["output.weight"] = sd["tok_embeddings.weight"]
        freq_factors = sd.pop("rope_freqs", None)
        for name in [n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), Weight)]:
            mod = model.get_submodule(name)
            mod.weight = _as_weight(sd.pop(name + ".weight"))
        if cfg.tied_output:
            model.output.weight = model.tok_embeddings.weight
        sd = {k: (v.dense() if isinstance(v, Weight) else v) for k, v in sd.items()}
        unexpected = model.load_state_dict(sd, strict=False, assign=True).unexpected_keys
        missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta
                   and n != "rope.inv_freq"]
        if missing or unexpected:  # keymap and model disagree: a bug here, not a user error
            raise AssertionError(f"parameters not loaded: {missing[:5]}; unknown: {unexpected[:5]}")
        model.rope = Rope(cfg)
        if compute == "fast":  # exact mode keeps torch's own norm, rope and attention kernels
            for m in model.modules():
                if isinstance(m, Attention) or (isinstance(m, (RMSNorm, Rope, FeedForward)) and kernels.fused_available()):
                    m.fused = True
        if freq_factors is not None:
            model.rope.set_freq_factors(freq_factors if isinstance(freq_factors, torch.Tensor) else freq_factors.dense())
        for p in model.parameters():
            p.requires_grad_(False)
        model = model.to(device).eval()
        if compute == "fast" and torch.device(device).type == "cpu":
            packed = [m for m in model.modules() if isinstance(m, PackedWeight)]
            if fuse_copy and not place_in_huge_pages(packed):  # which interleaves them on the way
                for m in packed:  # not over a mapped file, whose pages a copy would duplicate
                    m.interleave()
            model.fuse()
        return model


def _as_weight(w: torch.Tensor | Weight) -> Weight:
    return w if isinstance(w, Weight) else DenseWeight(w)
