"""Intervals over repeats and paired comparisons between variants (docs/metrics.md, "Repeats and intervals").

Every point of a sweep runs ``repeats`` times, in rounds. Two questions are asked of the runs:

- *How large is this metric at this point?* ``interval`` gives the median of the repeats and a
  95% interval: Student's t interval of the mean of ``log(x)`` (times and byte counts are positive
  and their noise is multiplicative: a neighbour slows a run by a factor), or of ``x`` itself where
  some value is <= 0 (fractions such as kv_waste can be 0). With 3 repeats t(0.975, 2) = 4.30: the
  interval is wide, and honestly so. A metric that does not vary (byte counts) has a zero-width
  interval; a single run has none.
- *Is B faster than A?* ``paired`` pairs the runs of A and B from the same round, so drift and a
  neighbour that came and went hit both sides of each pair; the interval is the t interval of the
  mean per-round log ratio (a geometric mean ratio), or of the per-round difference for metrics that
  can be 0 (``paired_diff``).

Why t and not a bootstrap: with 3-5 repeats a bootstrap can only resample those few values, and its
percentile interval is about as wide as their range, much narrower than the uncertainty it claims
to cover (a 95% bootstrap interval from 3 values covers far less than 95%). The t interval is exact
for normally distributed log values and widens properly at small n.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
from scipy import stats as _st

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    center: float  # median of the values (interval) or geometric-mean ratio / mean difference (paired)
    low: float
    high: float
    n: int

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high

    @property
    def known(self) -> bool:
        return self.n >= 2 and math.isfinite(self.low) and math.isfinite(self.high)


_NAN = float("nan")


def _clean(values) -> np.ndarray:
    x = np.asarray([v for v in values if _number(v)], dtype=np.float64)
    return x[np.isfinite(x)]


def _t_bounds(x: np.ndarray) -> tuple[float, float]:
    """Two-sided LEVEL t interval of the mean of x (n >= 2)."""
    n = x.size
    m, s = float(x.mean()), float(x.std(ddof=1))
    if s == 0.0:
        return m, m
    h = float(_st.t.ppf(0.5 + LEVEL / 2, n - 1)) * s / math.sqrt(n)
    return m - h, m + h


def interval(values, bounds: tuple[float, float] | None = None) -> Interval:
    """Median of the repeats and the LEVEL interval of their mean: geometric where all values are
    > 0, arithmetic otherwise or when the metric has ``bounds`` (fractions 0..1), clipped to them."""
    x = _clean(values)
    if x.size == 0:
        return Interval(_NAN, _NAN, _NAN, 0)
    med = float(np.median(x))
    if x.size == 1:
        return Interval(med, _NAN, _NAN, 1)
    if (x == x[0]).all():  # exact (byte counts): no spread, and no rounding through log/exp
        return Interval(med, med, med, int(x.size))
    if bounds is None and (x > 0).all():
        lo, hi = _t_bounds(np.log(x))
        return Interval(med, math.exp(lo), math.exp(hi), int(x.size))
    lo, hi = _t_bounds(x)
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return Interval(med, lo, hi, int(x.size))


def paired(a, b) -> Interval:
    """b / a per round (a[i] and b[i] from round i; pairs with a missing or non-positive side are
    dropped): geometric-mean ratio and its LEVEL interval."""
    pairs = [(x, y) for x, y in zip(a, b) if _ok(x) and _ok(y) and x > 0 and y > 0]
    if not pairs:
        return Interval(_NAN, _NAN, _NAN, 0)
    if all(y / x == pairs[0][1] / pairs[0][0] for x, y in pairs):  # exact (byte counts)
        q = pairs[0][1] / pairs[0][0]
        return Interval(q, q if len(pairs) > 1 else _NAN, q if len(pairs) > 1 else _NAN, len(pairs))
    r = np.log([y / x for x, y in pairs])
    if r.size == 1:
        return Interval(math.exp(r[0]), _NAN, _NAN, 1)
    lo, hi = _t_bounds(r)
    return Interval(math.exp(float(r.mean())), math.exp(lo), math.exp(hi), int(r.size))


def paired_diff(a, b) -> Interval:
    """b - a per round: mean difference and its LEVEL interval (for metrics that can be 0)."""
    d = np.asarray([y - x for x, y in zip(a, b) if _ok(x) and _ok(y)], dtype=np.float64)
    if d.size == 0:
        return Interval(_NAN, _NAN, _NAN, 0)
    if d.size == 1:
        return Interval(float(d[0]), _NAN, _NAN, 1)
    lo, hi = _t_bounds(d)
    return Interval(float(d.mean()), lo, hi, int(d.size))


def _number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _ok(v) -> bool:
    return _number(v) and math.isfinite(v)
