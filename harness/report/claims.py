"""The seed article's claims next to what kvbench measures (experiment=seed_claims).

The article (llama-7B, 512 tokens, RTX 4090) claims, from pre-allocation and cell pooling:
single-request latency 85 -> 52 ms, memory fragmentation 28% -> 7%, "continuous inference
stability" 62% -> 98%, peak memory 12 GB -> 7.2 GB. It defines none of them. kvbench puts each
claim next to its own metrics (docs/metrics.md), naive -> pooled (and paged), and says whether the
measured change is anything like the claimed one.

Verdicts come from intervals, not from single runs: naive and pooled runs of the same round are
paired, and the change naive -> pooled is the geometric mean of the per-round ratios (times, bytes)
or the mean per-round difference (fractions, in points), with its 95% interval (harness/stats.py).
``claim_verdict`` then says "holds", "partly", "does not hold" or "inconclusive" from where that
interval lies relative to 0 (no effect) and to the claimed effect. A row with runs measured under
contention is inconclusive. Byte counts of memory-only runs are exact (zero-width intervals).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from harness.stats import Interval, paired, paired_diff

GB = 1e9


@dataclass(frozen=True)
class Claim:
    name: str
    article: str  # as the article states it
    naive: float
    pooled: float
    unit: str  # "ms", "GB" (compared as ratios) or "fraction" (compared as differences in points)

    @property
    def change(self) -> float:
        """The claimed effect in the unit it is compared in: relative change, or difference of fractions."""
        if self.unit == "fraction":
            return self.pooled - self.naive
        return self.pooled / self.naive - 1


CLAIMS = [
    Claim("single-request latency", "85 ms -> 52 ms", 85.0, 52.0, "ms"),
    Claim("memory fragmentation", "28% -> 7%", 0.28, 0.07, "fraction"),
    Claim("continuous inference stability", "62% -> 98%", 0.62, 0.98, "fraction"),
    Claim("peak memory", "12 GB -> 7.2 GB", 12.0, 7.2, "GB"),
]


@dataclass(frozen=True)
class Measure:
    claim: int  # index into CLAIMS
    model: str  # "timed" (the real-arithmetic model) or "shape" (the memory-only 7B shape)
    workload: str  # the naive side's workload
    metric: str
    what: str
    lower_is_better: bool
    pooled_workload: str = ""  # the pooled side's workload when it differs (the pool sized to the workload)
    note: str = ""
    timed: bool = False  # moved by a neighbour's CPU use: noisy runs make the verdict inconclusive


MEASURES = [
    Measure(0, "timed", "claims_single", "latency.ttft_ms.p50", "TTFT p50, 448-token prompt", True,
            note="the article does not say which latency; kvbench reports three", timed=True),
    Measure(0, "timed", "claims_single", "latency.tpot_ms.p50", "TPOT p50", True, timed=True),
    Measure(0, "timed", "claims_single", "latency.e2e_ms.p50", "E2E p50, 448 + 64 tokens", True, timed=True),
    Measure(1, "timed", "claims_continuous", "fragmentation.kv_waste.time_weighted",
            "kv_waste = 1 - live/reserved, time-weighted", True, note="not defined by the article"),
    Measure(1, "timed", "claims_continuous", "fragmentation.allocator.time_weighted",
            "malloc's own view: free/held bytes (mallinfo2)", True),
    Measure(2, "timed", "claims_continuous", "stability.steps_within_25pct",
            "decode steps within +-25% of the median step", False, note="not defined by the article", timed=True),
    Measure(2, "timed", "claims_continuous", "stability.requests_clean",
            "requests finished without preemption or failure", False),
    Measure(3, "timed", "claims_continuous", "memory.peak_rss_bytes", "process peak RSS (VmHWM), equal cache.size",
            True),
    Measure(3, "timed", "claims_single", "memory.peak_rss_bytes",
            "process peak RSS (VmHWM), pool sized to the workload (512 cells)", True,
            pooled_workload="claims_single_sized"),
    Measure(3, "shape", "claims_single", "memory.model_peak_bytes",
            "weights (f16) + KV peak incl. growth transients, memory-only, equal cache.size 2048 (exact bytes)",
            True),
    Measure(3, "shape", "claims_single", "memory.model_peak_bytes",
            "the same, pool sized to the workload (512 cells, as llama.cpp's -c would be set)", True,
            pooled_workload="claims_single_sized"),
    Measure(3, "shape", "claims_continuous", "memory.model_peak_bytes",
            "the same, cache.size 2048 = 4 slots x 512 tokens, which is also what this workload needs", True),
]
# llama.cpp's closest analogue of per-sequence vs pooled memory (backend=llamacpp, claims_setup/small_llamacpp_*):
# one stream of n_ctx / n_seq_max cells per sequence vs one unified pool. Only the continuous workload runs 4
# sequences; with one sequence the two memories are the same.
LLAMACPP_MEASURES = [m for m in MEASURES if m.model == "timed" and m.workload == "claims_continuous"]
KVBENCH = ("naive", "pooled", "paged")
LLAMACPP = ("llamacpp.streams", "llamacpp.unified", None)
UNITS = {"latency": (1.0, " ms"), "memory": (1 / GB, " GB")}


def _runs(df: pd.DataFrame, model: str, workload: str, allocator: str | None) -> pd.DataFrame:
    if allocator is None or df.empty or not {"model.name", "workload", "allocator"} <= set(df.columns):
        return df.iloc[0:0]
    return df[(df["model.name"] == model) & (df["workload"] == workload) & (df["allocator"] == allocator)]


def _by_round(runs: pd.DataFrame, col: str) -> dict[int, float]:
    ok = runs[runs["status"] == "ok"]
    if col not in ok:
        return {}
    return {int(r): float(v) for r, v in zip(ok["repeat"], pd.to_numeric(ok[col], errors="coerce")) if v == v}


def claim_verdict(claimed: float, iv: Interval, noisy: int, exact: bool, fraction: bool) -> str:
    """Where the measured change interval lies relative to no effect (0) and the claimed effect.

    ``claimed`` and ``iv`` are relative changes (ratio - 1), or differences in points for fractions."""
    if iv.n == 0:
        return "not measured (the point failed or was not run)"
    fmt = (lambda x: f"{x * 100:+.1f} points") if fraction else (lambda x: f"{x:+.1%}")
    est = fmt(iv.center)
    if noisy:
        return f"inconclusive: {noisy} of the runs were measured under contention (see Noise)"
    if not exact and not iv.known:
        return f"inconclusive: {est} from one round; an interval needs repeats >= 2 (3 or more to be useful)"
    lo, hi = (iv.center, iv.center) if exact and not iv.known else (iv.low, iv.high)
    span = est if lo == hi else f"{est} [{fmt(lo)}, {fmt(hi)}]"
    has_zero, has_claim = lo <= 0 <= hi, lo <= claimed <= hi
    if has_zero and has_claim:
        return f"inconclusive: {span} spans both no effect and the claimed {fmt(claimed)}"
    if has_zero:
        return f"does not hold: no detectable difference, {span} (claimed {fmt(claimed)})"
    if (lo > 0) != (claimed > 0):
        return f"does not hold: pooled is worse, {span} (claimed {fmt(claimed)})"
    smaller = lo > claimed if claimed < 0 else hi < claimed  # the whole interval between 0 and the claim
    if has_claim or not smaller:
        return f"holds: {span} (claimed {fmt(claimed)})"
    if max(abs(lo), abs(hi)) < abs(claimed) / 3:
        return f"does not hold: a real change, but under a third of the claim: {span} (claimed {fmt(claimed)})"
    return f"partly: a real change, smaller than claimed: {span} (claimed {fmt(claimed)})"


def claims_table(df: pd.DataFrame, timed: str = "llama-small", shape: str = "llama-7b") -> pd.DataFrame:
    """One row per measure; ``df`` is the runs frame (one row per run, with ``repeat`` and ``noisy``)."""

    def fmt(x: float, scale: float, unit: str) -> str:
        v = x * scale
        return "n/a" if x != x else f"{v:.0f}{unit}" if 1000 <= abs(v) < 1e7 else f"{v:.3g}{unit}"

    rows = []
    for m, (per_seq, pool, third) in [(m, KVBENCH) for m in MEASURES] + [(m, LLAMACPP) for m in LLAMACPP_MEASURES]:
        claim = CLAIMS[m.claim]
        model = timed if m.model == "timed" else shape
        scale, unit = UNITS.get(m.metric.split(".")[0], (1.0, ""))
        naive = _runs(df, model, m.workload, per_seq)
        pooled = _runs(df, model, m.pooled_workload or m.workload, pool)
        paged = _runs(df, model, m.pooled_workload or m.workload, third)
        a, b = _by_round(naive, m.metric), _by_round(pooled, m.metric)
        rounds = sorted(a.keys() & b.keys())
        fraction = claim.unit == "fraction"
        iv = (paired_diff if fraction else paired)([a[r] for r in rounds], [b[r] for r in rounds])
        if not fraction and iv.n:
            iv = Interval(iv.center - 1, iv.low - 1, iv.high - 1, iv.n)
        noisy = int(naive[naive["repeat"].isin(rounds)]["noisy"].sum() + pooled[pooled["repeat"].isin(rounds)]["noisy"].sum()) \
            if "noisy" in df and m.timed else 0
        exact = m.model == "shape"
        med = [pd.Series(list(_by_round(x, m.metric).values()), dtype=float).median() for x in (naive, pooled, paged)]
        name = f"{claim.name} ({m.note})" if m.note else claim.name
        what = f"{m.what}, {model}, {m.workload.removeprefix('claims_')} workload"
        medians = f"{fmt(med[0], scale, unit)} -> {fmt(med[1], scale, unit)}"
        if third:
            medians += f" (paged {fmt(med[2], scale, unit)})"
        else:
            what = f"llama.cpp itself, one stream per sequence -> one unified pool: {what}"
        rows.append([name, claim.article, what, medians,
                     len(rounds), claim_verdict(claim.change, iv, noisy, exact, fraction)])
    return pd.DataFrame(rows, columns=["claim", "article (naive -> pooled)", "kvbench measures",
                                       "measured medians (naive -> pooled)", "rounds", "verdict"])


def consistency_notes(df: pd.DataFrame, shape: str = "llama-7b") -> list[str]:
    """What the article's numbers imply, checked against the 7B shape's exact byte counts."""
    out = []
    runs = _runs(df, shape, "claims_single", "naive")
    w = pd.to_numeric(runs.get("memory.weights_bytes", pd.Series(dtype=float)), errors="coerce").median()
    kv_tok = pd.to_numeric(runs.get("memory.kv_bytes_per_token", pd.Series(dtype=float)), errors="coerce").median()
    if not math.isnan(w) and not math.isnan(kv_tok):
        kv512 = 512 * kv_tok
        out.append(f"LLaMA-7B's weights alone are {w / GB:.1f} GB in f16, more than the article's 12 GB peak "
                   f"for naive: its numbers cannot describe an f16 7B model.")
        out.append(f"The whole KV cache of one 512-token sequence is {kv512 / GB:.3f} GB (f16, 32 layers): the "
                   f"claimed 4.8 GB saving is {4.8e9 / kv512:.0f}x the entire KV cache, so it cannot come from how "
                   f"that cache is allocated.")
    out.append("A pre-allocated pool reserves its full size up front: at equal cache.size it holds more memory "
               "than per-sequence growth, not less. Sized to what the workload needs, it holds about what naive "
               "growth peaks at (compare the two peak-memory rows of each model).")
    return out


def claims_markdown(df: pd.DataFrame) -> str:
    t = claims_table(df)
    lines = ["## Claims vs measured (experiment=seed_claims)", "",
             "Each row: the article's claim, what kvbench measures for it (definitions: docs/metrics.md), the "
             "medians naive -> pooled (paged in brackets), and a verdict from the paired change naive -> pooled "
             "over rounds with its 95% interval: *holds* (the interval excludes no effect and reaches the claimed "
             "size), *partly* (a real change, smaller than claimed), *does not hold* (no detectable change while "
             "the claim is excluded, or a change the other way), *inconclusive* (the interval spans both no "
             "effect and the claim, a single round, or noisy runs). Fractions are compared in points.", "",
             t.to_markdown(index=False), "", "What the article's numbers imply:", ""]
    lines += [f"- {n}" for n in consistency_notes(df)]
    return "\n".join(lines) + "\n"
