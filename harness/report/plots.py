"""Comparison plots of a sweep (PNG and SVG; units on every axis).

Always: peak memory per run (process RSS, KV reserved and live), fragmentation over time
(kv_waste and the process allocator's own view), memory breakdown as stacked bars (weights, K and
V per tier). When the sweep varies their x axis: latency vs cache size per allocator, the K/V
cache type trade-off (KV bytes per token vs logit error vs decode step time), scaling with
parallel sequences (throughput, TPOT). A plot of one point per line shows nothing, so it is skipped.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from engine.alloc import ALLOCATORS  # noqa: E402
from engine.llamacpp.lib import MEMORY_KINDS  # noqa: E402
from harness.records import Record  # noqa: E402
from harness.report.frames import CONFIG_COLUMNS, varying  # noqa: E402
from harness.report.state import has_recurrent, kind, measured, models, projected  # noqa: E402

MIB = 2**20
_PALETTE = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
# one colour per allocator, in the registry's order: a new allocator gets its own without an edit here
COLORS = {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(tuple(ALLOCATORS) + MEMORY_KINDS)}
STYLES = ["-", "--", ":", "-."]


def _labels(df: pd.DataFrame) -> pd.Series:
    """A short name per run: its allocator plus the other config values that vary in the sweep."""
    cols = [c for c in varying(df, CONFIG_COLUMNS) if c not in ("allocator", "backend")]

    def one(row) -> str:
        bits = [str(row.get("allocator", ""))] + [f"{c.split('.')[-1]}={row[c]}" for c in cols]
        return " ".join(bits)

    return df.apply(one, axis=1)


def _save(fig, out: Path, name: str, paths: list[Path]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    fig.savefig(out / f"{name}.svg")
    plt.close(fig)
    paths.append(out / f"{name}.png")


def _num(df: pd.DataFrame, col: str) -> pd.Series:
    return pd.to_numeric(df[col], errors="coerce") if col in df else pd.Series(float("nan"), index=df.index)


def _lines(ax, df: pd.DataFrame, x: str, y: str, scale: float = 1.0) -> None:
    others = [c for c in varying(df, CONFIG_COLUMNS) if c not in ("allocator", "backend", x)]
    for key, g in df.groupby(["allocator"] + others, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        g = g.sort_values(x)
        label = " ".join([str(key[0])] + [f"{c.split('.')[-1]}={v}" for c, v in zip(others, key[1:])])
        ax.plot(_num(g, x), _num(g, y) * scale, "o-", label=label, color=COLORS.get(str(key[0])))


def make_plots(df: pd.DataFrame, records: list[tuple[Path, Record]], out: Path) -> list[Path]:
    paths: list[Path] = []
    ok = df[df["status"] == "ok"].copy()
    if ok.empty:
        return paths
    ok["label"] = _labels(ok)

    sweeps = set(varying(ok, CONFIG_COLUMNS))
    for old in list(out.glob("*.png")) + list(out.glob("*.svg")) if out.exists() else []:
        old.unlink()  # a regenerated report must not show plots of an earlier one
    if "cache.size" in sweeps:
        _latency_vs_cache_size(ok, out, paths)
    _peak_memory(ok, out, paths)
    _fragmentation_over_time(ok, records, out, paths)
    _breakdown(ok, out, paths)
    if sweeps & {"cache.type_k", "cache.type_v"}:
        _kv_type_tradeoff(ok, out, paths)
    if "parallel" in sweeps:
        _parallel_scaling(ok, out, paths)
    if has_recurrent(ok):
        plot_memory_vs_context(ok, out, paths)
    return paths


def _latency_vs_cache_size(ok, out, paths) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (col, title) in zip(axes, [("latency.tpot_ms.p50", "TPOT p50"), ("latency.decode_step_ms.p99",
                                                                             "decode step p99")]):
        _lines(ax, ok, "cache.size", col)
        ax.set_xlabel("cache.size (KV cells = tokens)")
        ax.set_ylabel(f"{title} (ms)")
        ax.set_title(f"{title} vs cache size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, out, "latency_vs_cache_size", paths)


def _peak_memory(ok, out, paths) -> None:
    """Process RSS and KV bytes on their own axes: weights and the runtime dwarf a small KV cache."""
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.6 * len(ok) + 4), 4))
    x = list(range(len(ok)))
    colors = [COLORS.get(str(a), "#777777") for a in ok.get("allocator", [""] * len(ok))]
    axes[0].bar(x, _num(ok, "memory.peak_rss_bytes") / MIB, color=colors)
    axes[0].set_ylabel("process peak RSS (MiB)")
    axes[0].set_title("process peak RSS (VmHWM over the run)")
    w = 0.4
    axes[1].bar([j - w / 2 for j in x], _num(ok, "memory.kv_reserved_peak_bytes") / MIB, w, label="KV reserved (peak)")
    axes[1].bar([j + w / 2 for j in x], _num(ok, "memory.kv_live_peak_bytes") / MIB, w, label="KV live (peak)")
    axes[1].set_ylabel("KV cache (MiB)")
    axes[1].set_title("KV cache: reserved vs live at peak")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(x, ok["label"], rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    _save(fig, out, "peak_memory", paths)


def _fragmentation_over_time(ok, records, out, paths) -> None:
    by_job = {str(p.parent.relative_to(out.parent)): r for p, r in records}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    drawn, seen = False, {}
    for row in ok.itertuples():
        tl = by_job.get(row.job, Record("ok", {})).timeline.get("fragmentation")
        if not tl:
            continue
        alloc = str(getattr(row, "allocator", ""))
        style = STYLES[seen.get(alloc, 0) % len(STYLES)]  # runs of one allocator: same colour, own style
        seen[alloc] = seen.get(alloc, 0) + 1
        for ax, key in zip(axes, ("kv_waste", "allocator_frag")):
            ax.plot(tl["t_s"], tl[key], style, label=row.label, color=COLORS.get(alloc), alpha=0.8, lw=1.2)
        drawn = True
    if drawn:
        axes[0].set_title("KV waste over time: 1 - live / reserved")
        axes[1].set_title("process allocator: free bytes held / bytes held")
        for ax in axes:
            ax.set_xlabel("time since start of run (s)")
            ax.set_ylabel("fraction (0..1)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        _save(fig, out, "fragmentation_over_time", paths)
    else:
        plt.close(fig)


def _breakdown(ok, out, paths) -> None:
    x = range(len(ok))
    parts = sorted(c for c in ok.columns if c.startswith("memory.breakdown."))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(ok) + 3), 4))
    bottom = pd.Series(0.0, index=ok.index)
    wts = _num(ok, "memory.weights_bytes") / MIB
    ax.bar(list(x), wts, label="weights", color="#999999")
    bottom += wts.fillna(0)
    for col in parts:
        v = _num(ok, col).fillna(0) / MIB
        ax.bar(list(x), v, bottom=bottom, label=col.removeprefix("memory.breakdown."))
        bottom += v
    ax.set_xticks(list(x), ok["label"], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("bytes at the KV peak (MiB)")
    ax.set_title("memory breakdown: weights, K and V per tier")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, out, "memory_breakdown", paths)


def _kv_type_tradeoff(ok, out, paths) -> None:
    """KV bytes per token against the quality cost of the cache type: KL divergence against f32 KV on real
    text where the sweep measured it (trackers.quality), else the probe's max logit error; colour: speed."""
    kld = "quality.kld.mean" in ok and _num(ok, "quality.kld.mean").notna().any()
    ycol = "quality.kld.mean" if kld else "quality.logit_max_abs_err"
    if ycol not in ok:
        return
    pts = ok.drop_duplicates(["cache.type_k", "cache.type_v"]).sort_values("memory.kv_bytes_per_token")
    x, y = _num(pts, "memory.kv_bytes_per_token") / 1024, _num(pts, ycol)
    fig, ax = plt.subplots(figsize=(8, 5))
    sc = ax.scatter(x, y.clip(lower=1e-7) if kld else y, c=_num(pts, "latency.tpot_ms.p50"), cmap="viridis", s=70,
                    zorder=3)
    placed: list[tuple[float, float]] = []  # (x, log y) of each label already drawn, left to right
    for (_, row), xx, yy in zip(pts.iterrows(), x, y):  # one point per K/V pair
        yv = max(yy, 1e-7) if kld else yy
        ly = math.log10(yv) if kld else yv
        # above its point, unless a label drawn to its left would run into it: then below
        clash = any(xx - px < 9 and abs(ly - py) < (0.5 if kld else 0.05 * (abs(py) + 1e-9)) for px, py in placed)
        ax.annotate(f"K {row['cache.type_k']} / V {row['cache.type_v']}", (xx, yv), fontsize=8,
                    xytext=(6, -12 if clash else 5), textcoords="offset points")
        placed.append((xx, ly - (0.6 if clash and kld else 0)))
    fig.colorbar(sc, ax=ax, label="TPOT p50 (ms)")
    ax.set_xlabel("KV cache bytes per token, all layers (KiB)")
    if kld:
        ax.set_yscale("log")
        ax.set_ylabel("mean KL divergence vs f32 KV (nats, log; f32 itself drawn at 1e-7)")
        ax.set_title("K/V cache types: memory per token vs quality (real text)")
    else:
        ax.set_ylabel("max |logit - f32-cache logit| (logit units)")
        ax.set_title("K/V cache types: memory per token vs logit error vs speed")
    ax.grid(alpha=0.3, which="both")
    ax.margins(x=0.15, y=0.2)
    _save(fig, out, "kv_type_tradeoff", paths)


def _parallel_scaling(ok, out, paths) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (col, ylabel) in zip(axes, [("throughput.tokens_per_s", "throughput (generated tokens/s)"),
                                        ("latency.tpot_ms.p50", "TPOT p50 (ms)")]):
        _lines(ax, ok, "parallel", col)
        ax.set_xlabel("parallel sequences")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("scaling with parallel sequences")
    _save(fig, out, "parallel_scaling", paths)


def plot_memory_vs_context(df: pd.DataFrame, out: Path, paths: list[Path]) -> None:
    """Per model, the projection from measured bytes (a line) and the measured peaks (markers, one shape per
    allocator), on log axes: a KV cache is a slope of 1, a recurrent state flat, a window flat after the window."""
    m, meas = models(df), measured(df)
    fig, ax = plt.subplots(figsize=(8.5, 5))
    n = [2**k for k in range(5, 16)]
    markers = {"naive": "o", "pooled": "s", "paged": "^"}
    for i, (_, r) in enumerate(m.iterrows()):
        color = plt.cm.tab10(i % 10)
        # a line style per model too: equal laws (two hybrids of the same shape) would otherwise hide each other
        ax.plot(n, [projected(r, x) / MIB for x in n], color=color, ls=("-", "--", "-.", ":")[i % 4], lw=1.8,
                label=f"{r['model.name']}: {kind(r)}")
        pts = meas[meas["model"] == r["model.name"]]
        for alloc, g in pts.groupby("allocator"):
            ax.scatter(g["context"], g["MiB per sequence"], color=color, marker=markers.get(alloc, "x"),
                       facecolors="none", s=45, zorder=3)
    for alloc, mk in markers.items():
        if (meas["allocator"] == alloc).any():
            ax.scatter([], [], marker=mk, facecolors="none", color="gray", label=f"measured, {alloc}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("KV + recurrent state per sequence (MiB)")
    ax.set_title("memory per sequence vs context: projected (lines) and measured (markers)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", framealpha=0.9)
    fig.tight_layout()
    _save(fig, out, "memory_vs_context", paths)
