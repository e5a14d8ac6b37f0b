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
import re
import warnings
from pathlib import Path

import pandas as pd

from engine.atomic import atomic_open
from engine.errors import ConfigError
from harness.records import load_records
from harness.report.claims import claims_markdown
from harness.report.findings import findings_markdown, glossary_markdown, setup_markdown
from harness.report.frames import (
    COMPARED,
    CONFIG_COLUMNS,
    SUMMARY,
    _is_number,
    comparisons,
    points_frame,
    records_frame,
    varying,
)
from harness.report.plots import make_plots
from harness.report.state import has_recurrent, state_markdown


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


# measured only by timing a real run: a memory-only point shows "memory-only" there, not an empty cell
_TIMED = ("latency.", "throughput.", "stability.steps", "memory.peak_rss", "fragmentation.allocator", "quality.")


def summary_table(points: pd.DataFrame) -> pd.DataFrame:
    """The points as a readable table: varying config, runs, and 'median [95% interval]' cells."""
    cols = varying(points, CONFIG_COLUMNS)
    out = points[["job", "status"] + cols].copy()
    out.insert(2, "runs", [f"{r.runs_ok}/{r.runs}" + (f" ({r.noisy} noisy)" if r.noisy else "")
                           for r in points.itertuples()])
    mem_only = points["run.memory_only"].fillna(False).astype(bool) if "run.memory_only" in points else \
        pd.Series(False, index=points.index)
    same = []
    for col, header, scale in SUMMARY:
        if col in points and points[col].map(_is_number).any():
            cells = ["memory-only" if m and col.startswith(_TIMED) else _cell(r, col, scale)
                     for m, (_, r) in zip(mem_only, points.iterrows())]
            if len(points) > 1 and len(set(cells)) == 1:  # the same everywhere: said once, not a column
                same.append(f"{header} {cells[0]}")
                continue
            out[header] = cells
    out.attrs["same"] = same
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
    """A table with numbers as a reader writes them (5410, 0.0123; never 5.41e+03)."""
    if df.empty:
        return "(no rows)"
    df = df.copy()
    for c in df.columns:
        if df[c].map(lambda v: _is_number(v) or v is None or (isinstance(v, float) and v != v)).all():
            df[c] = df[c].map(lambda v: _fmt(v) if _is_number(v) else "")
    return df.to_markdown(index=False, disable_numparse=True)


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
    figs = make_plots(points, records, sweep_dir / "plots") if plots else []
    md = _markdown(sweep_dir, records, runs, points, comp, skipped, figs)
    with atomic_open(sweep_dir / "report.md", "w") as f:
        f.write(md)
    with atomic_open(sweep_dir / "report.html", "w") as f:
        f.write(_html(sweep_dir, md))
    return sweep_dir / "report.md"


def _markdown(sweep_dir: Path, records, runs, points, comp, skipped, figs) -> str:
    n_ok, n_deg, n_fail = ((runs["status"] == s).sum() for s in ("ok", "degraded", "failed"))
    noisy = runs[runs["noisy"]]
    reused = runs[runs["resumed_from"] != ""]
    rounds = int(runs["repeat"].max()) + 1
    md = [f"# kvbench report: {sweep_dir.name}", "",
          f"{len(points)} points x {rounds} round{'s' if rounds > 1 else ''}: {len(runs)} runs ({n_ok} ok, "
          f"{n_deg} degraded, {n_fail} failed); {len(noisy)} measured under contention (noisy); "
          f"{len(reused)} reused from earlier sweeps"
          + (f"; {len(skipped)} unreadable records skipped" if skipped else "") + ".",
          "Per point: report.csv; per run: runs.csv; comparisons: comparisons.csv. The columns are explained "
          "in the Glossary at the end.", ""]
    md += [setup_markdown(records, rounds), findings_markdown(runs, points, comp)]
    if rounds == 2:
        md += ["Only 2 rounds: intervals are wide below 3; run with repeats=3 or more before drawing conclusions.",
               ""]
    if len(noisy):
        md += ["## Noise", "", "These runs were measured while something else used the machine (docs/metrics.md, "
               "\"Noise\"). Their numbers are less trustworthy, and verdicts that use them are inconclusive. "
               "Rerun on a quiet machine, or with --retry-noisy K.", ""]
        md += [f"- `{r['job']}`: {r.get('noise.reason', '')}" for _, r in noisy.iterrows()] + [""]
    table = summary_table(points)
    md += ["## Summary", "", "Each cell: the median over the point's ok runs [95% interval] (harness/stats.py)."
           + (f" The same for every point: {'; '.join(table.attrs['same'])}." if table.attrs.get("same") else ""),
           "", _md(table), ""]
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
    if has_recurrent(points):
        md += [state_markdown(points)]
    if "name" in runs and (runs["name"] == "seed_claims").any():
        md += [claims_markdown(runs)]
    if figs:
        md += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in figs] + [""]
    md += [glossary_markdown(list(table.columns) + [x.rsplit(" ", 1)[0] for x in table.attrs.get("same", [])])]
    return "\n".join(md)


def _md_to_html(md: str, base: Path) -> str:
    """report.md as HTML (markdown-it-py: CommonMark with tables; raw HTML in the text is escaped, never
    passed through), with every plot inlined as a data URI so the page is one self-contained file."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(md)

    def inline(m: re.Match) -> str:
        p = base / html.unescape(m.group(1))
        if not p.is_file():
            return m.group(0)
        data = base64.b64encode(p.read_bytes()).decode()
        return f'<img src="data:image/png;base64,{data}"'

    return re.sub(r'<img src="([^"]+)"', inline, body)


def _html(sweep_dir: Path, md: str) -> str:
    """One self-contained page from the Markdown report: tables, lists, links and the PNG plots inlined."""
    return "\n".join([
        f"<!doctype html><html><head><meta charset='utf-8'><title>kvbench {html.escape(sweep_dir.name)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px;line-height:1.4}table{border-collapse:"
        "collapse;font-size:13px;display:block;overflow-x:auto}td,th{border:1px solid #ccc;padding:3px 6px}"
        "th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:8px 0}</style></head><body>",
        _md_to_html(md, sweep_dir), "</body></html>"])
