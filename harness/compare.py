"""``kvbench compare BASELINE CURRENT``: fail when a metric regressed beyond its tolerance.

Inputs: pytest-benchmark JSON files (``--benchmark-json``) or sweep directories of records.
Benchmarks give ``time.<name>`` (median seconds, with the IQR) and every numeric ``extra_info``
entry as ``<name>.<key>``; records give ``<point>/<metric>`` for every numeric metric, where
``<point>`` is the point's overrides.

Rules (first match wins, ``fnmatch`` patterns; defaults below, ``--rules FILE`` for YAML) decide
how each metric is judged, because a shared CI machine makes absolute timings swing by integer
factors when a neighbour is busy:

- ``exact``: deterministic counts (KV allocations per step): any move in the bad direction fails.
- ``relative``: fails when the change exceeds ``tolerance`` in the bad direction AND, where both
  sides carry an IQR, the medians moved by more than the larger IQR (noise band). Meant for
  ratios measured in one run (paged/pooled step time), which a slow machine scales away.
- ``gate: false``: reported, never fails (raw wall times by default: a busy neighbour swings them by
  integer factors).

Absolute speed is gated through normalised times (``norm.*``, docs/metrics.md): a time measured in
units of the calibration probe run in the same process, taken as the fastest of many short steps. A
machine that is uniformly faster or slower scales it away, a busy neighbour usually barely moves the
fastest step, and an engine that does more work per step moves it in full. Default: gated at 50%.

Contention gives an honest verdict, not a guess. Each benchmark (sweep point) of the current run is
judged for noise from its own ``noise.*`` metrics, with the thresholds sweeps use (``harness.noise.judge``,
``NoiseConf``). A ``timing`` rule's metric (a time or a speed: contention only ever makes it worse) that
stayed within tolerance under contention passes, because the engine's own time is no worse than what was
measured. One that got worse beyond tolerance under contention is ``noisy``: contention alone can do
that (on one CI VM a CPU burner moved the fastest decode step +52%), so neither pass nor fail can be
claimed. The CLI exits 3 for it ("rerun on a quiet machine"; .ci/run measures again), 1 for a
regression, which wins over an inconclusive metric.

A sweep directory's points are matched by their overrides without the round; each metric is the
median over the point's rounds, from runs that were ok and not flagged as noisy where there are any.

The gate refuses to pass vacuously: an empty or unreadable baseline or current, no metric in common,
no gated metric compared, or most of the baseline's metrics missing from the current run is bad input
(ConfigError, exit 2), never "0 regressed".
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from engine.errors import ConfigError
from harness.config import NoiseConf
from harness.noise import judge as judge_noise
from harness.noise import normalized
from harness.records import load_records, point_id


@dataclass(frozen=True)
class Rule:
    match: str
    kind: str = "relative"  # relative | exact
    direction: str = "lower"  # lower | higher is better
    tolerance: float = 0.2
    gate: bool = True
    timing: bool = False  # a time or speed that contention only ever makes worse (module docstring)


DEFAULT_RULES = [
    Rule("*alloc*per*step*", kind="exact", direction="lower"),
    Rule("*ratio*", kind="relative", direction="lower", tolerance=0.25),
    Rule("*norm.*min", kind="relative", direction="lower", tolerance=0.5, timing=True),
    Rule("*norm.*", kind="relative", direction="lower", tolerance=0.5, gate=False, timing=True),
    Rule("*noise.*", kind="relative", direction="lower", tolerance=0.5, gate=False),
    Rule("*tokens_per_s*", kind="relative", direction="higher", tolerance=0.5, gate=False, timing=True),
    Rule("time.*", kind="relative", direction="lower", tolerance=0.5, gate=False, timing=True),
    Rule("*latency*", kind="relative", direction="lower", tolerance=0.5, gate=False, timing=True),
    Rule("*", kind="relative", direction="lower", tolerance=0.5, gate=False),
]


@dataclass
class Value:
    value: float
    iqr: float | None = None
    noisy: str = ""  # why the benchmark (point) it belongs to counts as measured under contention; "" if not


def load_rules(path: Path | None) -> list[Rule]:
    if path is None:
        return DEFAULT_RULES
    try:
        doc = yaml.safe_load(Path(path).read_text())
        rules = [Rule(**r) for r in doc["rules"]]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a rules file ({e}); expected 'rules: [{{match, kind, direction, "
                          "tolerance, gate, timing}}, ...]'") from None
    for r in rules:
        if r.kind not in ("relative", "exact") or r.direction not in ("lower", "higher") or r.tolerance < 0:
            raise ConfigError(f"{path}: bad rule {r}: kind relative|exact, direction lower|higher, tolerance >= 0")
    return rules + DEFAULT_RULES


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _point_name(overrides: list[str], fallback: str) -> str:
    skip = ("quiet=", "force=", "repeat=", "repeats=", "retry_noisy=")
    return " ".join(sorted(o for o in overrides if not o.startswith(skip))) or fallback


def _sweep_metrics(path: Path) -> dict[str, Value]:
    """Per point (overrides without the round), the median of each numeric metric over its rounds."""
    import numpy as np

    recs = load_records(path)
    if not recs:
        raise ConfigError(f"{path}: no readable record.json under it; pass a sweep directory with records")
    points: dict[str, list] = {}
    for _, rec in recs:
        if rec.status == "ok":
            # normalised times recomputed from the record's own times and probe unit, so they always agree
            rec.metrics |= normalized(rec.metrics)
            points.setdefault(_point_name(rec.overrides, point_id(rec.config)), []).append(rec)
    out = {}
    for point, group in points.items():
        clean = [r for r in group if not r.metrics.get("noise.flagged")]
        # every round flagged: the point's medians come from noisy runs, and say so
        noisy = "" if clean else str(group[0].metrics.get("noise.reason") or "every round was flagged as noisy")
        clean = clean or group
        names = dict.fromkeys(k for r in clean for k, v in r.metrics.items() if _numeric(v))
        for k in names:
            xs = np.asarray([r.metrics[k] for r in clean if _numeric(r.metrics.get(k))], dtype=float)
            iqr = float(np.subtract(*np.percentile(xs, [75, 25]))) if xs.size >= 3 else None
            out[f"{point}/{k}"] = Value(float(np.median(xs)), iqr, noisy)
    return out


def _bench_noise(info: dict) -> str:
    """Why a benchmark's own ``noise.*`` extras say it ran under contention ("" if quiet or not measured)."""
    m = {k: float(v) for k, v in info.items() if k.startswith("noise.") and _numeric(v)}
    flagged, reason = judge_noise(m, NoiseConf())
    return reason if flagged else ""


def load_metrics(path: Path) -> dict[str, Value]:
    """Metrics of a pytest-benchmark JSON file or of a directory of records."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file or directory")
    if path.is_dir():
        return _sweep_metrics(path)
    try:
        doc = json.loads(path.read_text())
        benches = doc["benchmarks"]
        if not isinstance(benches, list):
            raise TypeError("'benchmarks' is not a list")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: neither a sweep directory nor a pytest-benchmark JSON file ({e})") from None
    out = {}
    for i, b in enumerate(benches):
        if not isinstance(b, dict) or not isinstance(b.get("stats", {}), dict) \
                or not isinstance(b.get("extra_info") or {}, dict):
            raise ConfigError(f"{path}: benchmarks[{i}] is not a pytest-benchmark entry (a dict with 'name', "
                              "'stats' and 'extra_info' dicts); regenerate it with --benchmark-json")
        name = b.get("name", "?")
        st = b.get("stats", {})
        noisy = _bench_noise(b.get("extra_info") or {})
        if _numeric(st.get("median")):
            out[f"time.{name}"] = Value(float(st["median"]), float(st["iqr"]) if _numeric(st.get("iqr")) else None,
                                        noisy)
        for k, v in (b.get("extra_info") or {}).items():
            if _numeric(v):
                out[f"{name}.{k}"] = Value(float(v), noisy=noisy)
    if not out:
        raise ConfigError(f"{path}: no benchmark metrics in it; is it the output of --benchmark-json?")
    return out


def rule_for(name: str, rules: list[Rule]) -> Rule:
    return next(r for r in rules if fnmatch.fnmatch(name, r.match))


@dataclass
class Row:
    metric: str
    base: float | None
    cur: float | None
    change: float | None
    rule: Rule
    status: str  # ok | regressed | noisy (inconclusive) | improved | new | missing | moved (not gated)
    noisy: str = ""  # why the current side counts as measured under contention


def judge(name: str, b: Value | None, c: Value | None, rule: Rule) -> Row:
    if b is None:
        return Row(name, None, c.value, None, rule, "new", c.noisy)
    if c is None:
        return Row(name, b.value, None, None, rule, "missing")
    sign = 1.0 if rule.direction == "lower" else -1.0
    diff = (c.value - b.value) * sign  # > 0: worse
    change = (c.value - b.value) / abs(b.value) if b.value else (0.0 if c.value == b.value else math.inf)
    if rule.kind == "exact":
        worse, better = diff > 0, diff < 0
    else:
        noise = max(b.iqr or 0.0, c.iqr or 0.0)
        rel = abs(change) if math.isfinite(change) else math.inf
        worse = diff > 0 and rel > rule.tolerance and abs(c.value - b.value) > noise
        better = diff < 0 and rel > rule.tolerance and abs(c.value - b.value) > noise
    if worse and not rule.gate:
        status = "moved"
    elif worse:  # a time that got worse under contention: contention alone could have done it
        status = "noisy" if rule.timing and c.noisy else "regressed"
    else:
        status = "improved" if better else "ok"
    return Row(name, b.value, c.value, change, rule, status, c.noisy)


def compare(base: dict[str, Value], cur: dict[str, Value], rules: list[Rule]) -> list[Row]:
    return [judge(n, base.get(n), cur.get(n), rule_for(n, rules)) for n in sorted(base.keys() | cur.keys())]


MAX_MISSING = 0.5  # more than this share of the baseline's metrics absent: not the same benchmark


def check_coverage(rows: list[Row], baseline: str, current: str) -> None:
    """A gate that compared nothing must not pass: ConfigError (exit 2) when it would be vacuous."""
    compared = [r for r in rows if r.base is not None and r.cur is not None]
    missing = [r for r in rows if r.status == "missing"]
    n_base = len(compared) + len(missing)
    if not compared:
        raise ConfigError(f"no metric of {baseline} is in {current}: they are not the same benchmark "
                          "(or the sweep's points differ); regenerate the baseline")
    if not any(r.rule.gate for r in compared):
        raise ConfigError(f"none of the {len(compared)} metrics in common is gated by the rules: the gate would "
                          "pass whatever happened; add a gated rule or compare other files")
    if len(missing) > MAX_MISSING * n_base:
        raise ConfigError(f"{len(missing)} of the baseline's {n_base} metrics are missing from {current} "
                          f"(first: {missing[0].metric}); the run is incomplete or not the same benchmark")


def render(rows: list[Row], show_all: bool = False) -> str:
    from tabulate import tabulate

    def f(x):
        return "" if x is None else f"{x:.4g}"

    shown = [r for r in rows if show_all or r.status != "ok" or (r.change is not None and abs(r.change) > 0.05)]
    table = [[r.status.upper() if r.status in ("regressed", "noisy") else r.status, r.metric, f(r.base), f(r.cur),
              "" if r.change is None else f"{r.change:+.1%}",
              f"{r.rule.kind} {r.rule.direction}" + (f" tol {r.rule.tolerance:.0%}" if r.rule.kind == "relative" else "")
              + ("" if r.rule.gate else " (not gated)")] for r in shown]
    n_reg = sum(r.status == "regressed" for r in rows)
    n_noisy = sum(r.status == "noisy" for r in rows)
    both = [r for r in rows if r.base is not None and r.cur is not None]
    n_gated = sum(r.rule.gate for r in both)
    n_new, n_missing = sum(r.status == "new" for r in rows), sum(r.status == "missing" for r in rows)
    head = (f"{len(both)} metrics compared ({n_gated} gated), {n_reg} regressed, {n_noisy} inconclusive; "
            f"{n_missing} missing, {n_new} new; {len(rows) - len(shown)} unchanged (within 5%) not shown")
    out = [head]
    if table:
        out.append(tabulate(table, headers=["status", "metric", "baseline", "current", "change", "rule"]))
    if n_noisy:
        reasons = dict.fromkeys(r.noisy for r in rows if r.status == "noisy")
        out.append(f"NOISY: {n_noisy} timing metric(s) got worse while the current run was measured under "
                   f"contention ({'; '.join(reasons)}). Contention alone can do that: inconclusive, "
                   "rerun on a quiet machine.")
    return "\n".join(out)
