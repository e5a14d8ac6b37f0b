"""Records -> pandas frames: runs (one row per record), points (runs grouped across rounds, each metric's
median with its 95% interval) and paired comparisons between variants. docs/metrics.md defines the
names; harness/stats.py the intervals."""

from __future__ import annotations

import math
import numbers
from pathlib import Path

import numpy as np
import pandas as pd

from harness.records import Record, flatten, point_id
from harness.stats import interval, paired, paired_diff

# columns of the short tables: (column, header with unit, scale)
SUMMARY = [
    ("latency.tpot_ms.p50", "TPOT p50 (ms)", 1),
    ("latency.ttft_ms.p50", "TTFT p50 (ms)", 1),
    ("latency.decode_step_ms.p50", "decode step p50 (ms)", 1),
    ("latency.decode_step_ms.p99", "decode step p99 (ms)", 1),
    ("throughput.tokens_per_s", "throughput (tok/s)", 1),
    ("memory.peak_rss_bytes", "peak RSS (MiB)", 1 / 2**20),
    ("memory.kv_reserved_peak_bytes", "KV reserved (MiB)", 1 / 2**20),
    ("memory.model_peak_bytes", "modeled peak (GiB)", 1 / 2**30),
    ("fragmentation.kv_waste.time_weighted", "KV waste (time-weighted)", 1),
    ("fragmentation.external.time_weighted", "external fragmentation (time-weighted)", 1),
    ("fragmentation.allocator.time_weighted", "malloc fragmentation (time-weighted)", 1),
    ("stability.steps_within_25pct", "steady decode steps", 1),
    ("stability.requests_clean", "requests never preempted", 1),
    ("alloc.calls_per_decode_step", "KV allocations per decode step", 1),
    ("requests.preemptions", "preemptions", 1),
    ("quality.logit_max_abs_err", "max logit error vs f32 KV", 1),
    ("quality.kld.mean", "KLD vs f32 KV (nats)", 1),
    ("quality.top1_agreement", "top-1 = f32 KV", 1),
]
# "allocator" is the memory that held the KV: an allocator of the torch backend, or llama.cpp's own memory
# (llamacpp.unified / llamacpp.streams) on backend=llamacpp, so plots and comparisons treat it as one axis
CONFIG_COLUMNS = ["model.name", "backend", "allocator", "cache.size", "cache.block_size", "cache.type_k", "cache.type_v",
                  "cache.offload", "cache.offload_layers", "parallel", "workload", "share_prefix"]
# run-level columns that are not metrics of the point (never aggregated)
_RUN_COLUMNS = {"job", "status", "error", "repeat", "point", "resumed_from", "noisy", "noise.reason", "duration_s",
                "git_commit", "noisy_attempts"}

# What the comparisons section compares: (dimension, config columns, preferred baseline level)
DIMENSIONS = [("allocator", ("allocator",), "naive"),
              ("cache type (K/V)", ("cache.type_k", "cache.type_v"), "f32/f32"),
              ("offload", ("cache.offload",), "device")]
# (metric, header, lower is better, paired as a ratio (True) or as a difference (False: fractions that can
# be 0), timed: a neighbour's CPU use moves it, so noisy runs make its verdict inconclusive)
COMPARED = [
    ("latency.tpot_ms.p50", "TPOT p50", True, True, True),
    ("latency.decode_step_ms.p50", "decode step p50", True, True, True),
    ("latency.ttft_ms.p50", "TTFT p50", True, True, True),
    ("throughput.tokens_per_s", "throughput", False, True, True),
    ("memory.peak_rss_bytes", "peak RSS", True, True, False),
    ("memory.kv_reserved_peak_bytes", "KV reserved", True, True, False),
    ("memory.model_peak_bytes", "modeled peak", True, True, False),
]


# -- frames ---------------------------------------------------------------------------------------
def records_frame(records: list[tuple[Path, Record]], root: Path) -> pd.DataFrame:
    """One row per run."""
    rows, metric_names = [], {}
    for path, rec in records:
        metric_names |= dict.fromkeys(rec.metrics)
        conf = flatten({k: v for k, v in rec.config.items() if k != "workload"})
        wl = rec.config.get("workload") or {}
        conf["workload"] = rec.choices.get("workload") or \
            str(wl.get("_target_", "")).rsplit(".", 1)[-1].replace("Workload", "").lower()
        conf |= {f"workload.{k}": v for k, v in flatten({k: v for k, v in wl.items() if k != "_target_"}).items()}
        if rec.metrics.get("run.memory_kind"):  # backend=llamacpp: llama.cpp's memory stands in the allocator axis
            conf["allocator"] = rec.metrics["run.memory_kind"]
        if isinstance(rec.metrics.get("run.cache_size"), int):  # the workload sized the cache (workload.fit_cache)
            conf["cache.size"] = rec.metrics["run.cache_size"]
        rows.append({"job": str(path.parent.relative_to(root)), "status": rec.status, "error": rec.error,
                     "repeat": int(rec.config.get("repeat") or 0), "point": point_id(rec.config),
                     "resumed_from": rec.resumed_from, "noisy": bool(rec.metrics.get("noise.flagged")),
                     "noisy_attempts": len(rec.noisy_attempts), **conf, **rec.metrics,
                     "duration_s": rec.duration_s, "git_commit": rec.env.get("git_commit", "")})
    df = pd.DataFrame(rows)
    if not df.empty:
        df = df.sort_values("job", key=lambda s: s.map(_job_key)).reset_index(drop=True)
    df.attrs["metrics"] = [m for m in metric_names if m != "noise.reason"]
    return df


def _job_key(job: str):
    head = job.split("/", 1)[0]
    return (0, int(head), job) if head.isdigit() else (1, 0, job)


def varying(df: pd.DataFrame, cols: list[str]) -> list[str]:
    """The config columns that take more than one value in this sweep (the ones worth showing, and the ones a
    comparison must hold equal). With "workload" among them, its parameters too (workload.prompt_len ...)."""
    if "workload" in cols and "workload" in df:
        # a parameter counts where it varies under one workload name: the named workloads (claims_single ...)
        # fix their own, and those follow from the name
        by_name = df.astype({"workload": str}).groupby("workload")
        cols = list(cols) + [c for c in df.columns if c.startswith("workload.") and c not in cols
                             and (by_name[c].nunique(dropna=False) > 1).any()]
    out = [c for c in cols if c in df and df[c].astype(str).nunique() > 1]
    return out or [c for c in ("allocator",) if c in df]


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v)


def _metric_columns(runs: pd.DataFrame) -> list[str]:
    """The numeric metrics of the runs (records_frame keeps their names in ``attrs``), plus duration_s."""
    names = runs.attrs.get("metrics", []) + ["duration_s"]
    return [c for c in names if c in runs and runs[c].map(_is_number).any()]


# metrics that are fractions 0..1: their intervals are taken on the raw scale and clipped to [0, 1]
_FRACTIONS = ("fragmentation.", "stability.", "noise.steal", "quality.top1_agreement")


def _bounds(metric: str) -> tuple[float, float] | None:
    return (0.0, 1.0) if metric.startswith(_FRACTIONS) else None


def points_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per point: config, run counts, and each metric's median with its 95% interval."""
    if runs.empty:
        return runs
    metrics = set(_metric_columns(runs))
    rows = []
    for _, g in runs.groupby("point", sort=False):
        ok = g[g["status"] == "ok"]
        use = ok if len(ok) else g[g["status"] == "degraded"]
        statuses = set(g["status"])
        status = "ok" if statuses == {"ok"} else "failed" if statuses == {"failed"} else "degraded"
        first = (use if len(use) else g).iloc[0]
        row = {c: first[c] for c in runs.columns if c not in metrics}
        row |= {"job": first["job"], "status": status, "runs": len(g), "runs_ok": len(ok),
                "noisy": int(g["noisy"].sum()), "repeat": ",".join(str(r) for r in sorted(g["repeat"])),
                "error": "; ".join(sorted({e for e in g["error"] if e})),
                "resumed_from": "; ".join(sorted({s for s in g["resumed_from"] if s}))}
        for c in sorted(metrics):
            iv = interval(use[c].tolist() if c in use else [], bounds=_bounds(c))
            row[c] = iv.center
            row[f"{c}.ci95_low"], row[f"{c}.ci95_high"] = iv.low, iv.high
        rows.append(row)
    return pd.DataFrame(rows)


def _levels(df: pd.DataFrame, cols: tuple[str, ...]) -> pd.Series:
    return df[list(cols)].astype(str).agg("/".join, axis=1)


def comparisons(runs: pd.DataFrame) -> pd.DataFrame:
    """Paired comparisons over rounds, long format: one row per (dimension, level, condition, metric)."""
    cols = ["dimension", "baseline", "variant", "condition", "metric", "kind", "lower_is_better", "rounds",
            "noisy_runs", "estimate", "ci95_low", "ci95_high", "verdict"]
    ok = runs[runs["status"] == "ok"] if not runs.empty else runs
    out = []
    if ok.empty:
        return pd.DataFrame(columns=cols)
    conf_vary = varying(ok, CONFIG_COLUMNS)
    for dim, dcols, preferred in DIMENSIONS:
        if not set(dcols) <= set(ok.columns) or _levels(ok, dcols).nunique() < 2:
            continue
        cond_cols = [c for c in conf_vary if c not in dcols and c != "backend"]  # the allocator names the backend
        level = _levels(ok, dcols)
        order = list(dict.fromkeys(level))
        base = preferred if preferred in order else order[0]
        groups = ok.groupby(cond_cols, sort=False, dropna=False) if cond_cols else [((), ok)]
        for key, g in groups:
            key = key if isinstance(key, tuple) else (key,)
            cond = " ".join(f"{c}={v}" for c, v in zip(cond_cols, key)) or "(all)"
            lv = _levels(g, dcols)
            a = g[lv == base]
            for var in [x for x in order if x != base and (lv == x).any()]:
                b = g[lv == var]
                rounds = sorted(set(a["repeat"]) & set(b["repeat"]))
                noisy = int(a[a["repeat"].isin(rounds)]["noisy"].sum() + b[b["repeat"].isin(rounds)]["noisy"].sum())
                for metric, _, lower, ratio, timed in COMPARED:
                    if metric not in g:
                        continue
                    xa = [_first(a, r, metric) for r in rounds]
                    xb = [_first(b, r, metric) for r in rounds]
                    iv = (paired if ratio else paired_diff)(xa, xb)
                    if iv.n == 0:
                        continue
                    est, lo, hi = (iv.center - 1, iv.low - 1, iv.high - 1) if ratio else (iv.center, iv.low, iv.high)
                    out.append([dim, base, var, cond, metric, "ratio" if ratio else "difference", lower, iv.n, noisy,
                                est, lo, hi, comparison_verdict(lo, hi, iv.n, noisy if timed else 0, lower)])
    return pd.DataFrame(out, columns=cols)


def _first(df: pd.DataFrame, repeat: int, col: str) -> float:
    v = df[df["repeat"] == repeat][col]
    return float(v.iloc[0]) if len(v) and _is_number(v.iloc[0]) else float("nan")


def comparison_verdict(lo: float, hi: float, n: int, noisy: int, lower_is_better: bool) -> str:
    """What a paired change interval [lo, hi] (0 = no change) says."""
    if n < 2 or not (math.isfinite(lo) and math.isfinite(hi)):
        return "one round: no interval (run repeats >= 3)"
    if noisy:
        return f"inconclusive: {noisy} noisy run{'s' if noisy > 1 else ''}"
    if lo <= 0 <= hi:
        return "no detectable difference"
    up = lo > 0
    better = up != lower_is_better
    return f"{'higher' if up else 'lower'} ({'better' if better else 'worse'})"
