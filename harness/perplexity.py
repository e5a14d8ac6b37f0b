"""Perplexity and KL divergence of KV cache types, computed the way llama.cpp's llama-perplexity does.

llama-perplexity tokenizes the whole text once, cuts it into chunks of ``n_ctx`` tokens, puts BOS as a
chunk's first input token when the vocabulary adds BOS, evaluates each chunk from an empty cache, and
scores only the second half of each chunk: the logits at positions ``n_ctx/2 .. n_ctx-2`` predict the
tokens after them (the first half gives every scored token at least ``n_ctx/2`` tokens of context). PPL
is exp of the mean negative log-likelihood; its uncertainty is ``PPL * sqrt(var(nll) / (N - 1))``,
llama.cpp's "+/-". Doing the same here makes kvbench's figures comparable with llama.cpp's.

With a reference cache type (float32 KV by default), every chunk also runs through a second memory of
that type, and each scored position gives ``KL(p_ref || p_test)`` and whether the two top-1 tokens
agree (llama.cpp's ``--kl-divergence`` reports the same against saved base logits). Nothing is
stored across chunks: two chunks of logits at a time, whatever the corpus length.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from engine.batch import Batch
from engine.errors import ConfigError
from engine.loader import LoadedModel, create_engine, create_memory
from engine.memory.kv_cache import CacheSpec


@dataclass
class QualityResult:
    n_ctx: int
    n_chunks: int
    n_scored: int  # tokens scored
    type_k: str
    type_v: str
    attn_rot: bool  # llama.cpp's Hadamard rotation of quantized K/V (engine/memory/kv_cache.py)
    ppl: float
    ppl_stderr: float
    nll_mean: float
    reference: str = ""  # "type_k/type_v" of the KL reference, "" without one
    kld: dict = field(default_factory=dict)  # mean, stderr, p50, p90, p95, p99, max (nats)
    top1_agreement: float = float("nan")
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def chunk_inputs(tokens: list[int], n_ctx: int, bos: int | None) -> list[tuple[list[int], list[int]]]:
    """(input tokens, scored targets) per chunk; the first input token replaced by BOS when given."""
    first = n_ctx // 2
    out = []
    for i in range(len(tokens) // n_ctx):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx]
        inputs = ([bos] + chunk[1:]) if bos is not None else list(chunk)
        out.append((inputs, chunk[first + 1:]))  # logits at first .. n_ctx - 2 predict these
    return out


def _logits(eng, tokens: list[int]) -> torch.Tensor:
    eng.memory.clear()
    b = Batch()
    b.add_sequence(tokens, 0, output="all")
    return eng.decode(b).float()  # (n_ctx, n_vocab)


def evaluate(lm: LoadedModel, tokens: list[int], n_ctx: int = 512, n_chunks: int | None = None,
             type_k: str = "f32", type_v: str = "f32", reference: tuple[str, str] | None = None,
             n_ubatch: int = 512, progress=None, attn_rot: bool = True) -> QualityResult:
    """Perplexity of ``tokens`` with the given K/V cache types; KL divergence against ``reference`` types."""
    if n_ctx < 4 or n_ctx % 2:
        raise ConfigError(f"-c {n_ctx}: the context must be an even number of tokens >= 4")
    available = len(tokens) // n_ctx
    if available < 1:
        raise ConfigError(f"the text has {len(tokens)} tokens, fewer than one chunk of -c {n_ctx}; give a longer "
                          "text or a smaller -c")
    n = available if n_chunks is None else min(n_chunks, available)
    if n < 1:
        raise ConfigError(f"--chunks {n_chunks}: must be at least 1")
    tok = lm.tokenizer
    bos = tok.bos_id if tok.add_bos else None
    chunks = chunk_inputs(tokens, n_ctx, bos)[:n]
    first = n_ctx // 2

    def engine(tk: str, tv: str):
        spec = CacheSpec(size=n_ctx, type_k=tk, type_v=tv, attn_rot=attn_rot)
        return create_engine(lm, create_memory(lm, spec), n_ubatch)

    test = engine(type_k, type_v)
    ref = engine(*reference) if reference else None
    nll, kld, agree = [], [], []
    t0 = time.perf_counter()
    for inputs, targets in chunks:
        lp = torch.log_softmax(_logits(test, inputs)[first:n_ctx - 1].double(), dim=-1)
        tgt = torch.tensor(targets, dtype=torch.long)
        nll.append((-lp.gather(1, tgt[:, None])[:, 0]).numpy())
        if ref is not None:
            lr = torch.log_softmax(_logits(ref, inputs)[first:n_ctx - 1].double(), dim=-1)
            kld.append((lr.exp() * (lr - lp)).sum(-1).clamp_min(0).numpy())  # >= 0 up to rounding
            agree.append((lr.argmax(-1) == lp.argmax(-1)).numpy())
        if progress is not None:
            progress.update(1)
    x = np.concatenate(nll)
    mean = float(x.mean())
    ppl = math.exp(mean)
    var = float(x.var())  # llama.cpp: nll2/N - (nll/N)^2
    res = QualityResult(n_ctx, n, int(x.size), type_k, type_v, attn_rot, ppl,
                        ppl * math.sqrt(var / (x.size - 1)) if x.size > 1 else float("nan"), mean,
                        seconds=time.perf_counter() - t0)
    if ref is not None:
        k = np.concatenate(kld)
        res.reference = "/".join(reference)
        res.kld = {"mean": float(k.mean()), "stderr": float(k.std(ddof=1) / math.sqrt(k.size)) if k.size > 1 else 0.0,
                   **{f"p{q}": float(np.percentile(k, q)) for q in (50, 90, 95, 99)}, "max": float(k.max())}
        res.top1_agreement = float(np.concatenate(agree).mean())
    test.memory.close()
    if ref is not None:
        ref.memory.close()
    return res
