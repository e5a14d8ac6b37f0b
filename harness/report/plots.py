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
from matplotlib.lines import Line2D  # noqa: E402

from engine.alloc import ALLOCATORS  # noqa: E402
from engine.llamacpp.lib import MEMORY_KINDS  # noqa: E402
from harness.records import Record  # noqa: E402
from harness.report.frames import CONFIG_COLUMNS, varying  # noqa: E402
from harness.report.state import has_recurrent, kind, measured, models, projected  # noqa: E402

MIB = 2**20
_CI = (".ci95_low", ".ci95_high")  # the points frame's interval columns: never a quantity of their own
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
    fig.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")  # legends outside the axes stay in
    fig.savefig(out / f"{name}.svg", bbox_inches="tight")
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
        xs, ys = _num(g, x), _num(g, y) * scale
        ax.plot(xs, ys, "o-", label=label, color=COLORS.get(str(key[0])))
        lo, hi = _num(g, f"{y}.ci95_low") * scale, _num(g, f"{y}.ci95_high") * scale
        if lo.notna().any():  # the 95% interval over rounds: medians alone would hide how much they overlap
            ax.fill_between(xs, lo, hi, color=COLORS.get(str(key[0])), alpha=0.15, lw=0)


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
    _kv_over_steps(ok, records, out, paths)
    _breakdown(ok, out, paths)
    if sweeps & {"cache.type_k", "cache.type_v"}:
        _kv_type_tradeoff(ok, out, paths)
    if "parallel" in sweeps:
        _parallel_scaling(ok, out, paths)
    if has_recurrent(ok):
        plot_memory_vs_context(ok, out, paths)
    return paths


def _latency_vs_cache_size(ok, out, paths) -> None:
    """Latency against cache.size, a line per allocator and other setting, timed points only (memory-only
    points have no latency). Drawn only when some line has two sizes: where the size moved only with another
    setting (workload.fit_cache), every line would be a dot."""
    timed = _timed(ok)
    others = [c for c in varying(timed, CONFIG_COLUMNS) if c not in ("allocator", "backend", "cache.size")]
    groups = timed.groupby(["allocator"] + others, dropna=False)["cache.size"].nunique() if len(timed) else []
    if not len(groups) or groups.max() < 2:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (col, title) in zip(axes, [("latency.tpot_ms.p50", "TPOT p50"), ("latency.decode_step_ms.p99",
                                                                             "decode step p99")]):
        _lines(ax, timed, "cache.size", col)
        ax.set_xlabel("cache.size (KV cells = tokens)")
        ax.set_ylabel(f"{title} (ms)")
        ax.set_title(f"{title} vs cache size", fontsize=10)
        ax.grid(alpha=0.3)
    _legend_outside(fig, axes)
    fig.suptitle("latency vs cache size (bands: 95% intervals over rounds)", fontsize=11)
    _save(fig, out, "latency_vs_cache_size", paths)


def _timed(ok: pd.DataFrame) -> pd.DataFrame:
    """The points whose process memory means something: not memory-only (no arithmetic, meta tensors)."""
    if "run.memory_only" not in ok:
        return ok
    return ok[~ok["run.memory_only"].fillna(False).astype(bool)]


def _peak_memory(ok, out, paths) -> None:
    """Per model (one row of panels each: a 7B's KV dwarfs a small model's): what each point's run added to its
    process (peak RSS minus the RSS once the model was loaded: KV, state, transients, allocator slack), beside
    the KV bytes reserved and live at their peaks. Weights and the runtime are the same for every point of a
    model and would make every bar look alike; memory-only points have no process memory to show."""
    models = list(dict.fromkeys(ok["model.name"])) if "model.name" in ok else [""]
    timed = _timed(ok)
    widest = max(len(ok[ok["model.name"] == m]) if "model.name" in ok else len(ok) for m in models)
    fig, axes = plt.subplots(len(models), 2, figsize=(max(10, 0.75 * widest + 5), 4.2 * len(models)),
                             squeeze=False)
    for (ax_rss, ax_kv), name in zip(axes, models):
        pts = ok[ok["model.name"] == name] if "model.name" in ok else ok
        labels = [lab.replace(f"name={name}", "").strip() or lab for lab in pts["label"]]
        x = list(range(len(pts)))
        colors = [COLORS.get(str(a), "#777777") for a in pts.get("allocator", [""] * len(pts))]
        added = (_num(pts, "memory.peak_rss_bytes") - _num(pts, "memory.rss_start_bytes")) / MIB
        if pts.index.isin(timed.index).any():
            ax_rss.bar(x, added.where(pts.index.isin(timed.index)).fillna(0), color=colors)
            ax_rss.set_title(f"{name}: what the run added to the process\n(peak RSS - RSS after loading the model)",
                             fontsize=10)
        else:
            ax_rss.text(0.5, 0.5, "memory-only runs: shapes without weights,\nno process memory to show",
                        ha="center", va="center", transform=ax_rss.transAxes, fontsize=9, color="#555")
            ax_rss.set_title(f"{name}: process memory", fontsize=10)
            ax_rss.set_yticks([])
        w = 0.4
        ax_kv.bar([j - w / 2 for j in x], _num(pts, "memory.kv_reserved_peak_bytes") / MIB, w,
                  label="reserved (peak)", color="#bbbbbb", edgecolor=colors)
        ax_kv.bar([j + w / 2 for j in x], (_num(pts, "memory.kv_live_peak_bytes").fillna(0)
                                           + _num(pts, "memory.state_live_peak_bytes").fillna(0)) / MIB, w,
                  label="live: tokens and states held (peak)", color=colors)
        ax_kv.set_title(f"{name}: KV and recurrent state, reserved vs live", fontsize=10)
        ax_kv.legend(fontsize=8, loc="upper left")
        for ax in (ax_rss, ax_kv) if pts.index.isin(timed.index).any() else (ax_kv,):
            ax.set_xticks(x, labels, rotation=35, ha="right", fontsize=7)
            ax.set_ylabel("MiB")
            ax.grid(axis="y", alpha=0.3)
        if not pts.index.isin(timed.index).any():
            ax_rss.set_xticks([])
    _save(fig, out, "peak_memory", paths)


def _series(ok, records, out, tracker: str):
    """(row, timeline) of each point's first run that recorded ``tracker``'s timeline."""
    by_job = {str(p.parent.relative_to(out.parent)): r for p, r in records}
    for row in ok.itertuples():
        tl = by_job.get(row.job, Record("ok", {})).timeline.get(tracker)
        if tl and tl.get("t_s"):
            yield row, tl


def _legend_outside(fig, axes) -> None:
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def _conditions(ok: pd.DataFrame) -> list[str]:
    """The swept settings other than the allocator: a panel each, so that a panel compares allocators only."""
    return [c for c in varying(ok, CONFIG_COLUMNS) if c not in ("allocator", "backend")]


def _facets(ok, series, sharey: bool = False):
    """One panel per setting the sweep varied besides the allocator (so a panel compares allocators only):
    (fig, axes, key of a series' row, the keys in panel order)."""
    conds = _conditions(ok)

    def key_of(row) -> tuple:
        return tuple(str(ok.loc[row.Index, c]) for c in conds)

    keys = list(dict.fromkeys(key_of(r) for r, _ in series))
    ncols = min(3, len(keys))
    nrows = -(-len(keys) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols + 1.5, 3.4 * nrows), squeeze=False, sharey=sharey)
    axes = axes.ravel()
    for ax, key in zip(axes, keys):
        ax.set_title(", ".join(f"{c.split('.')[-1]}={v}" for c, v in zip(conds, key)) or "all runs", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys):]:
        ax.axis("off")
    return fig, axes, key_of, keys


def _facet_legend(fig, axes, extra: dict, title: str) -> None:
    """The allocators' colours and the line styles' meanings, once, right of the panels."""
    handles = {lab: h for ax in axes for h, lab in zip(*ax.get_legend_handles_labels())} | extra
    fig.legend(handles.values(), handles.keys(), fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5),
               frameon=False)
    fig.suptitle(title, fontsize=11)


def _fragmentation_over_time(ok, records, out, paths) -> None:
    """KV waste (solid) and the process allocator's fragmentation (dotted) against scheduler steps, one panel
    per setting the sweep varied besides the allocator: runs of one workload line up step by step whatever
    their speed (records without steps fall back to seconds)."""
    series = list(_series(ok, records, out, "fragmentation"))
    if not series:
        return
    fig, axes, key_of, keys = _facets(ok, series, sharey=True)
    by_steps, seen = True, set()
    for row, tl in series:
        key, alloc = key_of(row), str(getattr(row, "allocator", ""))
        ax = axes[keys.index(key)]
        x = tl.get("step") or tl["t_s"]
        by_steps &= "step" in tl
        ax.plot(x, tl["kv_waste"], "-", color=COLORS.get(alloc), lw=1.3, alpha=0.85,
                label=alloc if (key, alloc) not in seen else None)
        ax.plot(x, tl["allocator_frag"], ":", color=COLORS.get(alloc), lw=1.2, alpha=0.85)
        seen.add((key, alloc))
    for ax in axes[:len(keys)]:
        ax.set_xlabel("scheduler steps" if by_steps else "time since start of run (s)", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("fraction (0..1)")
    _facet_legend(fig, axes, {"KV waste: 1 - live / reserved": Line2D([], [], color="black", ls="-"),
                              "process allocator: free / held": Line2D([], [], color="black", ls=":")},
                  "fragmentation over the run, per setting")
    _save(fig, out, "fragmentation_over_time", paths)


def _kv_over_steps(ok, records, out, paths) -> None:
    """KV (and recurrent state) bytes reserved (thick) and live (thin) through the run, one panel per setting the
    sweep varied besides the allocator, an allocator per colour: how far each reservation runs ahead of the
    tokens actually held. Panels keep their own scale (a 7B's KV beside a small model's)."""
    series = [(r, tl) for r, tl in _series(ok, records, out, "memory") if "step" in tl]
    if not series:
        return
    fig, axes, key_of, keys = _facets(ok, series)
    seen = set()
    for row, tl in series:
        alloc = str(getattr(row, "allocator", ""))
        ax = axes[keys.index(key_of(row))]
        live = [a + b for a, b in zip(tl["live_bytes"], tl.get("state_live_bytes", [0] * len(tl["live_bytes"])))]
        ax.plot(tl["step"], [v / MIB for v in tl["reserved_bytes"]], "-", color=COLORS.get(alloc), lw=2.0,
                alpha=0.8, label=alloc if alloc not in seen else None)
        ax.plot(tl["step"], [v / MIB for v in live], "-", color=COLORS.get(alloc), lw=0.9, alpha=0.9)
        seen.add(alloc)
    for ax in axes[:len(keys)]:
        ax.set_xlabel("scheduler steps", fontsize=8)
        ax.set_ylabel("MiB", fontsize=8)
    _facet_legend(fig, axes, {"reserved": Line2D([], [], color="black", lw=2.0),
                              "live (tokens and states held)": Line2D([], [], color="black", lw=0.9)},
                  "KV cache and recurrent state over the run: reserved vs live")
    _save(fig, out, "kv_over_steps", paths)


def _breakdown(ok, out, paths) -> None:
    """Memory per component: the weights of each model on their own axis (a 400 MB and a 13 GB model do not
    share one), then one panel per model with its points' KV cache and recurrent state, per tier."""
    names = {"k": "K", "v": "V", "r": "rolling state (conv / token shift)", "s": "SSM / wkv state"}
    parts = sorted(c for c in ok.columns if c.startswith("memory.breakdown.") and not c.endswith(_CI))
    colors = {c: _PALETTE[i % len(_PALETTE)] for i, c in enumerate(parts)}
    model_names = list(dict.fromkeys(ok["model.name"])) if "model.name" in ok else [""]
    n = 1 + len(model_names)
    ncols = min(3, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.9 * nrows), squeeze=False)
    axes = axes.ravel()
    models = ok.drop_duplicates("model.name") if "model.name" in ok else ok.head(1)
    wts = _num(models, "memory.weights_bytes") / MIB
    axes[0].bar(range(len(models)), wts, color="#999999")
    axes[0].set_xticks(range(len(models)), model_names, rotation=30, ha="right", fontsize=8)
    axes[0].set_ylabel("MiB")
    axes[0].set_title("weights, as loaded")
    if len(wts) > 1 and wts.max() > 20 * max(wts.min(), 1e-9):
        axes[0].set_yscale("log")
    drawn: set[str] = set()
    for ax, name in zip(axes[1:], model_names):
        pts = ok[ok["model.name"] == name] if "model.name" in ok else ok
        labels = [lab.replace(f"name={name}", "").strip() or lab for lab in pts["label"]]
        bottom = pd.Series(0.0, index=pts.index)
        for col in parts:
            v = _num(pts, col).fillna(0) / MIB
            if not v.any():
                continue
            kind, _, tier = col.removeprefix("memory.breakdown.").partition(".")
            ax.bar(range(len(pts)), v, bottom=bottom, color=colors[col],
                   label=None if col in drawn else f"{names.get(kind, kind)} ({tier})")
            drawn.add(col)
            bottom += v
        ax.set_xticks(range(len(pts)), labels, rotation=35, ha="right", fontsize=7)
        ax.set_title(f"{name}: KV and state at the peak", fontsize=10)
        ax.set_ylabel("MiB")
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[n:]:
        ax.axis("off")
    handles = [h for ax in axes[1:n] for h in ax.get_legend_handles_labels()[0]]
    labels = [lab for ax in axes[1:n] for lab in ax.get_legend_handles_labels()[1]]
    if handles:
        fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(4, len(labels)),
                   bbox_to_anchor=(0.5, 1.0), frameon=False)
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
    fig, ax = plt.subplots(figsize=(8.5, 5))
    # every point, one marker shape per allocator, side by side: the allocators share a type's bytes and error,
    # not its speed (drawn on top of each other, 6 points looked like 3)
    allocs = list(dict.fromkeys(ok["allocator"])) if "allocator" in ok else [""]
    span = float((x.max() - x.min()) or x.max() or 1.0)
    tpot = _num(ok, "latency.tpot_ms.p50")
    norm = matplotlib.colors.Normalize(vmin=tpot.min(), vmax=tpot.max()) if tpot.notna().any() else None
    sc = None
    for a_i, alloc in enumerate(allocs):
        g = ok[ok["allocator"] == alloc] if "allocator" in ok else ok
        gx = _num(g, "memory.kv_bytes_per_token") / 1024 + (a_i - (len(allocs) - 1) / 2) * 0.025 * span
        gy = _num(g, ycol)
        sc = ax.scatter(gx, gy.clip(lower=1e-7) if kld else gy, c=_num(g, "latency.tpot_ms.p50"), cmap="viridis",
                        norm=norm, s=70, zorder=3, marker="osD^v<>"[a_i % 7], edgecolors="black", linewidths=0.5,
                        label=str(alloc))
    if len(allocs) > 1:
        ax.legend(title="allocator (marker)", fontsize=8, loc="upper right")
    placed: list[tuple[float, float]] = []  # (x, log y) of each label already drawn, left to right
    for (_, row), xx, yy in zip(pts.iterrows(), x, y):  # one point per K/V pair
        yv = max(yy, 1e-7) if kld else yy
        ly = math.log10(yv) if kld else yv
        # above its point, unless a label drawn to its left would run into it: then below
        clash = any(xx - px < 9 and abs(ly - py) < (0.5 if kld else 0.05 * (abs(py) + 1e-9)) for px, py in placed)
        ax.annotate(f"K {row['cache.type_k']} / V {row['cache.type_v']}", (xx, yv), fontsize=8,
                    xytext=(10, -14 if clash else 7), textcoords="offset points", annotation_clip=False)
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
    ax.margins(x=0.22, y=0.2)  # room for the labels right of the rightmost point
    _save(fig, out, "kv_type_tradeoff", paths)


def _parallel_scaling(ok, out, paths) -> None:
    """Throughput and TPOT against parallel sequences, timed points only, the legend outside the data."""
    timed = _timed(ok)
    if timed.empty or timed["parallel"].nunique() < 2:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (col, ylabel) in zip(axes, [("throughput.tokens_per_s", "throughput (generated tokens/s)"),
                                        ("latency.tpot_ms.p50", "TPOT p50 (ms)")]):
        _lines(ax, timed, "parallel", col)
        ax.set_xlabel("parallel sequences")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    _legend_outside(fig, axes)
    fig.suptitle("scaling with parallel sequences (bands: 95% intervals over rounds)", fontsize=11)
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
