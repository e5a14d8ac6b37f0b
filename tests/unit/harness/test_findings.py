"""The report's Findings: sentences only from comparisons whose interval excludes no change, with the interval
and the condition; everything else said as what it is."""

import pandas as pd

from harness.report.findings import GLOSSARY, findings_markdown, glossary_markdown
from harness.report.frames import SUMMARY

COLS = ["dimension", "baseline", "variant", "condition", "metric", "kind", "lower_is_better", "rounds",
        "noisy_runs", "estimate", "ci95_low", "ci95_high", "verdict"]


def _comp(rows):
    return pd.DataFrame(rows, columns=COLS)


def _runs(rounds=3):
    return pd.DataFrame({"status": ["ok"] * rounds, "repeat": list(range(rounds))})


def test_a_difference_is_a_sentence_with_interval_and_condition():
    comp = _comp([
        ["allocator", "naive", "pooled", "cache.size=512", "latency.tpot_ms.p50", "ratio", True, 3, 0,
         -0.12, -0.15, -0.08, "lower (better)"],
        ["allocator", "naive", "pooled", "cache.size=512", "memory.peak_rss_bytes", "ratio", True, 3, 0,
         0.004, -0.01, 0.02, "no detectable difference"],
        ["allocator", "naive", "paged", "cache.size=512", "throughput.tokens_per_s", "ratio", False, 3, 2,
         0.3, 0.1, 0.5, "inconclusive: 2 noisy runs"],
    ])
    md = findings_markdown(_runs(), pd.DataFrame(index=range(2)), comp)
    assert "**pooled** cut TPOT p50 by 12% [8.0%, 15%] vs naive at cache.size 512 (better; 3 rounds)." in md
    assert "No detectable difference (95% intervals include 0) in 1 comparisons, of: peak RSS." in md
    assert "1 comparisons are inconclusive" in md
    assert "paged" not in md.split("inconclusive")[0]  # a noisy comparison is never a finding


def test_one_round_claims_nothing():
    comp = _comp([["allocator", "naive", "pooled", "(all)", "latency.tpot_ms.p50", "ratio", True, 1, 0,
                   -0.3, float("nan"), float("nan"), "one round: no interval (run repeats >= 3)"]])
    md = findings_markdown(_runs(1), pd.DataFrame(index=range(2)), comp)
    assert "cut" not in md and "One round only" in md


def test_every_summary_column_has_a_glossary_line():
    headers = [h for _, h, _ in SUMMARY]
    md = glossary_markdown(headers)
    assert all(f"**{h}**: {GLOSSARY[h]}" in md for h in headers)


def test_tiny_differences_are_counted_not_written_up():
    comp = _comp([["allocator", "naive", "pooled", "(all)", "memory.peak_rss_bytes", "ratio", True, 3, 0,
                   0.002, 0.001, 0.003, "higher (worse)"]])
    md = findings_markdown(_runs(), pd.DataFrame(index=range(2)), comp)
    assert "raised" not in md and "1 more differences are real but below 2%" in md
