"""Prefill tokens/s of the recurrent presets at 512 tokens: the scan as the Python loop over tokens (before)
and as what replaced it (after: Mamba-1's and RWKV-7's native ops, Mamba-2's chunked scan), interleaved round
by round.

Run:  pytest tests/bench/test_scan_speed.py --benchmark-only -s
One 512-token prompt, one ubatch, a fresh memory each time; the time is the whole prefill (every layer, not the
scan alone), so the speed-up is what a user sees.
"""

from __future__ import annotations

import statistics
import time

import pytest

from engine.loader import create_engine, create_memory, load_model
from engine.model.mamba import MambaMixer
from engine.model.mamba2 import Mamba2Mixer
from engine.model.rwkv7 import TimeMix
from tests.bench.conftest import SCAN_RESULTS

N_PROMPT, ROUNDS = 512, 5


# the switch between the loop and its replacement, per mixer
SWITCH = {"mamba-tiny": (MambaMixer, "native_scan"), "hybrid-tiny": (MambaMixer, "native_scan"),
          "granite-hybrid-tiny": (Mamba2Mixer, "chunked"), "rwkv7-tiny": (TimeMix, "native")}


@pytest.mark.parametrize("model", list(SWITCH))
def test_prefill_scan_loop_vs_native(benchmark, model, monkeypatch):
    lm = load_model(model)
    prompt = [(7 * i) % (lm.config.n_vocab - 3) + 3 for i in range(N_PROMPT)]

    def prefill(native: bool) -> float:
        monkeypatch.setattr(*SWITCH[model], native)
        eng = create_engine(lm, create_memory(lm, size=N_PROMPT + 16), n_ubatch=N_PROMPT)
        t = time.perf_counter()
        eng.prefill({0: prompt})
        return time.perf_counter() - t

    prefill(True), prefill(False)  # warm-up
    times = {True: [], False: []}
    for _ in range(ROUNDS):
        for native in (False, True):
            times[native].append(prefill(native))
    ratio = statistics.median(a / b for a, b in zip(times[False], times[True]))
    SCAN_RESULTS[model] = {"loop": N_PROMPT / statistics.median(times[False]),
                           "native": N_PROMPT / statistics.median(times[True]), "speedup": ratio}
    benchmark.group = "recurrent prefill 512"
    benchmark.extra_info |= SCAN_RESULTS[model]
    benchmark.pedantic(lambda: prefill(True), rounds=3, iterations=1)
    assert ratio > 1.0  # the native scan must not be slower than the loop it replaces
