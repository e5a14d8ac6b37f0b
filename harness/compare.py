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
- ``gate: false``: reported, never fails (absolute wall times by default).
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from engine.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    match: str
    kind: str = "relative"  # relative | exact
    direction: str = "lower"  # lower | higher is better
    tolerance: float = 0.2
    gate: bool = True


DEFAULT_RULES = [
    Rule("*alloc*per*step*", kind="exact", direction="lower"),
    Rule("*ratio*", kind="relative", direction="lower", tolerance=0.25),
    Rule("*tokens_per_s*", kind="relative", direction="higher", tolerance=0.5, gate=False),
    Rule("time.*", kind="relative", direction="lower", tolerance=0.5, gate=False),
    Rule("*latency*", kind="relative", direction="lower", tolerance=0.5, gate=False),
    Rule("*", kind="relative", direction="lower", tolerance=0.5, gate=False),
]


@dataclass
class Value:
    value: float
    iqr: float | None = None


def load_rules(path: Path | None) -> list[Rule]:
    if path is None:
        return DEFAULT_RULES
    try:
        doc = yaml.safe_load(Path(path).read_text())
        rules = [Rule(**r) for r in doc["rules"]]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a rules file ({e}); expected 'rules: [{{match, kind, direction, "
                          "tolerance, gate}}, ...]'") from None
    for r in rules:
        if r.kind not in ("relative", "exact") or r.direction not in ("lower", "higher") or r.tolerance < 0:
            raise ConfigError(f"{path}: bad rule {r}: kind relative|exact, direction lower|higher, tolerance >= 0")
    return rules + DEFAULT_RULES


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def load_metrics(path: Path) -> dict[str, Value]:
    """Metrics of a pytest-benchmark JSON file or of a directory of records."""
    path = Path(path)
    if path.is_dir():
        from harness.records import load_records

        out = {}
        for p, rec in load_records(path):
            if rec.status != "ok":
                continue
            point = " ".join(sorted(o for o in rec.overrides if not o.startswith(("quiet", "force")))) or rec.config_hash
            for k, v in rec.metrics.items():
                if _numeric(v):
                    out[f"{point}/{k}"] = Value(float(v))
        return out
    try:
        doc = json.loads(path.read_text())
        benches = doc["benchmarks"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: neither a sweep directory nor a pytest-benchmark JSON file ({e})") from None
    out = {}
    for b in benches:
        name = b.get("name", "?")
        st = b.get("stats", {})
        if _numeric(st.get("median")):
            out[f"time.{name}"] = Value(float(st["median"]), float(st["iqr"]) if _numeric(st.get("iqr")) else None)
        for k, v in (b.get("extra_info") or {}).items():
            if _numeric(v):
                out[f"{name}.{k}"] = Value(float(v))
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
    status: str  # ok | regressed | improved | new | missing | moved (not gated)


def judge(name: str, b: Value | None, c: Value | None, rule: Rule) -> Row:
    if b is None:
        return Row(name, None, c.value, None, rule, "new")
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
    if worse:
        status = "regressed" if rule.gate else "moved"
    else:
        status = "improved" if better else "ok"
    return Row(name, b.value, c.value, change, rule, status)


def compare(base: dict[str, Value], cur: dict[str, Value], rules: list[Rule]) -> list[Row]:
    return [judge(n, base.get(n), cur.get(n), rule_for(n, rules)) for n in sorted(base.keys() | cur.keys())]


def render(rows: list[Row], show_all: bool = False) -> str:
    from tabulate import tabulate

    def f(x):
        return "" if x is None else f"{x:.4g}"

    shown = [r for r in rows if show_all or r.status != "ok" or (r.change is not None and abs(r.change) > 0.05)]
    table = [[r.status.upper() if r.status == "regressed" else r.status, r.metric, f(r.base), f(r.cur),
              "" if r.change is None else f"{r.change:+.1%}",
              f"{r.rule.kind} {r.rule.direction}" + (f" tol {r.rule.tolerance:.0%}" if r.rule.kind == "relative" else "")
              + ("" if r.rule.gate else " (not gated)")] for r in shown]
    n_reg = sum(r.status == "regressed" for r in rows)
    head = f"{len(rows)} metrics compared, {n_reg} regressed, {len(rows) - len(shown)} unchanged (within 5%) not shown"
    if not table:
        return head
    return head + "\n" + tabulate(table, headers=["status", "metric", "baseline", "current", "change", "rule"])
