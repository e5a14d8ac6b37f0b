"""The seed-claims comparison: verdicts from numbers, and the 7B shape's exact bytes."""

import math

import pandas as pd

from engine.loader import create_engine, create_memory, load_model
from engine.runtime.scheduler import Request, Scheduler
from harness.claims import _change, _verdict, claims_table, consistency_notes


def test_verdicts_follow_the_numbers():
    claimed = _change(85, 52)  # -39%
    assert _verdict(claimed, _change(85, 50), True).startswith("holds")
    assert _verdict(claimed, _change(85, 70), True).startswith("partly")
    assert "no measurable difference" in _verdict(claimed, _change(85, 84), True)
    assert "no measurable difference" in _verdict(claimed, _change(85, 86.5), True)
    assert "worse" in _verdict(claimed, _change(85, 90), True)
    assert "worse" in _verdict(_change(0.28, 0.07), _change(0.0, 0.5), True)  # naive 0 -> pooled 0.5
    assert _verdict(claimed, float("nan"), True).startswith("not measured")
    assert math.isinf(_change(0.0, 0.3)) and _change(0.0, 0.0) == 0.0


def test_memory_only_7b_counts_real_bytes():
    lm = load_model("llama-7b", dtype="f16", allow_memory_only=True)
    assert lm.memory_only and lm.weight_bytes() == 6_738_415_616 * 2
    out = {}
    for a in ("naive", "pooled", "paged"):
        mem = create_memory(lm, allocator=a, size=2048, n_seq_max=2, type_k="f16", type_v="f16")
        sched = Scheduler(create_engine(lm, mem), 2)
        res = sched.run([Request(i, [1] * 448, 64) for i in range(2)])
        assert [r.status for r in res] == ["done", "done"]
        out[a] = mem
    bpt = 32 * 2 * 4096 * 2  # layers x (K + V) x n_embd x f16
    assert out["pooled"].bytes_per_token == bpt
    assert out["pooled"].stats().reserved_bytes == 2048 * bpt  # the pool, whatever it holds
    st = out["naive"].stats()
    assert st.reserved_bytes == 0 and st.reserved_peak_bytes >= 512 * bpt  # freed at the end; peaked above 512 tokens


def test_claims_table_and_notes_from_a_frame():
    rows = []
    for model in ("llama-small", "llama-7b"):
        for wl in ("claims_single", "claims_continuous"):
            for a, lat in (("naive", 100.0), ("pooled", 95.0), ("paged", 96.0)):
                rows.append({"model.name": model, "workload": wl, "allocator": a, "status": "ok",
                             "latency.ttft_ms.p50": lat, "latency.tpot_ms.p50": lat / 10, "latency.e2e_ms.p50": lat * 5,
                             "fragmentation.kv_waste.time_weighted": 0.0 if a == "naive" else 0.5,
                             "fragmentation.allocator.time_weighted": 0.03,
                             "stability.steps_within_25pct": 0.97, "stability.requests_clean": 1.0,
                             "memory.peak_rss_bytes": 8e8, "memory.model_peak_bytes": 13.8e9 if a == "naive" else 14.5e9,
                             "memory.weights_bytes": 13.48e9, "memory.kv_bytes_per_token": 524288})
    df = pd.DataFrame(rows)
    t = claims_table(df)
    assert len(t) == 10 and set(t["claim"].str.split(" \\(").str[0]) == {
        "single-request latency", "memory fragmentation", "continuous inference stability", "peak memory"}
    assert t["verdict"].str.startswith("does not hold").all()
    notes = " ".join(consistency_notes(df))
    assert "13.5 GB" in notes and "0.268 GB" in notes and "18x" in notes
