"""One sweep point: build the engine from the config, run the workload under trackers, write a record.

The run never raises for something that went wrong with the point itself: a bad value, a model
that does not load, a crash in the engine all become a failed record with the reason, so a
sweep goes on. Only an interrupt stops it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import sys
import time
import traceback
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from engine.batch import Batch
from engine.config import ModelConfig
from engine.errors import KvbenchError
from engine.gguf.reader import open_gguf
from engine.llamacpp.engine import LlamaCppEngine
from engine.loader import (
    BACKENDS,
    create_engine,
    create_memory,
    load_model,
    resolve_model_path,
)
from engine.memory.base import Memory
from engine.memory.kv_cache import CacheSpec
from engine.memory.plan import check as check_memory
from engine.memory.plan import plan as plan_memory
from engine.runtime.engine import Generator
from engine.runtime.sampling import SamplingParams
from engine.runtime.scheduler import Scheduler
from harness import faults
from harness.config import cache_spec, choice, effective_parallel, validate
from harness.env import collect_env, quiet_env
from harness.noise import normalized
from harness.records import RECORD_NAME, Record, config_hash, write_record
from harness.trackers import (
    FragmentationTracker,
    LatencyTracker,
    MemoryTracker,
    NoiseTracker,
)
from harness.trackers.quality import quality_metrics
from harness.workload import fit_cache_size

# In a memory-only run these describe the kvbench process, not the modeled one: not reported.
_NOT_MODELED = ("memory.peak_rss", "memory.rss_start", "fragmentation.allocator", "memory.cuda_")

def outcome(results) -> tuple[str, str]:
    """(status, reason) of a point from its requests: ok, degraded (some failed) or failed (all failed)."""
    failed = [r for r in results if r.status == "failed"]
    if not failed:
        return "ok", ""
    reason = f"{len(failed)} of {len(results)} requests failed: {failed[0].error}"
    return ("failed" if len(failed) == len(results) else "degraded"), reason


def point_cache_spec(cfg: DictConfig) -> CacheSpec:
    return cache_spec(cfg.allocator, cfg.cache, effective_parallel(cfg))


def quiet(cfg: DictConfig) -> bool:
    return bool(cfg.quiet) or quiet_env()


def probe_logit_error(lm, spec: CacheSpec, n_tokens: int = 128) -> dict[str, float]:
    """Logits of a fixed probe prompt with the point's cache against an f32 pooled cache."""
    if spec.type_k == "f32" and spec.type_v == "f32":
        return {"quality.logit_max_abs_err": 0.0, "quality.logit_mean_abs_err": 0.0}
    g = torch.Generator().manual_seed(1234)
    toks = [1] + torch.randint(3, lm.config.n_vocab, (n_tokens - 1,), generator=g).tolist()
    out = []
    for s in (CacheSpec(size=n_tokens), CacheSpec(size=n_tokens, type_k=spec.type_k, type_v=spec.type_v)):
        b = Batch()
        b.add_sequence(toks, 0, output="all")
        out.append(create_engine(lm, create_memory(lm, s)).decode(b))
    d = (out[1] - out[0]).abs()
    return {"quality.logit_max_abs_err": d.max().item(), "quality.logit_mean_abs_err": d.mean().item()}


@dataclass
class Built:
    """A point's engine and memory, whichever backend built them, and what the run needs to know of them."""

    engine: Generator
    memory: Memory
    config: ModelConfig
    device: torch.device
    weight_bytes: int
    memory_only: bool
    timed: list  # the workload's requests with arrival times
    metrics: dict  # measured before the run (probes, quality) and what the build decided (cache size, kernels)

    def final_metrics(self) -> dict:
        return self.engine.run_metrics()


def build_torch(cfg: DictConfig, spec: CacheSpec, workload) -> Built:
    lm = load_model(cfg.model.name, cfg.device, cfg.model.dtype, allow_memory_only=True, compute=cfg.model.compute)
    faults.slow_down(lm.model, faults.slowdown())  # test-only (KVBENCH_FAULT_INJECT=slow:k); 1 = untouched
    timed = workload.generate(lm.config.n_vocab, cfg.seed, n_ctx=lm.config.n_ctx_train)
    if workload.fit_cache:
        spec = dataclasses.replace(spec, size=fit_cache_size(timed, spec.n_seq_max, spec.block_size))
    if cfg.memory_check and not lm.memory_only:  # before the KV cache is allocated (weights are resident)
        check_memory(plan_memory(lm.config, spec, cfg.ubatch), lm.device, spec)
    metrics: dict = {"run.memory_only": lm.memory_only, "run.cache_size": spec.size, "run.kernels": lm.kernels}
    if cfg.probe_logit_error and not lm.memory_only:
        metrics |= probe_logit_error(lm, spec)
    if cfg.trackers.quality and not lm.memory_only:
        tc = cfg.trackers
        metrics |= quality_metrics(lm, spec, tc.quality_ctx, tc.quality_chunks)
    mem = create_memory(lm, spec)
    eng = create_engine(lm, mem, cfg.ubatch)
    return Built(eng, mem, lm.config, lm.device, lm.weight_bytes(), lm.memory_only, timed, metrics)


def build_llamacpp(cfg: DictConfig, spec: CacheSpec, workload) -> Built:
    """llama.cpp's engine and memory (engine/llamacpp) on the same file. n_ctx is cache.size, which llama.cpp
    rounds up (to 256 cells, per stream without kv_unified): ``run.cache_size`` is the cells it made."""
    path = resolve_model_path(cfg.model.name)
    config = open_gguf(path).config()
    timed = workload.generate(config.n_vocab, cfg.seed, n_ctx=config.n_ctx_train)
    if workload.fit_cache:
        spec = dataclasses.replace(spec, size=fit_cache_size(timed, spec.n_seq_max, spec.block_size))
    lc = cfg.llamacpp
    eng = LlamaCppEngine(path, config, n_ctx=spec.size, n_seq_max=spec.n_seq_max, type_k=spec.type_k,
                         type_v=spec.type_v, kv_unified=lc.kv_unified, swa_full=lc.swa_full, n_ubatch=cfg.ubatch,
                         n_batch=cfg.n_batch, threads=cfg.threads, mmap=lc.mmap)
    metrics = {"run.memory_only": False, "run.cache_size": eng.memory.n_cells, "run.kernels": eng.kernels,
               "run.memory_kind": eng.memory.kind, "llamacpp.n_ctx_requested": spec.size,
               "llamacpp.kv_buffer_bytes": eng.kv_buffer_bytes}
    return Built(eng, eng.memory, config, eng.device, eng.weight_bytes, False, timed, metrics)


BUILDERS = {"torch": build_torch, "llamacpp": build_llamacpp}
assert set(BUILDERS) == set(BACKENDS)


def drive(sched: Scheduler, timed, trackers, progress) -> None:
    """Submit requests at their arrival times (real time) and step until everything finished."""
    pending = deque(sorted(timed, key=lambda t: t.arrival_s))
    t0 = sched.clock()
    while pending or sched.busy:
        now = sched.clock() - t0
        while pending and pending[0].after_previous and not sched.busy:
            sched.submit(pending.popleft().request)  # closed loop: it arrives now
        while pending and not pending[0].after_previous and pending[0].arrival_s <= now:
            tr = pending.popleft()
            sched.submit(tr.request, t_submit=t0 + tr.arrival_s)
        if not sched.busy:
            time.sleep(max(0.0, pending[0].arrival_s - (sched.clock() - t0)))
            continue
        info = sched.step()
        if info is None:
            continue
        for t in trackers:
            t.on_step(info)
        if info.finished or info.failed:
            progress.update(len(info.finished) + len(info.failed))


def memory_kind(c: ModelConfig) -> dict:
    """What the model's memory is made of, for reports: the recurrent layers' kind ("" when none), the sliding
    window of its windowed attention layers (0 when none) and the share of KV bytes per token those layers hold
    (equal element types on every layer: their count over the attention layers')."""
    attn = c.attn_layers
    swa = [il for il in attn if c.swa_layers[il]] if c.n_swa else []
    return {"memory.state_kind": c.ssm_kind if c.ssm_layers else "", "memory.kv_window_tokens": c.n_swa if swa else 0,
            "memory.kv_swa_share": len(swa) / len(attn) if attn else 0.0}


def run_point(cfg: DictConfig, out_dir: Path, overrides: list[str] | None = None,
              choices: dict[str, str] | None = None) -> Record:
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    t_start = time.perf_counter()
    conf = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    rec = Record(status="failed", config=conf, overrides=list(overrides or []), started_at=started,
                 config_hash=config_hash(cfg), choices=dict(choices or {}))
    try:
        validate(cfg)
        torch.set_num_threads(cfg.threads)
        pt = BUILDERS[choice(cfg.backend)](cfg, point_cache_spec(cfg), instantiate(cfg.workload))
        eng, mem, timed, metrics = pt.engine, pt.memory, pt.timed, pt.metrics
        if cfg.warmup:
            eng.warmup()
        sched = Scheduler(eng, effective_parallel(cfg), SamplingParams(seed=cfg.seed), eos_id=None,
                          share_prefix=cfg.share_prefix, n_batch=cfg.n_batch)
        tc = cfg.trackers
        kw = dict(sample_interval_ms=tc.sample_interval_ms)
        trackers = []
        if cfg.noise.track and not pt.memory_only:  # first in, last out: its probes sit outside the others
            trackers.append(NoiseTracker(cfg.noise, **kw))
        if tc.latency and not pt.memory_only:  # a memory-only run has no timings worth reporting
            trackers.append(LatencyTracker(sched, **kw))
        if tc.memory:
            trackers.append(MemoryTracker(mem, pt.weight_bytes, pt.device, **kw))
        if tc.fragmentation:
            trackers.append(FragmentationTracker(mem, pt.device, **kw))
        with tqdm(total=len(timed), desc=f"{mem.kind} {Path(out_dir).name}", unit="req",
                  disable=quiet(cfg), file=sys.stderr, leave=False) as progress, ExitStack() as stack:
            for t in trackers:
                stack.enter_context(t)
            drive(sched, timed, trackers, progress)
        for t in trackers:
            metrics |= t.metrics()
            tl = t.timeline()
            if tl:
                rec.timeline[t.name] = tl
        res = list(sched.results.values())
        metrics |= {
            "requests.total": len(res),
            "requests.done": sum(r.status == "done" for r in res),
            "requests.failed": sum(r.status == "failed" for r in res),
            "requests.preemptions": sched.preemptions,
            "requests.shared_prefix_tokens": sum(r.shared_prefix for r in res),
            "requests.clipped": sum(t.clipped for t in pt.timed),  # trace requests shortened to the context
            "tokens.prompt": sum(len(r.prompt) for r in res),
            "tokens.generated": sum(len(r.tokens) for r in res),
            "memory.kv_bytes_per_token": mem.bytes_per_token,
            "memory.recurrent_bytes_per_seq": pt.config.recurrent_bytes_per_seq,
        } | memory_kind(pt.config) | {
        } | pt.final_metrics()
        if pt.memory_only:
            metrics = {k: v for k, v in metrics.items() if not k.startswith(_NOT_MODELED)}
            metrics["memory.model_peak_bytes"] = (metrics["memory.weights_bytes"]
                                                  + metrics["memory.kv_reserved_transient_peak_bytes"])
            clean = [r for r in res if r.status == "done" and r.preemptions == 0]
            metrics["stability.requests_clean"] = len(clean) / len(res) if res else float("nan")
        metrics |= normalized(metrics)
        rec.metrics = metrics
        rec.env = collect_env(pt.device)
        rec.status, rec.error = outcome(res)
        mem.close()
        eng.close()
    except KvbenchError as e:
        rec.error = str(e)
    except Exception as e:  # noqa: BLE001 -- the job boundary: any crash becomes a failed record, the sweep goes on
        rec.error = f"{type(e).__name__}: {e}".splitlines()[0]
        (Path(out_dir) / "error.log").write_text(traceback.format_exc())
    if not rec.env:
        rec.env = collect_env()
    rec.duration_s = time.perf_counter() - t_start
    write_record(Path(out_dir) / RECORD_NAME, rec)
    return rec
