"""The seed-claims comparison: verdicts from numbers, and the 7B shape's exact bytes."""

import numpy as np
import pandas as pd

from engine.loader import create_engine, create_memory, load_model
from engine.runtime.scheduler import Request, Scheduler
from harness.report.claims import claim_verdict, claims_table, consistency_notes
from harness.stats import Interval
from tests.helpers.runs import run_all


def _iv(center, low, high, n=3):
    return Interval(center, low, high, n)


def test_verdicts_follow_the_interval():
    claimed = 52 / 85 - 1  # -39%
    v = lambda iv, noisy=0, exact=False: claim_verdict(claimed, iv, noisy, exact, fraction=False)  # noqa: E731
    assert v(_iv(-0.40, -0.45, -0.35)).startswith("holds")  # contains the claim
    assert v(_iv(-0.60, -0.65, -0.55)).startswith("holds")  # beyond it
    assert v(_iv(-0.25, -0.30, -0.20)).startswith("partly")  # real, smaller than claimed
    assert v(_iv(-0.05, -0.08, -0.02)).startswith("does not hold: a real change, but under a third")
    assert v(_iv(-0.01, -0.03, 0.02)).startswith("does not hold: no detectable")  # excludes the claim
    assert v(_iv(-0.20, -0.50, 0.05)).startswith("inconclusive")  # spans no effect and the claim
    assert "pooled is worse" in v(_iv(0.10, 0.05, 0.15))
    assert v(_iv(-0.40, -0.45, -0.35), noisy=2).startswith("inconclusive: 2")  # noisy runs: no verdict
    assert v(_iv(-0.40, float("nan"), float("nan"), n=1)).startswith("inconclusive")  # one round
    assert v(_iv(0.05, float("nan"), float("nan"), n=1), exact=True).startswith("does not hold")  # exact bytes
    assert v(_iv(float("nan"), float("nan"), float("nan"), n=0)).startswith("not measured")
    # fractions in points: 28% -> 7% is -21 points; naive 0 -> pooled 0.5 is +50 points, the other way
    assert "worse" in claim_verdict(0.07 - 0.28, _iv(0.5, 0.45, 0.55), 0, False, fraction=True)


def test_memory_only_7b_counts_real_bytes():
    lm = load_model("llama-7b", dtype="f16", allow_memory_only=True)
    assert lm.memory_only and lm.weight_bytes() == 6_738_415_616 * 2
    out = {}
    for a in ("naive", "pooled", "paged"):
        mem = create_memory(lm, allocator=a, size=2048, n_seq_max=2, type_k="f16", type_v="f16")
        sched = Scheduler(create_engine(lm, mem), 2)
        res = run_all(sched, [Request(i, [1] * 448, 64) for i in range(2)])
        assert [r.status for r in res] == ["done", "done"]
        out[a] = mem
    bpt = 32 * 2 * 4096 * 2  # layers x (K + V) x n_embd x f16
    assert out["pooled"].bytes_per_token == bpt
    assert out["pooled"].stats().reserved_bytes == 2048 * bpt  # the pool, whatever it holds
    st = out["naive"].stats()
    assert st.reserved_bytes == 0 and st.reserved_peak_bytes >= 512 * bpt  # freed at the end; peaked above 512 tokens


def _runs_frame(rounds=3, pooled_lat=95.0, noisy_round=None, llamacpp=False):
    """A runs frame as harness.report.records_frame builds it: one row per (point, round)."""
    rng = np.random.default_rng(0)
    rows = []
    for r in range(rounds):
        slow = 1 + rng.uniform(0, 0.3)  # the same round is slow for every variant
        for model in ("llama-small", "llama-7b"):
            for wl in ("claims_single", "claims_single_sized", "claims_continuous"):
                for a, lat in (("naive", 100.0), ("pooled", pooled_lat), ("paged", 96.0)):
                    sized = wl == "claims_single_sized" and a != "naive"
                    rows.append({"model.name": model, "workload": wl, "allocator": a, "status": "ok", "repeat": r,
                                 "noisy": r == noisy_round, "latency.ttft_ms.p50": lat * slow,
                                 "latency.tpot_ms.p50": lat / 10 * slow, "latency.e2e_ms.p50": lat * 5 * slow,
                                 "fragmentation.kv_waste.time_weighted": 0.0 if a == "naive" else 0.5 + 0.01 * r,
                                 "fragmentation.allocator.time_weighted": 0.03 + 0.001 * r,
                                 "stability.steps_within_25pct": 0.97 - 0.01 * r, "stability.requests_clean": 1.0,
                                 "memory.peak_rss_bytes": 8e8 * (1 + 0.01 * r),
                                 "memory.model_peak_bytes": 13.8e9 if a == "naive" else 13.75e9 if sized else 14.5e9,
                                 "memory.weights_bytes": 13.48e9, "memory.kv_bytes_per_token": 524288})
        if llamacpp:  # llama.cpp itself, on the continuous workload: streams (per-sequence) vs unified
            for a, waste in (("llamacpp.streams", 0.1), ("llamacpp.unified", 0.6)):
                rows.append({"model.name": "llama-small", "workload": "claims_continuous", "allocator": a,
                             "status": "ok", "repeat": r, "noisy": False,
                             "fragmentation.kv_waste.time_weighted": waste + 0.01 * r,
                             "fragmentation.allocator.time_weighted": 0.02, "stability.steps_within_25pct": 0.9,
                             "stability.requests_clean": 1.0, "memory.peak_rss_bytes": 5e8})
    return pd.DataFrame(rows)


def test_claims_table_pairs_rounds_and_gives_verdicts():
    t = claims_table(_runs_frame())
    assert len(t) == 17 and set(t["claim"].str.split(" \\(").str[0]) == {
        "single-request latency", "memory fragmentation", "continuous inference stability", "peak memory"}
    kv = t[~t["kvbench measures"].str.startswith("llama.cpp")]
    assert (kv["rounds"] == 3).all()
    assert t[t["kvbench measures"].str.startswith("llama.cpp")]["verdict"].str.startswith("not measured").all()
    lat = t[t["claim"].str.startswith("single-request")]["verdict"]
    assert lat.str.startswith("does not hold: a real change").all()  # -5% in every round, exact: real, tiny
    frag = t[t["claim"].str.startswith("memory fragmentation")]["verdict"]
    assert "worse" in frag.iloc[0]  # kv_waste 0 -> 0.5
    peak = t[t["kvbench measures"].str.contains("llama-7b")]["verdict"].tolist()
    assert peak[0].startswith("does not hold: pooled is worse")  # equal cache.size: +5.1%, exact
    assert peak[1].startswith("does not hold: a real change")  # sized to the workload: -0.4%, exact
    notes = " ".join(consistency_notes(_runs_frame()))
    assert "13.5 GB" in notes and "0.268 GB" in notes and "18x" in notes


def test_noisy_rounds_make_timed_verdicts_inconclusive_and_leave_memory_alone():
    t = claims_table(_runs_frame(noisy_round=1))
    timed = t[t["kvbench measures"].str.contains("TTFT|TPOT|E2E|decode steps")
              & ~t["kvbench measures"].str.startswith("llama.cpp")]
    assert len(timed) == 4 and timed["verdict"].str.startswith("inconclusive").all()
    memory = t[t["kvbench measures"].str.contains("RSS|kv_waste")]
    assert not memory["verdict"].str.startswith("inconclusive").any()


def test_a_single_round_gives_no_timed_verdict():
    t = claims_table(_runs_frame(rounds=1, pooled_lat=50.0))
    lat = t[t["claim"].str.startswith("single-request")]["verdict"]
    assert lat.str.startswith("inconclusive").all()


def test_llamacpp_rows_compare_its_streams_with_its_unified_pool():
    """experiment=seed_claims runs llama.cpp too: per-sequence streams -> one unified pool, the same verdict rules,
    on the continuous workload (with one sequence the two memories are the same, so nothing to compare)."""
    t = claims_table(_runs_frame(llamacpp=True))
    lc = t[t["kvbench measures"].str.startswith("llama.cpp itself")]
    assert len(lc) == 5 and (lc["rounds"] == 3).all()
    assert lc["kvbench measures"].str.contains("continuous workload").all()
    waste = lc[lc["kvbench measures"].str.contains("kv_waste")].iloc[0]
    assert "worse" in waste["verdict"] and "(paged" not in waste["measured medians (naive -> pooled)"]
