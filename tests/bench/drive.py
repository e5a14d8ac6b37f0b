"""The scheduler loop the decode benchmarks share: run requests to the end, keep the decode steps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.loader import create_engine, create_memory
from engine.runtime.scheduler import Request, Scheduler


@dataclass
class DecodeStep:
    n_decode: int  # sequences decoded in the step
    seconds: float  # device synchronized around the step
    alloc_calls: int  # KV storage allocations the step made


def random_requests(n: int, prompt: tuple[int, int], output: tuple[int, int], seed: int) -> list[Request]:
    """n requests, BOS + uniform[prompt) random tokens, uniform[output) tokens to generate."""
    g = np.random.default_rng(seed)
    return [Request(i, [1] + g.integers(3, 1000, int(g.integers(*prompt))).tolist(), int(g.integers(*output)))
            for i in range(n)]


def decode_steps(lm, allocator: str, parallel: int, requests: list[Request], size: int = 1024, **memory) -> list[DecodeStep]:
    """Run ``requests`` through a fresh memory and scheduler; the steps with decode tokens and no prefill."""
    mem = create_memory(lm, allocator=allocator, size=size, n_seq_max=parallel, **memory)
    eng = create_engine(lm, mem)
    eng.warmup()
    sched = Scheduler(eng, parallel)
    for r in requests:
        sched.submit(r)
    steps = []
    while (info := sched.step()) is not None:
        if info.is_decode:
            steps.append(DecodeStep(info.n_decode, info.seconds, mem.alloc_calls_last_step))
    assert all(r.status == "done" for r in sched.results.values())
    return steps
