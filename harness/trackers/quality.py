"""Quality of a point's K/V cache types: KL divergence and top-1 agreement against f32 KV on real text.

Not a loop tracker: it runs before the measured loop (its forward passes must not count in any timing
or peak), through harness/perplexity.py on a fixed slice of the default corpus (Python's pydoc topics):
``trackers.quality_chunks`` chunks of ``trackers.quality_ctx`` tokens, scored as llama-perplexity scores
them. Metrics (docs/metrics.md, "Quality"): quality.kld.{mean,p99,max} in nats, quality.top1_agreement,
quality.ppl on that slice.
"""

from __future__ import annotations

from harness.corpus import default_text
from harness.perplexity import evaluate

_SLICE_CHARS = 60_000  # enough text for a few thousand tokens with any of our vocabularies


def quality_metrics(lm, spec, n_ctx: int = 256, n_chunks: int = 2) -> dict[str, float]:
    tokens = lm.tokenizer.encode(default_text()[:_SLICE_CHARS])
    r = evaluate(lm, tokens, n_ctx, n_chunks, spec.type_k, spec.type_v, ("f32", "f32"), attn_rot=spec.attn_rot)
    return {"quality.kld.mean": r.kld["mean"], "quality.kld.p99": r.kld["p99"], "quality.kld.max": r.kld["max"],
            "quality.top1_agreement": r.top1_agreement, "quality.ppl": r.ppl, "quality.n_scored": r.n_scored}
