"""Intervals over repeats and paired comparisons (harness/stats.py)."""

import math

import numpy as np
import pytest
from scipy import stats as st

from harness.stats import interval, paired, paired_diff


def test_interval_is_the_t_interval_of_the_log_mean():
    x = [2.0, 2.2, 2.6]
    iv = interval(x)
    lx = np.log(x)
    h = st.t.ppf(0.975, 2) * lx.std(ddof=1) / math.sqrt(3)
    assert iv.center == 2.2 and iv.n == 3  # the median
    assert iv.low == pytest.approx(math.exp(lx.mean() - h), rel=1e-12)
    assert iv.high == pytest.approx(math.exp(lx.mean() + h), rel=1e-12)


def test_constant_values_give_a_zero_width_interval_and_one_value_none():
    iv = interval([5, 5, 5])
    assert (iv.center, iv.low, iv.high) == (5, 5, 5) and iv.known
    one = interval([5.0])
    assert one.center == 5 and math.isnan(one.low) and not one.known
    assert interval([]).n == 0 and interval([float("nan"), None, True]).n == 0  # nothing numeric


def test_values_with_zero_use_the_raw_scale_and_fractions_are_clipped():
    iv = interval([0.0, 0.1, 0.2])
    assert iv.low < 0 < iv.high  # raw-scale t interval around 0.1
    frac = interval([0.9, 0.99, 1.0], bounds=(0, 1))
    assert 0 <= frac.low and frac.high == 1.0


def test_the_interval_covers_the_true_value_about_95_percent_of_the_time():
    """Coverage by simulation: 3 log-normal repeats, true geometric mean 1. Binomial sd of the
    coverage over 4000 trials is sqrt(.95 * .05 / 4000) = 0.0034: [0.93, 0.97] is +-6 sd."""
    rng = np.random.default_rng(0)
    hits = sum(interval(np.exp(rng.normal(0, 0.2, 3))).contains(1.0) for _ in range(4000))
    assert 0.93 <= hits / 4000 <= 0.97


def test_pairing_by_round_cancels_what_both_sides_share():
    """A slow round slows both variants: the paired ratio stays exact, unpaired intervals do not."""
    drift = np.array([1.0, 3.0, 1.5, 0.8])  # a neighbour came and went
    a, b = 10 * drift, 8 * drift
    iv = paired(a, b)
    assert iv.center == pytest.approx(0.8) and iv.low == pytest.approx(0.8) and iv.high == pytest.approx(0.8)
    assert interval(b).high / interval(b).low > 3  # each side alone is very uncertain


def test_paired_drops_rounds_with_a_missing_side():
    iv = paired([1.0, float("nan"), 2.0, 1.0], [1.1, 5.0, None, 1.2])
    assert iv.n == 2


def test_paired_diff_for_metrics_that_can_be_zero():
    iv = paired_diff([0.0, 0.0, 0.0], [0.5, 0.6, 0.55])
    assert iv.center == pytest.approx(0.55) and 0 < iv.low < 0.55 < iv.high
    assert paired([0.0, 0.0], [0.5, 0.6]).n == 0  # a ratio to 0 is undefined: use paired_diff
