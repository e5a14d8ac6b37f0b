"""Benchmarks: pytest-benchmark timings plus a tokens/s summary printed at the end of the run."""

from __future__ import annotations

import os

import pytest
import torch

# name -> {"prefill": median seconds, "prefill+decode": median seconds, "n_prompt": int, "n_decode": int}
GENERATE_RESULTS: dict[str, dict] = {}

# (allocator, parallel) -> (decode step ms p50, p90, storage allocations per decode step)
ALLOC_RESULTS: dict[tuple[str, int], tuple[float, float, float]] = {}

# (model, allocator, parallel) -> decode tokens/s
RECURRENT_RESULTS: dict[tuple[str, str, int], float] = {}

# model -> {"loop": prefill tokens/s, "native": prefill tokens/s, "speedup": median of per-round ratios}
SCAN_RESULTS: dict[str, dict] = {}

# trackers on vs off: step ms and relative overhead
OVERHEAD_RESULTS: dict[str, float] = {}

# file -> speeds, peak RSS and ratios of kvbench vs llama.cpp and HF (test_engine_vs_llamacpp.py)
LLAMACPP_RESULTS: dict[str, dict] = {}

BENCH_THREADS = int(os.environ.get("KVBENCH_BENCH_THREADS", "2"))


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(BENCH_THREADS)


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    if ALLOC_RESULTS:
        tr.section("decode step with churn (ms p50 / p90, KV storage allocations per decode step)")
        for (alloc, par), (p50, p90, al) in sorted(ALLOC_RESULTS.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            tr.write_line(f"parallel {par:<2} {alloc:<7} {p50:7.3f} / {p90:7.3f} ms   {al:5.1f} allocs/step")
    if RECURRENT_RESULTS:
        tr.section("recurrent / hybrid decode tokens/s (last round)")
        for (m, a, p), tps in sorted(RECURRENT_RESULTS.items()):
            tr.write_line(f"{m:<12} {a:<7} parallel {p:<2} {tps:8.1f} t/s")
    if SCAN_RESULTS:
        tr.section("recurrent prefill, 512 tokens: the scan as a Python loop vs its replacement (tokens/s, interleaved)")
        for m, r in SCAN_RESULTS.items():
            tr.write_line(f"{m:<20} loop {r['loop']:8.1f} t/s   native/chunked {r['native']:8.1f} t/s   "
                          f"speed-up {r['speedup']:.2f}x")
    if OVERHEAD_RESULTS:
        r = OVERHEAD_RESULTS
        tr.section("tracker overhead (medians; overhead = median of paired on/off ratios)")
        tr.write_line(f"decode step : off {r['step_ms_off']:.3f} ms  on {r['step_ms_on']:.3f} ms  "
                      f"overhead {100 * r['step_overhead']:+.2f}%  (gate: < 2%)")
        tr.write_line(f"loop / step : off {r['loop_ms_off']:.3f} ms  on {r['loop_ms_on']:.3f} ms  "
                      f"overhead {100 * r['loop_overhead']:+.2f}%")
    if LLAMACPP_RESULTS:
        tr.section("kvbench (fast / exact) vs llama.cpp and HF: medians of interleaved rounds, t/s and peak RSS MiB")
        for name, r in LLAMACPP_RESULTS.items():
            pp, tg, rss = r["prefill_tps"], r["decode_tps"], r["peak_rss_mib"]
            tr.write_line(f"{name}  ({r['file_mib']:.0f} MiB; held as {r['weights']})")
            for k in pp:
                tr.write_line(f"  {k:<10} prefill {pp[k]:8.1f}   decode {tg[k]:7.1f}")
            for key, v in r.items():  # decode after the long prompt
                if key.startswith("decode_tps_at_"):
                    tr.write_line(f"  decode at {key.rsplit('_', 1)[1]} cells: " + "   ".join(f"{k} {x:.1f}" for k, x in v.items()))
            tr.write_line("  peak RSS  " + "   ".join(f"{k} {v:.0f}" for k, v in rss.items()))
            for key in ("fast_vs_llamacpp", "fast_vs_hf"):
                if key in r:
                    tr.write_line(f"  {key:<17} " + "   ".join(f"{k} {v:.2f}x" for k, v in r[key].items()))
            if "rounds_vs_llamacpp" in r:  # the per-round ratios' range, beside their median above
                tr.write_line("  rounds vs llama.cpp " + "   ".join(f"{k} {lo:.2f}-{hi:.2f}x"
                                                                  for k, (lo, hi) in r["rounds_vs_llamacpp"].items()))
    if not GENERATE_RESULTS:
        return
    tr.section("generate tokens/s (medians; decode = n_decode / (t[prefill+decode] - t[prefill]))")
    for name, r in GENERATE_RESULTS.items():
        if "prefill" in r and "prefill+decode" in r:
            pre = r["n_prompt"] / r["prefill"]
            dec = r["n_decode"] / (r["prefill+decode"] - r["prefill"])
            tr.write_line(f"{name:<12} prefill {pre:8.1f} t/s   decode {dec:7.2f} t/s")
