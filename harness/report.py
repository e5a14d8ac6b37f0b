"""``kvbench report SWEEP_DIR``: records -> one pandas DataFrame -> CSV, Markdown, HTML, plots.

One row per record: the flattened config (``cache.size``, ``allocator``...), the status and
reason of failed points, then the metrics (docs/metrics.md names). Partial or corrupt records
are skipped with a warning; a failed point is a row with its reason, not a gap.
"""

from __future__ import annotations

import base64
import html
import warnings
from pathlib import Path

import pandas as pd

from engine.atomic import atomic_open
from harness.records import Record, flatten, load_records

# columns of the short tables: (column, header with unit, scale)
SUMMARY = [
    ("latency.tpot_ms.p50", "TPOT p50 (ms)", 1),
    ("latency.ttft_ms.p50", "TTFT p50 (ms)", 1),
    ("latency.decode_step_ms.p50", "decode step p50 (ms)", 1),
    ("latency.decode_step_ms.p99", "decode step p99 (ms)", 1),
    ("throughput.tokens_per_s", "throughput (tok/s)", 1),
    ("memory.peak_rss_bytes", "peak RSS (MiB)", 1 / 2**20),
    ("memory.kv_reserved_peak_bytes", "KV reserved (MiB)", 1 / 2**20),
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


def records_frame(records: list[tuple[Path, Record]], root: Path) -> pd.DataFrame:
    rows = []
    for path, rec in records:
        conf = flatten({k: v for k, v in rec.config.items() if k != "workload"})
        wl = rec.config.get("workload") or {}
        conf["workload"] = rec.choices.get("workload") or \
            str(wl.get("_target_", "")).rsplit(".", 1)[-1].replace("Workload", "").lower()
        conf |= {f"workload.{k}": v for k, v in flatten({k: v for k, v in wl.items() if k != "_target_"}).items()}
        rows.append({"job": str(path.parent.relative_to(root)), "status": rec.status, "error": rec.error,
                     **conf, **rec.metrics, "duration_s": rec.duration_s, "git_commit": rec.env.get("git_commit", "")})
    df = pd.DataFrame(rows)
    if not df.empty:
        df = df.sort_values("job", key=lambda s: s.map(_job_key)).reset_index(drop=True)
    return df


def _job_key(job: str):
    head = job.split("/", 1)[0]
    return (0, int(head), job) if head.isdigit() else (1, 0, job)


def varying(df: pd.DataFrame, cols: list[str]) -> list[str]:
    """The config columns that take more than one value in this sweep (the ones worth showing)."""
    out = [c for c in cols if c in df and df[c].astype(str).nunique() > 1]
    return out or [c for c in ("allocator",) if c in df]


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    cols = varying(df, CONFIG_COLUMNS)
    out = df[["job", "status"] + cols].copy()
    for col, header, scale in SUMMARY:
        if col in df:
            out[header] = pd.to_numeric(df[col], errors="coerce") * scale
    return out


def _md(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, floatfmt=".3g") if not df.empty else "(no rows)"


def write_report(sweep_dir: Path, plots: bool = True) -> Path:
    """Write report.csv, report.md, report.html and plots/ into sweep_dir; returns report.md's path."""
    sweep_dir = Path(sweep_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = load_records(sweep_dir)
    skipped = [str(w.message) for w in caught]
    for msg in skipped:
        warnings.warn(msg, stacklevel=2)
    df = records_frame(records, sweep_dir)
    with atomic_open(sweep_dir / "report.csv", "w") as f:
        df.to_csv(f, index=False)
    figs = []
    if plots and not df.empty:
        from harness.plots import make_plots

        figs = make_plots(df, records, sweep_dir / "plots")
    table = summary_table(df) if not df.empty else df
    failed = df[df["status"] != "ok"] if not df.empty else df
    partial = df[(df["status"] == "ok") & (df["error"] != "")] if not df.empty else df
    md = [f"# kvbench report: {sweep_dir.name}", "",
          f"{len(df)} runs ({int((df['status'] == 'ok').sum()) if len(df) else 0} ok, {len(failed)} failed)"
          + (f", {len(skipped)} unreadable records skipped" if skipped else "") + ".",
          "Definitions of every metric: docs/metrics.md. Full table: report.csv.", "", "## Summary", "", _md(table), ""]
    if len(failed):
        md += ["## Failed runs", ""] + [f"- `{r.job}`: {r.error}" for r in failed.itertuples()] + [""]
    if len(partial):
        md += ["## Runs with failed requests", ""] + [f"- `{r.job}`: {r.error}" for r in partial.itertuples()] + [""]
    if skipped:
        md += ["## Skipped records", ""] + [f"- {m}" for m in skipped] + [""]
    if not df.empty:
        from harness.state_report import has_recurrent, state_markdown

        if has_recurrent(df):
            md += [state_markdown(df)]
    claims = ""
    if not df.empty and "name" in df and (df["name"] == "seed_claims").any():
        from harness.claims import claims_markdown

        claims = claims_markdown(df)
        md += [claims]
    if figs:
        md += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in figs] + [""]
    with atomic_open(sweep_dir / "report.md", "w") as f:
        f.write("\n".join(md))
    with atomic_open(sweep_dir / "report.html", "w") as f:
        f.write(_html(sweep_dir.name, table, failed, partial, skipped, figs, claims))
    return sweep_dir / "report.md"


def _md_to_html(md: str) -> str:
    """The few Markdown constructs the claims section uses: a heading, paragraphs, a table, a list."""
    out, table = [], []

    def flush():
        if table:
            rows = [[c.strip() for c in r.strip("|").split("|")] for r in table if not set(r) <= set("|-: ")]
            head, body = rows[0], rows[1:]
            out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td style='text-align:left'>{html.escape(c)}</td>" for c in r)
                                 + "</tr>" for r in body) + "</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("## "):
            out.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("- "):
            out.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "\n".join(out)


def _html(title: str, table, failed, partial, skipped, figs: list[Path], claims_md: str = "") -> str:
    """One self-contained page: tables and the PNG plots inlined as data URIs."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>kvbench {html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f3f3f3}"
             "img{max-width:100%;border:1px solid #eee;margin:8px 0}</style></head><body>",
             f"<h1>kvbench report: {html.escape(title)}</h1>",
             "<p>Metric definitions: docs/metrics.md in the kvbench repository. Full data: report.csv.</p>",
             "<h2>Summary</h2>", table.to_html(index=False, float_format=lambda x: f"{x:.3g}", na_rep="")]
    for head, rows in (("Failed runs", failed), ("Runs with failed requests", partial)):
        if len(rows):
            parts += [f"<h2>{head}</h2><ul>"] + [
                f"<li><code>{html.escape(r.job)}</code>: {html.escape(r.error)}</li>" for r in rows.itertuples()] + ["</ul>"]
    if claims_md:
        parts.append(_md_to_html(claims_md))
    if skipped:
        parts += ["<h2>Skipped records</h2><ul>"] + [f"<li>{html.escape(m)}</li>" for m in skipped] + ["</ul>"]
    if figs:
        parts.append("<h2>Plots</h2>")
        for p in figs:
            data = base64.b64encode(p.read_bytes()).decode()
            parts.append(f"<h3>{html.escape(p.stem.replace('_', ' '))}</h3><img alt='{p.stem}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)
