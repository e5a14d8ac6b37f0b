"""What a newcomer reads first: what ran (the setup block), what was found (sentences written from the paired
comparisons, each with its interval and the condition it holds under), and a glossary of the columns shown.

A finding is only written from a comparison whose 95% interval excludes no change and whose runs were not
measured under contention; everything else is said as what it is (no detectable difference, one round,
noisy), so the section never claims more than the intervals do.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.records import Record
from harness.report.frames import COMPARED, SUMMARY

# header shown in the tables -> one-line definition (docs/metrics.md has the full ones)
GLOSSARY = {
    "TPOT p50 (ms)": "time per output token after the first, median over requests",
    "TTFT p50 (ms)": "time to first token (queueing and prefill included), median over requests",
    "decode step p50 (ms)": "one scheduler step that only decodes, median",
    "decode step p99 (ms)": "the same, 99th percentile: the slow steps",
    "throughput (tok/s)": "generated tokens per second of the whole run",
    "peak RSS (MiB)": "the process's resident memory at its peak (the kernel's high-water mark), weights included",
    "KV reserved (MiB)": "bytes the KV (and recurrent state) allocator held at its peak, used or not",
    "modeled peak (GiB)": "memory-only runs: weights + the peak the allocator reserved, counted exactly from shapes",
    "KV waste (time-weighted)": "share of reserved KV bytes holding no token, averaged over the run's time",
    "external fragmentation (time-weighted)": "free KV room not in one contiguous run (pooled), averaged over time",
    "malloc fragmentation (time-weighted)": "the process allocator's held-but-unused share (naive's fragmentation)",
    "steady decode steps": "share of decode steps within 25% of the median step: how even the pace was",
    "requests never preempted": "share of requests that ran without being preempted for memory",
    "KV allocations per decode step": "storage allocations the KV memory made per decode step (pooled, paged: 0)",
    "preemptions": "requests evicted for memory and recomputed later",
    "max logit error vs f32 KV": "largest absolute logit difference of a probe prompt against an f32 cache",
    "KLD vs f32 KV (nats)": "mean KL divergence of next-token distributions against an f32 cache, on real text",
    "top-1 = f32 KV": "share of positions whose most likely token is the same as with an f32 cache",
}
assert {h for _, h, _ in SUMMARY} <= set(GLOSSARY), "every summary column needs a definition"


def _config(records: list[tuple[Path, Record]]) -> dict[str, set]:
    out: dict[str, set] = {}

    def add(k, v):
        if v not in (None, ""):
            out.setdefault(k, set()).add(str(v))

    for _, rec in records:
        c, m, e = rec.config, rec.metrics, rec.env
        add("model", (c.get("model") or {}).get("name"))
        add("compute mode", (c.get("model") or {}).get("compute") if not m.get("run.memory_only") else "memory-only")
        add("backend", c.get("backend"))
        add("allocator", m.get("run.memory_kind") or c.get("allocator"))
        wl = c.get("workload") or {}
        name = rec.choices.get("workload") or str(wl.get("_target_", "")).rsplit(".", 1)[-1]
        add("workload", f"{name} ({wl.get('n_requests')} requests)" if wl.get("n_requests") else name)
        add("parallel sequences", c.get("parallel"))
        cache = c.get("cache") or {}
        add("KV cache cells (cache.size)", m.get("run.cache_size") or cache.get("size"))
        add("K / V cache types", f"{cache.get('type_k')} / {cache.get('type_v')}")
        add("KV tier", cache.get("offload"))
        add("machine", f"{e.get('cpu')}, {e.get('cpu_count')} CPUs, {e.get('torch_threads')} torch threads"
            if e.get("cpu") else None)
        add("kvbench commit", (e.get("git_commit") or "")[:12])
    return out


def setup_markdown(records: list[tuple[Path, Record]], rounds: int) -> str:
    """What ran, one line per setting: every value the sweep used (a swept setting lists all of them)."""
    conf = _config(records)
    lines = ["## What ran", ""]
    for k, vals in conf.items():
        v = sorted(vals, key=lambda s: (len(s), s))
        lines.append(f"- {k}: {', '.join(v)}")
    lines.append(f"- rounds: {rounds} (each point run {rounds} time{'s' if rounds > 1 else ''}, interleaved)")
    return "\n".join(lines) + "\n"


def _pct(x: float) -> str:
    return f"{abs(x):.0%}" if abs(x) >= 0.095 else f"{abs(x):.1%}"


def _sentence(r) -> str:
    """'pooled cut TPOT p50 by 12% [8%, 15%] vs naive (cache.size=512)'."""
    name = next(h for m, h, *_ in COMPARED if m == r.metric)
    verb = "cut" if r.estimate < 0 else "raised"
    lo, hi = sorted((abs(r.ci95_low), abs(r.ci95_high)))
    better = "better" if (r.estimate < 0) == bool(r.lower_is_better) else "worse"
    cond = "" if r.condition == "(all)" else " at " + ", ".join(p.replace("=", " ") for p in r.condition.split(" "))
    unit = "" if r.kind == "ratio" else " (absolute)"
    return (f"**{r.variant}** {verb} {name} by {_pct(r.estimate)} [{_pct(lo)}, {_pct(hi)}]{unit} vs {r.baseline}"
            f"{cond} ({better}; {r.rounds} rounds).")


SMALL = 0.02  # changes below 2% are listed as a count, not as findings: real, but rarely worth acting on


def findings_markdown(runs: pd.DataFrame, points: pd.DataFrame, comp: pd.DataFrame, limit: int = 10) -> str:
    lines = ["## Findings", ""]
    n_fail = int((runs["status"] == "failed").sum()) if "status" in runs else 0
    rounds = int(runs["repeat"].max()) + 1 if len(runs) else 0
    if comp.empty:
        lines.append("Nothing to compare: the sweep varies no allocator, cache type or offload tier under "
                     "otherwise equal settings. The summary below lists each point.")
    else:
        decided = comp[comp["verdict"].str.startswith(("higher", "lower"))].copy()
        decided["size"] = decided["estimate"].abs()
        decided = decided.sort_values("size", ascending=False)
        small = decided[(decided["size"] < SMALL) & (decided["kind"] == "ratio")]
        decided = decided.drop(small.index)
        for r in decided.head(limit).itertuples():
            lines.append(f"- {_sentence(r)}")
        if len(decided) > limit:
            lines.append(f"- ... and {len(decided) - limit} more differences in the comparisons table.")
        if len(small):
            lines.append(f"- {len(small)} more differences are real but below {SMALL:.0%} (in the comparisons table).")
        same = comp[comp["verdict"] == "no detectable difference"]
        if len(same):
            names = sorted({next(h for m, h, *_ in COMPARED if m == x) for x in same["metric"]})
            lines.append(f"- No detectable difference (95% intervals include 0) in {len(same)} comparisons, of: "
                         f"{', '.join(names)}.")
        noisy = comp[comp["verdict"].str.startswith("inconclusive")]
        if len(noisy):
            lines.append(f"- {len(noisy)} comparisons are inconclusive: their runs were measured while something "
                         "else used the machine (see Noise). Rerun with --retry-noisy.")
        if rounds < 2:
            lines.append("- One round only: there are no intervals, so no difference is claimed. Run with "
                         "repeats=3 to get verdicts.")
        elif decided.empty and not len(same) and not len(noisy):
            lines.append("- No comparison reached a verdict.")
    mem_only = points[points.get("run.memory_only", pd.Series(False, index=points.index)) == True]  # noqa: E712
    if len(mem_only):
        lines.append(f"- {len(mem_only)} point(s) ran memory-only (shapes without weights): their bytes are exact, "
                     "they have no timings.")
    if n_fail:
        lines.append(f"- {n_fail} run(s) failed; the reasons are under Failed runs.")
    return "\n".join(lines) + "\n"


def glossary_markdown(shown: list[str]) -> str:
    rows = [f"- **{h}**: {GLOSSARY[h]}" for h in shown if h in GLOSSARY]
    if not rows:
        return ""
    return "\n".join(["## Glossary", "", "The columns above; full definitions in kvbench's docs/metrics.md.", ""]
                     + rows) + "\n"
