"""The seed article's claims next to what kvbench measures (experiment=seed_claims).

The article (llama-7B, 512 tokens, RTX 4090) claims, from pre-allocation and cell pooling:
single-request latency 85 -> 52 ms, memory fragmentation 28% -> 7%, "continuous inference
stability" 62% -> 98%, peak memory 12 GB -> 7.2 GB. It defines none of them. kvbench puts each
claim next to its own metrics (docs/metrics.md), naive -> pooled (and paged), and says plainly
whether the measured change is anything like the claimed one, or why the claim cannot be tested
as stated. Verdicts are computed from the numbers, not written in advance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

GB = 1e9
NOISE = 0.05  # relative changes smaller than this are run-to-run noise on this kind of machine


@dataclass(frozen=True)
class Claim:
    name: str
    article: str  # as the article states it
    naive: float
    pooled: float
    unit: str


CLAIMS = [
    Claim("single-request latency", "85 ms -> 52 ms", 85.0, 52.0, "ms"),
    Claim("memory fragmentation", "28% -> 7%", 0.28, 0.07, "fraction"),
    Claim("continuous inference stability", "62% -> 98%", 0.62, 0.98, "fraction"),
    Claim("peak memory", "12 GB -> 7.2 GB", 12.0, 7.2, "GB"),
]


def _pick(df: pd.DataFrame, model: str, workload: str, allocator: str, col: str) -> float:
    rows = df[(df.get("model.name") == model) & (df.get("workload") == workload) & (df.get("allocator") == allocator)
              & (df["status"] == "ok")]
    if rows.empty or col not in rows:
        return float("nan")
    return float(pd.to_numeric(rows[col], errors="coerce").mean())


def _change(a: float, b: float) -> float:
    """Relative change a -> b; +-inf when a is 0 and b is not (kv_waste of naive growth is exactly 0)."""
    if math.isnan(a) or math.isnan(b):
        return float("nan")
    if a == 0:
        return 0.0 if b == 0 else math.copysign(math.inf, b)
    return (b - a) / abs(a)


def _verdict(claimed: float, measured: float, better_is_lower: bool, noise: float = NOISE) -> str:
    """How the measured relative change naive -> pooled compares with the claimed one.

    ``noise``: changes smaller than this are not called a difference (0 for exact byte counts)."""
    if math.isnan(measured):
        return "not measured (the point failed or was not run)"
    good = -measured if better_is_lower else measured
    want = -claimed if better_is_lower else claimed
    shown = f"{measured:+.0%}" if math.isfinite(measured) else "from 0"
    if abs(measured) < noise:
        return f"does not hold: no measurable difference ({measured:+.1%}, within +-{noise:.0%}; claimed {claimed:+.0%})"
    if good < 0:
        return f"does not hold: pooled is worse ({shown} vs claimed {claimed:+.0%})"
    if good == 0:
        return f"does not hold: no difference (claimed {claimed:+.0%})"
    if good < want / 3:
        return f"does not hold: {shown} measured vs {claimed:+.0%} claimed"
    if good < 2 * want / 3:
        return f"partly: {shown} measured vs {claimed:+.0%} claimed"
    return f"holds in direction and size: {shown} measured vs {claimed:+.0%} claimed"


# (claim index, workload, metric, what kvbench measures, lower is better, note on the claim's first row)
MEASURES = [
    (0, "claims_single", "latency.ttft_ms.p50", "TTFT p50, 448-token prompt", True,
     "the article does not say which latency; kvbench reports three"),
    (0, "claims_single", "latency.tpot_ms.p50", "TPOT p50", True, ""),
    (0, "claims_single", "latency.e2e_ms.p50", "E2E p50, 448 + 64 tokens", True, ""),
    (1, "claims_continuous", "fragmentation.kv_waste.time_weighted", "kv_waste = 1 - live/reserved, time-weighted",
     True, "not defined by the article"),
    (1, "claims_continuous", "fragmentation.allocator.time_weighted", "malloc's own view: free/held bytes (mallinfo2)",
     True, ""),
    (2, "claims_continuous", "stability.steps_within_25pct", "decode steps within +-25% of the median step", False,
     "not defined by the article"),
    (2, "claims_continuous", "stability.requests_clean", "requests finished without preemption or failure", False, ""),
    (3, "claims_continuous", "memory.peak_rss_bytes", "process peak RSS (VmHWM)", True, ""),
]
UNITS = {"latency": (1.0, " ms"), "memory": (1 / GB, " GB")}


def claims_table(df: pd.DataFrame, timed: str = "llama-small", shape: str = "llama-7b") -> pd.DataFrame:
    def fmt(x: float, scale: float, unit: str) -> str:
        return "n/a" if math.isnan(x) else f"{x * scale:.3g}{unit}"

    def row(claim: Claim, model: str, wl: str, col: str, what: str, lower: bool, note: str, noise: float):
        scale, unit = UNITS.get(col.split(".")[0], (1.0, ""))
        n, p, g = (_pick(df, model, wl, a, col) for a in ("naive", "pooled", "paged"))
        name = f"{claim.name} ({note})" if note else claim.name
        return [name, claim.article, what, f"{fmt(n, scale, unit)} -> {fmt(p, scale, unit)} (paged {fmt(g, scale, unit)})",
                _verdict(_change(claim.naive, claim.pooled), _change(n, p), lower, noise)]

    rows = [row(CLAIMS[i], timed, wl, col, f"{what}, {timed}, {wl.removeprefix('claims_')} workload", lower, note, NOISE)
            for i, wl, col, what, lower, note in MEASURES]
    rows += [row(CLAIMS[3], shape, wl, "memory.model_peak_bytes",
                 f"weights (f16) + KV peak incl. growth transients, {shape} shape, memory-only, "
                 f"{wl.removeprefix('claims_')} workload, cache.size 2048 f16 (exact bytes)", True, "", 0.0)
             for wl in ("claims_single", "claims_continuous")]
    return pd.DataFrame(rows, columns=["claim", "article (naive -> pooled)", "kvbench measures",
                                       "measured (naive -> pooled)", "verdict"])


def consistency_notes(df: pd.DataFrame, shape: str = "llama-7b") -> list[str]:
    """What the article's numbers imply, checked against the 7B shape's exact byte counts."""
    out = []
    w = _pick(df, shape, "claims_single", "naive", "memory.weights_bytes")
    kv_tok = _pick(df, shape, "claims_single", "naive", "memory.kv_bytes_per_token")
    if not math.isnan(w) and not math.isnan(kv_tok):
        kv512 = 512 * kv_tok
        out.append(f"LLaMA-7B's weights alone are {w / GB:.1f} GB in f16, more than the article's 12 GB peak "
                   f"for naive: its numbers cannot describe an f16 7B model.")
        out.append(f"The whole KV cache of one 512-token sequence is {kv512 / GB:.3f} GB (f16, 32 layers): the "
                   f"claimed 4.8 GB saving is {4.8e9 / kv512:.0f}x the entire KV cache, so it cannot come from how "
                   f"that cache is allocated.")
    out.append("A pre-allocated pool reserves its full size up front: at equal cache.size it holds more memory "
               "than per-sequence growth, not less (see the KV reserved columns of the report).")
    return out


def claims_markdown(df: pd.DataFrame) -> str:
    t = claims_table(df)
    lines = ["## Claims vs measured (experiment=seed_claims)", "",
             "Each row: the article's claim, what kvbench measures for it (definitions: docs/metrics.md), "
             "naive -> pooled (paged in brackets), and a verdict computed from the relative change.", "",
             t.to_markdown(index=False), "", "What the article's numbers imply:", ""]
    lines += [f"- {n}" for n in consistency_notes(df)]
    return "\n".join(lines) + "\n"
