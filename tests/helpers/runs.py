"""Drivers the tests use to run an engine or a scheduler to the end (the harness drives them step by step
with trackers; nothing in the product needs these)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from engine.errors import ConfigError
from engine.runtime.engine import synchronize
from engine.runtime.sampling import Sampler, SamplingParams
from engine.runtime.scheduler import Request, RequestResult, Scheduler


@dataclass
class GenerateResult:
    prompts: list[list[int]]
    tokens: list[list[int]]  # generated ids per sequence (the first one comes from prefill)
    n_prefill_tokens: int
    n_decode_tokens: int  # tokens fed through decode steps
    prefill_s: float
    decode_s: float
    step_s: list[float] = field(default_factory=list)  # wall time of every decode step

    @property
    def prefill_tps(self) -> float:
        return self.n_prefill_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tps(self) -> float:
        return self.n_decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def generate(
eng,
    prompts: list[list[int]],
    n_predict: int,
    sampling: SamplingParams = SamplingParams(),
    eos_id: int | None = None,
) -> GenerateResult:
    """Generate up to n_predict tokens for each prompt (sequence i = prompt i), decoded together."""
    if n_predict <= 0:
        raise ConfigError(f"n_predict must be positive (got {n_predict})")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("generate: every prompt needs at least one token")
    samplers = [Sampler(sampling, seed_offset=i) for i in range(len(prompts))]
    history = [list(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]

    synchronize(eng.device)
    t0 = time.perf_counter()
    logits = eng.prefill({s: p for s, p in enumerate(prompts)})
    synchronize(eng.device)
    prefill_s = time.perf_counter() - t0

    active = {}
    for s, row in enumerate(logits):
        tok = samplers[s](row, history[s])
        out[s].append(tok)
        history[s].append(tok)
        if len(out[s]) < n_predict and tok != eos_id:
            active[s] = tok
    n_decode, steps = 0, []
    t_dec = time.perf_counter()
    while active:
        t_step = time.perf_counter()
        logits = eng.decode_step(active)
        n_decode += len(active)
        nxt = {}
        for (s, _), row in zip(active.items(), logits):
            tok = samplers[s](row, history[s])
            out[s].append(tok)
            history[s].append(tok)
            if len(out[s]) < n_predict and tok != eos_id:
                nxt[s] = tok
        active = nxt
        synchronize(eng.device)
        steps.append(time.perf_counter() - t_step)
    decode_s = time.perf_counter() - t_dec
    return GenerateResult(
        prompts=[list(p) for p in prompts],
        tokens=out,
        n_prefill_tokens=int(np.sum([len(p) for p in prompts])),
        n_decode_tokens=n_decode,
        prefill_s=prefill_s,
        decode_s=decode_s,
        step_s=steps,
    )


def run_all(sched: Scheduler, requests: list[Request]) -> list[RequestResult]:
    """Submit every request and step the scheduler until all of them finished or failed."""
    for req in requests:
        sched.submit(req)
    while sched.step() is not None:
        pass
    return [sched.results[r.id] for r in requests]
