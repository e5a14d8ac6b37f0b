"""Benchmarks: pytest-benchmark timings plus a tokens/s summary printed at the end of the run."""

from __future__ import annotations

import os

import pytest
import torch

# name -> {"prefill": median seconds, "prefill+decode": median seconds, "n_prompt": int, "n_decode": int}
GENERATE_RESULTS: dict[str, dict] = {}

BENCH_THREADS = int(os.environ.get("KVBENCH_BENCH_THREADS", "2"))


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(BENCH_THREADS)


def pytest_terminal_summary(terminalreporter):
    if not GENERATE_RESULTS:
        return
    tr = terminalreporter
    tr.section("generate tokens/s (medians; decode = n_decode / (t[prefill+decode] - t[prefill]))")
    for name, r in GENERATE_RESULTS.items():
        if "prefill" in r and "prefill+decode" in r:
            pre = r["n_prompt"] / r["prefill"]
            dec = r["n_decode"] / (r["prefill+decode"] - r["prefill"])
            tr.write_line(f"{name:<12} prefill {pre:8.1f} t/s   decode {dec:7.2f} t/s")
