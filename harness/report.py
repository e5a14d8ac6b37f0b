"""``kvbench report SWEEP_DIR``: records -> pandas DataFrames -> CSV, Markdown, HTML, plots.

Three frames, from the records of a sweep directory:

- runs: one row per record (every repeat of every point): the flattened config, status and reason,
  the round (``repeat``), where a reused row came from (``resumed_from``), whether it was measured
  under contention (``noise.flagged``), then the metrics (docs/metrics.md names). ``runs.csv``.
- points: one row per sweep point (its runs grouped across rounds): the median of each metric over
  the point's ok runs, with ``<metric>.ci95_low`` / ``<metric>.ci95_high`` (harness/stats.py).
  ``report.csv``, the summary table, the plots.
- comparisons: allocator vs allocator, cache type vs cache type, tier vs tier, under the same other
  settings, as paired ratios over rounds with their 95% intervals. ``comparisons.csv``.

Partial or corrupt records are skipped with a warning; a failed point is a row with its reason,
not a gap. A directory without a single readable record is an error (ConfigError, exit 2).
"""

from __future__ import annotations

import base64
import html
import math
import numbers
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from engine.atomic import atomic_open
from engine.errors import ConfigError
from harness.records import Record, flatten, load_records
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
    ("fragmentation.kv_waste.time_weighted", "kv_waste (tw)", 1),
    ("fragmentation.external.time_weighted", "ext. frag (tw)", 1),
    ("fragmentation.allocator.time_weighted", "malloc frag (tw)", 1),
    ("stability.steps_within_25pct", "steps ±25%", 1),
    ("stability.requests_clean", "req. clean", 1),
    ("alloc.calls_per_decode_step", "allocs/step", 1),
    ("requests.preemptions", "preemptions", 1),
    ("quality.logit_max_abs_err", "logit err", 1),
]
CONFIG_COLUMNS = ["model.name", "allocator", "cache.size", "cache.block_size", "cache.type_k", "cache.type_v",
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
    from harness.point import point_id

    rows, metric_names = [], {}
    for path, rec in records:
        metric_names |= dict.fromkeys(rec.metrics)
        conf = flatten({k: v for k, v in rec.config.items() if k != "workload"})
        wl = rec.config.get("workload") or {}
        conf["workload"] = rec.choices.get("workload") or \
            str(wl.get("_target_", "")).rsplit(".", 1)[-1].replace("Workload", "").lower()
        conf |= {f"workload.{k}": v for k, v in flatten({k: v for k, v in wl.items() if k != "_target_"}).items()}
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
    """The config columns that take more than one value in this sweep (the ones worth showing)."""
    out = [c for c in cols if c in df and df[c].astype(str).nunique() > 1]
    return out or [c for c in ("allocator",) if c in df]


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v)


def _metric_columns(runs: pd.DataFrame) -> list[str]:
    """The numeric metrics of the runs (records_frame keeps their names in ``attrs``), plus duration_s."""
    names = runs.attrs.get("metrics", []) + ["duration_s"]
    return [c for c in names if c in runs and runs[c].map(_is_number).any()]


# metrics that are fractions 0..1: their intervals are taken on the raw scale and clipped to [0, 1]
_FRACTIONS = ("fragmentation.", "stability.", "noise.steal")


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
        cond_cols = [c for c in conf_vary if c not in dcols]
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


# -- Markdown / HTML ------------------------------------------------------------------------------
def _fmt(x, scale: float = 1.0) -> str:
    """3 significant digits, without exponents for the magnitudes a report shows (5410, not 5.41e+03)."""
    if not _is_number(x):
        return ""
    v = x * scale
    return f"{v:.0f}" if 1000 <= abs(v) < 1e7 else f"{v:.3g}"


def _cell(row, col: str, scale: float) -> str:
    c = _fmt(row.get(col), scale)
    lo, hi = _fmt(row.get(f"{col}.ci95_low"), scale), _fmt(row.get(f"{col}.ci95_high"), scale)
    if c and lo and hi and lo != hi:
        return f"{c} [{lo}, {hi}]"
    return c


def summary_table(points: pd.DataFrame) -> pd.DataFrame:
    """The points as a readable table: varying config, runs, and 'median [95% interval]' cells."""
    cols = varying(points, CONFIG_COLUMNS)
    out = points[["job", "status"] + cols].copy()
    out.insert(2, "runs", [f"{r.runs_ok}/{r.runs}" + (f" ({r.noisy} noisy)" if r.noisy else "")
                           for r in points.itertuples()])
    for col, header, scale in SUMMARY:
        if col in points and points[col].map(_is_number).any():
            out[header] = [_cell(r, col, scale) for _, r in points.iterrows()]
    return out


def _pct(x: float) -> str:
    return f"{x:+.1%}" if _is_number(x) else "n/a"


def comparisons_markdown(comp: pd.DataFrame) -> str:
    if comp.empty:
        return ""
    lines = ["## Comparisons (paired by round)", "",
             "Each cell: the change from the baseline to the variant under the same other settings, as the "
             "geometric mean of the per-round ratios, with its 95% interval over rounds (harness/stats.py; "
             "docs/metrics.md). An interval that contains 0% is no detectable difference; a comparison with "
             "noisy runs is inconclusive.", "", ""]
    rows = []
    for (dim, base, var, cond), g in comp.groupby(["dimension", "baseline", "variant", "condition"], sort=False):
        r = {"comparison": f"{var} vs {base}", "condition": cond, "rounds": int(g["rounds"].max())}
        if g["noisy_runs"].max():
            r["condition"] += f" ({int(g['noisy_runs'].max())} noisy runs)"
        for x in g.itertuples():
            header = next(c[1] for c in COMPARED if c[0] == x.metric)
            iv = f" [{_pct(x.ci95_low)}, {_pct(x.ci95_high)}]" if _is_number(x.ci95_low) else ""
            r[header] = f"{_pct(x.estimate)}{iv}: {x.verdict}"
        rows.append(r)
    return "\n".join(lines) + pd.DataFrame(rows).fillna("").to_markdown(index=False) + "\n"


def _md(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, floatfmt=".3g") if not df.empty else "(no rows)"


def write_report(sweep_dir: Path, plots: bool = True) -> Path:
    """Write report.{csv,md,html}, runs.csv, comparisons.csv and plots/ into sweep_dir; returns report.md."""
    sweep_dir = Path(sweep_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = load_records(sweep_dir)
    skipped = [str(w.message) for w in caught]
    for msg in skipped:
        warnings.warn(msg, stacklevel=2)
    if not records:
        raise ConfigError(f"{sweep_dir}: no readable record.json under it"
                          + (f" ({len(skipped)} unreadable)" if skipped else "")
                          + "; pass a sweep directory (results/multirun/<time>) or a run directory")
    runs = records_frame(records, sweep_dir)
    points = points_frame(runs)
    comp = comparisons(runs)
    with atomic_open(sweep_dir / "runs.csv", "w") as f:
        runs.to_csv(f, index=False)
    with atomic_open(sweep_dir / "report.csv", "w") as f:
        points.to_csv(f, index=False)
    with atomic_open(sweep_dir / "comparisons.csv", "w") as f:
        comp.to_csv(f, index=False)
    figs = []
    if plots:
        from harness.plots import make_plots

        figs = make_plots(points, records, sweep_dir / "plots")
    md = _markdown(sweep_dir, runs, points, comp, skipped, figs)
    with atomic_open(sweep_dir / "report.md", "w") as f:
        f.write(md)
    with atomic_open(sweep_dir / "report.html", "w") as f:
        f.write(_html(sweep_dir, md))
    return sweep_dir / "report.md"


def _markdown(sweep_dir: Path, runs, points, comp, skipped, figs) -> str:
    n_ok, n_deg, n_fail = ((runs["status"] == s).sum() for s in ("ok", "degraded", "failed"))
    noisy = runs[runs["noisy"]]
    reused = runs[runs["resumed_from"] != ""]
    rounds = int(runs["repeat"].max()) + 1
    md = [f"# kvbench report: {sweep_dir.name}", "",
          f"{len(points)} points x {rounds} round{'s' if rounds > 1 else ''}: {len(runs)} runs ({n_ok} ok, "
          f"{n_deg} degraded, {n_fail} failed); {len(noisy)} measured under contention (noisy); "
          f"{len(reused)} reused from earlier sweeps"
          + (f"; {len(skipped)} unreadable records skipped" if skipped else "") + ".",
          "Definitions of every metric: docs/metrics.md. Per point: report.csv; per run: runs.csv; "
          "comparisons: comparisons.csv.", ""]
    if rounds < 3:
        md += [f"Only {rounds} round{'s' if rounds > 1 else ''}: intervals need repeats >= 2 and are wide below 3; "
               "run with repeats=3 or more before drawing conclusions.", ""]
    if len(noisy):
        md += ["## Noise", "", "These runs were measured while something else used the machine (docs/metrics.md, "
               "\"Noise\"). Their numbers are less trustworthy, and verdicts that use them are inconclusive. "
               "Rerun on a quiet machine, or with --retry-noisy K.", ""]
        md += [f"- `{r['job']}`: {r.get('noise.reason', '')}" for _, r in noisy.iterrows()] + [""]
    md += ["## Summary", "", "Each cell: the median over the point's ok runs [95% interval] (harness/stats.py).", "",
           _md(summary_table(points)), ""]
    cm = comparisons_markdown(comp)
    if cm:
        md += [cm]
    failed = runs[runs["status"] == "failed"]
    degraded = runs[runs["status"] == "degraded"]
    if len(failed):
        md += ["## Failed runs", ""] + [f"- `{r.job}`: {r.error}" for r in failed.itertuples()] + [""]
    if len(degraded):
        md += ["## Degraded runs (some requests failed)", ""] + [f"- `{r.job}`: {r.error}" for r in degraded.itertuples()] + [""]
    if len(reused):
        md += ["## Reused from earlier sweeps", "", "These rows were not measured by this sweep: a rerun found the "
               "same point (same config hash) finished cleanly in an earlier sweep and copied its record "
               "(`--force` measures them again).", ""]
        md += [f"- `{r.job}`: from `{r.resumed_from}`" for r in reused.itertuples()] + [""]
    if skipped:
        md += ["## Skipped records", ""] + [f"- {m}" for m in skipped] + [""]
    from harness.state_report import has_recurrent, state_markdown

    if has_recurrent(points):
        md += [state_markdown(points)]
    if "name" in runs and (runs["name"] == "seed_claims").any():
        from harness.claims import claims_markdown

        md += [claims_markdown(runs)]
    if figs:
        md += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in figs] + [""]
    return "\n".join(md)


def _inline(text: str) -> str:
    """`code` spans and escaping for one line of Markdown."""
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(f"<code>{html.escape(p[1:-1])}</code>" if p.startswith("`") and p.endswith("`") and len(p) > 1
                   else html.escape(p) for p in parts)


def _md_to_html(md: str, base: Path) -> str:
    """The Markdown this module writes (headings, paragraphs, lists, tables, images) as HTML; images inlined."""
    out, table, items = [], [], []

    def flush():
        if table:
            rows = [[c.strip() for c in r.strip().strip("|").split("|")] for r in table
                    if not set(r.strip()) <= set("|-: ")]
            head, body = rows[0], rows[1:]
            out.append("<table><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</table>")
            table.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        if line.startswith("- "):
            items.append(line[2:])
            continue
        flush()
        m = re.match(r"^(#{1,3}) (.*)$", line)
        img = re.match(r"^!\[([^\]]*)\]\(([^)]+)\)$", line)
        if m:
            n = len(m.group(1))
            out.append(f"<h{n}>{_inline(m.group(2))}</h{n}>")
        elif img:
            p = base / img.group(2)
            if p.exists():
                data = base64.b64encode(p.read_bytes()).decode()
                out.append(f"<h3>{html.escape(img.group(1).replace('_', ' '))}</h3>"
                           f"<img alt='{html.escape(img.group(1))}' src='data:image/png;base64,{data}'>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    flush()
    return "\n".join(out)


def _html(sweep_dir: Path, md: str) -> str:
    """One self-contained page from the Markdown report: tables, lists and the PNG plots inlined."""
    return "\n".join([
        f"<!doctype html><html><head><meta charset='utf-8'><title>kvbench {html.escape(sweep_dir.name)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
        "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}th{background:#f3f3f3}"
        "img{max-width:100%;border:1px solid #eee;margin:8px 0}</style></head><body>",
        _md_to_html(md, sweep_dir), "</body></html>"])
