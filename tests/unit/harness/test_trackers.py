"""Trackers on controlled inputs: definitions of docs/metrics.md, checked by hand."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine.memory.base import MemoryStats
from engine.runtime.scheduler import RequestResult, StepInfo
from harness.trackers import FragmentationTracker, LatencyTracker, MemoryTracker
from harness.trackers.base import summarize, time_weighted_mean
from harness.trackers.fragmentation import allocator_fragmentation


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _step(seconds, n_prefill=0, n_decode=1):
    return StepInfo(n_prefill + n_decode, n_prefill, n_decode, seconds, [], [], [])


def test_latency_definitions():
    clk = Clock()
    r1 = RequestResult(0, [1], tokens=[5, 6, 7], status="done", t_submit=100.0, token_times=[100.5, 100.7, 101.1])
    r2 = RequestResult(1, [1], tokens=[5], status="done", t_submit=100.2, token_times=[100.4])
    r3 = RequestResult(2, [1], status="failed")
    sched = SimpleNamespace(results={0: r1, 1: r2, 2: r3})
    tr = LatencyTracker(sched, clock=clk)
    with tr:
        for s in (0.010, 0.010, 0.011, 0.100):
            tr.on_step(_step(s))
        tr.on_step(_step(0.050, n_prefill=8, n_decode=1))  # not a decode step
        clk.t = 102.0
    m = tr.metrics()
    assert m["latency.ttft_ms.mean"] == pytest.approx((500 + 200) / 2)
    assert m["latency.e2e_ms.p50"] == pytest.approx(np.median([1100, 200]))
    assert m["latency.tpot_ms.mean"] == pytest.approx(300)  # (1100 - 500) / 2, r2 has one token
    assert m["latency.itl_ms.n"] == 2 and m["latency.itl_ms.mean"] == pytest.approx(300)
    assert m["latency.decode_step_ms.n"] == 4 and m["latency.decode_step_ms.p50"] == pytest.approx(10.5)
    assert m["throughput.tokens_per_s"] == pytest.approx(4 / 2.0)
    assert m["stability.steps_within_25pct"] == pytest.approx(3 / 4)  # 100 ms is outside 10.5 +- 25%
    assert m["stability.requests_clean"] == pytest.approx(2 / 3)


def test_summaries_and_time_weighting():
    s = summarize("x", [1, 2, 3, 4], 10)
    assert s["x.mean"] == 25 and s["x.p50"] == 25 and s["x.n"] == 4
    assert np.isnan(summarize("y", [])["y.mean"])
    # 0.0 held for 1 s, 1.0 held for 3 s
    assert time_weighted_mean([0.0, 1.0], [0.0, 1.0], 4.0) == pytest.approx(0.75)


class FakeMem:
    kind = "pooled"

    def __init__(self):
        self.alloc_calls_last_step = 0
        self.st = MemoryStats(reserved_bytes=1000, live_bytes=0, n_cells=100, used_cells=0, seq_tokens=0, n_kv=0,
                              free_cells=100, largest_free_run=100, n_seqs=0, alloc_calls=2, alloc_calls_last_step=0)

    def stats(self):
        return self.st

    def memory_breakdown(self):
        return {"k.device": 500, "v.device": 500}

    def usage(self):
        return self.st.live_bytes, self.st.reserved_bytes

    def reset_peak(self):
        pass

    def parts(self):  # a KV memory: it is its own KV part (engine/memory/base.py Memory.parts)
        return self, None


def test_fragmentation_from_allocator_state():
    clk, mem = Clock(), FakeMem()
    tr = FragmentationTracker(mem, torch.device("cpu"), clock=clk, sample_interval_ms=0)
    with tr:  # sample at t=0: live 0
        clk.t += 1.0
        mem.st.live_bytes, mem.st.used_cells, mem.st.free_cells, mem.st.largest_free_run, mem.st.n_kv = 750, 75, 25, 5, 90
        tr.on_step(_step(0.01))  # sample at t=1: waste 0.25, external 1 - 5/25, holes 90/75
        clk.t += 3.0
    m = tr.metrics()
    # waste 1.0 for 1 s, then 0.25 for 3 s (the closing sample at t=4 holds for 0 s)
    assert m["fragmentation.kv_waste.time_weighted"] == pytest.approx((1.0 * 1 + 0.25 * 3) / 4)
    assert m["fragmentation.kv_waste.at_peak"] == pytest.approx(0.25)
    assert m["fragmentation.external.max"] == pytest.approx(0.8)
    assert m["fragmentation.attended_hole_ratio.mean"] == pytest.approx(1.2)


def test_peak_rss_is_reset_and_sees_a_spike():
    mem = FakeMem()
    with MemoryTracker(mem, 123, torch.device("cpu"), sample_interval_ms=1e9) as tr:
        spike = np.ones(200 * 2**20 // 8)  # 200 MiB, touched, freed before the end
        del spike
    m = tr.metrics()
    if m["memory.peak_rss_source"] == "vmhwm":
        assert m["memory.peak_rss_bytes"] >= m["memory.rss_start_bytes"] + 190 * 2**20
    assert m["memory.weights_bytes"] == 123 and m["memory.breakdown.k.device"] == 500


def test_allocator_view_is_a_fraction():
    f = allocator_fragmentation(torch.device("cpu"))
    assert np.isnan(f) or 0.0 <= f <= 1.0


def test_outcome_of_a_run_from_its_requests():
    from types import SimpleNamespace as R

    from harness.run import outcome

    done, bad = R(status="done", error=""), R(status="failed", error="prompt of 70 tokens > cache.size 64")
    assert outcome([done, done]) == ("ok", "")
    status, reason = outcome([done, bad])
    assert status == "degraded" and reason.startswith("1 of 2 requests failed: prompt of 70")
    assert outcome([bad, bad])[0] == "failed"


def test_normalised_times_divide_by_the_probe_unit():
    from harness.noise import normalized

    m = {"noise.unit_us": 1000.0, "latency.decode_step_ms.min": 2.0, "latency.tpot_ms.p50": float("nan")}
    out = normalized(m)
    assert out["norm.decode_step.min"] == 2.0 and out["norm.tpot.p50"] != out["norm.tpot.p50"]  # NaN stays NaN
    assert normalized({"latency.decode_step_ms.min": 2.0}) == {}  # no probe, no normalised times


@pytest.mark.parametrize("model", ["llama-tiny", "granite-hybrid-tiny"])
def test_live_peaks_include_the_step_that_frees_its_sequences(load, model):
    """The last step of a request stores its last fed token and then frees the sequence; the tracker sees the
    step after it returns, so the scheduler hands over what was live before the frees. Two requests finishing
    in the same step: the KV peak is both sequences at prompt + output - 1 tokens, the state peak two states."""
    from engine.loader import create_engine, create_memory
    from engine.runtime.scheduler import Request, Scheduler

    lm = load(model)
    mem = create_memory(lm, allocator="pooled", size=64, n_seq_max=2)
    sched = Scheduler(create_engine(lm, mem), 2)
    for i in range(2):
        sched.submit(Request(i, [5 + i] * 10, 5))
    with MemoryTracker(mem, 0, torch.device("cpu"), sample_interval_ms=1e9) as tr:
        while (info := sched.step()) is not None:
            tr.step(info, 0.0)
    m = tr.metrics()
    assert m["memory.kv_live_peak_bytes"] == 2 * (10 + 5 - 1) * mem.bytes_per_token
    assert m["memory.state_live_peak_bytes"] == 2 * lm.config.recurrent_bytes_per_seq
    assert mem.usage()[0] == 0  # and everything was freed
