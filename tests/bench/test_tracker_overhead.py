"""Measurement overhead: trackers on vs off change the time per scheduler step by less than 2%.

Run:  pytest tests/bench/test_tracker_overhead.py --benchmark-only
Time per step = wall time of the whole drive loop / steps, so everything the trackers do between
steps (hooks, sampling memory stats, RSS and mallinfo) is counted. llama-tiny has the shortest
steps, hence the largest relative overhead. Rounds alternate on/off; medians are compared.
"""

from __future__ import annotations

import time

import numpy as np
from omegaconf import OmegaConf

from engine.loader import create_engine, create_memory, load_model
from engine.runtime.sampling import SamplingParams
from engine.runtime.scheduler import Scheduler
from harness.run import drive
from harness.trackers import FragmentationTracker, LatencyTracker, MemoryTracker
from harness.workload import ArrivalConf, ShareGPTWorkload
from tests.bench.conftest import OVERHEAD_RESULTS

ROUNDS = 9


class _NoProgress:
    def update(self, n):
        pass


def _one(lm, with_trackers: bool) -> tuple[float, float]:
    """(median decode step s, drive-loop wall s per step)"""
    mem = create_memory(lm, allocator="pooled", size=1024, n_seq_max=4)
    eng = create_engine(lm, mem)
    eng.warmup()
    sched = Scheduler(eng, 4, SamplingParams())
    timed = ShareGPTWorkload(n_requests=24, arrival=OmegaConf.structured(ArrivalConf())).generate(lm.config.n_vocab, 0)
    trackers = [LatencyTracker(sched), MemoryTracker(mem, lm.weight_bytes(), lm.device),
                FragmentationTracker(mem, lm.device)] if with_trackers else []
    steps: list = []
    counter = type("C", (), {"on_step": lambda self, info: steps.append(info)})()
    t0 = time.perf_counter()
    for t in trackers:
        t.__enter__()
    drive(sched, timed, trackers + [counter], _NoProgress())
    for t in trackers:
        t.__exit__(None, None, None)
    loop = (time.perf_counter() - t0) / len(steps)
    decode = [i.seconds for i in steps if i.is_decode]
    return float(np.median(decode)), loop


def test_tracker_overhead(benchmark):
    lm = load_model("llama-tiny")
    on, off = [], []

    def run():
        for _ in range(ROUNDS):
            off.append(_one(lm, False))
            on.append(_one(lm, True))

    benchmark.pedantic(run, rounds=1, iterations=1)
    on_a, off_a = np.asarray(on), np.asarray(off)
    step_ratio = float(np.median(on_a[:, 0] / off_a[:, 0]))
    loop_ratio = float(np.median(on_a[:, 1] / off_a[:, 1]))
    r = dict(step_ms_off=float(np.median(off_a[:, 0])) * 1e3, step_ms_on=float(np.median(on_a[:, 0])) * 1e3,
             step_overhead=step_ratio - 1, loop_ms_off=float(np.median(off_a[:, 1])) * 1e3,
             loop_ms_on=float(np.median(on_a[:, 1])) * 1e3, loop_overhead=loop_ratio - 1)
    benchmark.extra_info.update(r)
    OVERHEAD_RESULTS.update(r)
    assert step_ratio - 1 < 0.02, f"trackers add {100 * (step_ratio - 1):.1f}% to the decode step"
