"""The sweep point's configuration: dataclasses registered in Hydra's ConfigStore, validated.

``experiments/config.yaml`` builds on ``RunConfig`` (the schema), so OmegaConf rejects unknown
keys and values of the wrong type, with the key's full path. ``validate`` adds what a schema
cannot express (positive sizes, a block size that divides the cache, parallel sequences the
cache can hold...) and raises ``ConfigError`` naming the key, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from engine.alloc import ALLOCATORS
from engine.errors import ConfigError
from engine.gguf.presets import MODEL_NAMES
from engine.llamacpp.lib import CACHE_TYPES as LLAMACPP_CACHE_TYPES
from engine.loader import BACKENDS, DTYPES
from engine.memory.codecs import CACHE_TYPES
from engine.memory.kv_cache import GROWTH, CacheSpec
from engine.memory.tiers import TIER_NAMES
from engine.model.weights import COMPUTE_MODES
from harness.workload import (
    WORKLOADS,
    ArrivalProcess,
    ChurnWorkload,
    FixedWorkload,
    SharedPrefixWorkload,
    ShareGPTWorkload,
    TraceWorkload,
    read_trace_cached,
)

# The choices come from the engine's registries: a new allocator, cache type or tier needs no edit here.
Allocator = Enum("Allocator", {name: name for name in ALLOCATORS})
# torch's cache types, then the ones only llama.cpp stores (validate() tells the two apart)
ALL_CACHE_TYPES = tuple(CACHE_TYPES) + tuple(t for t in LLAMACPP_CACHE_TYPES if t not in CACHE_TYPES)
CacheType = Enum("CacheType", {name: name for name in ALL_CACHE_TYPES})
Backend = Enum("Backend", {name: name for name in BACKENDS})
Tier = Enum("Tier", {name: name for name in TIER_NAMES})
Growth = Enum("Growth", {name: name for name in GROWTH})


@dataclass
class ModelConf:
    name: str = "llama-tiny"  # preset name or path to a .gguf
    # fast: weights stay in the file's GGUF types, packed kernels (engine/model/weights.py); exact: float32
    # on dequantized weights, the parity reference
    compute: str = "fast"
    dtype: str = "f32"  # compute=exact only: weights and compute in f32 | f16 | bf16


@dataclass
class CacheConf:
    size: int = 1024  # KV cells (tokens) in total, llama.cpp's -c
    block_size: int = 16  # paged: tokens per block
    type_k: CacheType = CacheType.f32  # -ctk
    type_v: CacheType = CacheType.f32  # -ctv
    offload: Tier = Tier.device
    offload_layers: int = 0  # with host/disk: the first N layers stay on the device
    growth: Growth = Growth.cat  # naive only
    attn_rot: bool = True  # llama.cpp's Hadamard rotation of quantized K/V rows (engine/memory/kv_cache.py)
    # K and V types as one value, TYPE_K/TYPE_V: experiments/config.yaml derives type_k and type_v from it
    # unless they are set themselves, so one sweep key can walk equal types and K/V mixes alike
    kv: str = "f32/f32"


@dataclass
class LlamaCppConf:
    """backend=llamacpp only (engine/llamacpp): llama.cpp's own memory knobs."""

    kv_unified: bool = True  # one cell pool for all sequences (as pooled); false: one stream per sequence
    swa_full: bool = False  # sliding-window layers keep the full context (llama.cpp's --swa-full)
    mmap: bool = True  # weights mapped from the file (llama.cpp's default; --no-mmap reads them)


@dataclass
class TrackersConf:
    latency: bool = True
    memory: bool = True
    fragmentation: bool = True
    sample_interval_ms: float = 20.0  # timeline sampling period; peaks are tracked every step regardless
    # KL divergence and top-1 agreement of the point's K/V types against f32 KV on real text, before the run
    # (harness/trackers/quality.py): quality_chunks chunks of quality_ctx tokens of the default corpus
    quality: bool = False
    quality_ctx: int = 256
    quality_chunks: int = 2


@dataclass
class NoiseConf:
    """Noise detection (harness/noise.py, docs/metrics.md "Noise"): when a point counts as measured under
    contention. A flagged point is marked in its record and the report, never reused by a resumed sweep,
    and rerun up to ``retry_noisy`` times."""

    track: bool = True  # calibration probe before/after and /proc/stat accounting around the loop
    max_other_cpu: float = 0.2  # CPUs other processes used, on average over the measured loop
    max_steal: float = 0.05  # share of CPU time the hypervisor gave to other guests
    max_probe_slowdown: float = 1.75  # dispatch chain: slowest median over fastest repetition (quiet: < 1.1;
    # one CPU burner beside 2 threads: 2.4-2.7 on the development VM)


@dataclass
class RunConfig:
    model: ModelConf = field(default_factory=ModelConf)
    backend: Backend = Backend.torch  # torch: kvbench's engine and allocators; llamacpp: llama.cpp itself
    llamacpp: LlamaCppConf = field(default_factory=LlamaCppConf)
    allocator: Allocator = Allocator.pooled
    cache: CacheConf = field(default_factory=CacheConf)
    workload: Any = MISSING  # one of the workload group's configs
    parallel: int = 4  # sequences decoded together, llama.cpp's -np
    ubatch: int = 512  # tokens per forward pass, -ub
    n_batch: int = 2048  # tokens per scheduler step (prompt chunks + decode tokens), -b
    threads: int = 2
    device: str = "cpu"
    seed: int = 0
    warmup: bool = True
    share_prefix: bool = True
    probe_logit_error: bool = True  # logits of a probe prompt vs an f32 cache (cache-type trade-off)
    trackers: TrackersConf = field(default_factory=TrackersConf)
    quiet: bool = False
    name: str = ""  # a label for reports (named experiments set it)
    force: bool = False  # rerun points an earlier sweep already finished (default: reuse their records)
    isolate: bool = True  # run each point in a fresh process (crash-safe, clean peak RSS and malloc state)
    timeout_s: float = 0.0  # stop a point that runs longer (isolated points only); 0 = no limit
    repeats: int = 1  # runs of every point, interleaved in rounds (A B C A B C ...); see docs/metrics.md
    repeat: int = 0  # which round this run is (set by the sweep: the outermost sweep key)
    retry_noisy: int = 0  # rerun a point flagged as noisy up to this many times (--retry-noisy K)
    noise: NoiseConf = field(default_factory=NoiseConf)
    # refuse a point whose planned memory (weights, KV at cache.size, state, activations) exceeds what the
    # machine has available, before anything is allocated (engine/memory/plan.py)
    memory_check: bool = True
    resume_from: str = ""  # earlier sweep directories (comma-separated) whose clean points may be reused (--resume-from)


def kv_part(kv: str, i: int) -> str:
    """The K (0) or V (1) type of a cache.kv value such as q8_0/q4_0 (an OmegaConf resolver)."""
    parts = str(kv).split("/")
    if len(parts) != 2 or not all(p in ALL_CACHE_TYPES for p in parts):
        raise ValueError(f"cache.kv = {kv!r}: expected TYPE_K/TYPE_V with types among {', '.join(ALL_CACHE_TYPES)}, "
                         "e.g. q8_0/q4_0")
    return parts[int(i)]


def register_configs() -> None:
    OmegaConf.register_new_resolver("kv_part", kv_part, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConfig)
    for name, node in [("base_fixed", FixedWorkload), ("base_sharegpt", ShareGPTWorkload),
                       ("base_shared_prefix", SharedPrefixWorkload), ("base_churn", ChurnWorkload),
                       ("base_trace", TraceWorkload)]:
        cs.store(group="workload", name=name, node=node)


# -- validation beyond the schema ------------------------------------------------------------------
def _positive(cfg, key: str, minimum: float = 1) -> None:
    v = OmegaConf.select(cfg, key)
    if v is None or v < minimum:
        raise ConfigError(f"{key} = {v}: must be >= {minimum}")




def _unknown_keys(cfg, schema, prefix: str = "") -> list[str]:
    """Keys of cfg the schema does not have (Hydra's ``+key=value`` adds keys past the struct flag)."""
    out = []
    for k in cfg:
        if k not in schema.keys():  # not `in schema`: that is False for a key whose value is MISSING
            out.append(prefix + str(k))
        elif (k != "workload" and not OmegaConf.is_missing(schema, k) and not OmegaConf.is_missing(cfg, k)
              and isinstance(schema[k], DictConfig) and isinstance(cfg[k], DictConfig)):
            out += _unknown_keys(cfg[k], schema[k], f"{prefix}{k}.")
    return out


def _model_exists(name: str) -> None:
    """A preset name or an existing file: a typo must stop the sweep before anything runs."""
    if name in MODEL_NAMES:
        return
    p = Path(name).expanduser()
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "no such file"
        raise ConfigError(f"model.name = {name!r}: {what} and not a preset; give a .gguf file or one of "
                          f"{', '.join(MODEL_NAMES)}")


def choice(x):
    """A config choice as its name: the schema's enums (Allocator, Backend, CacheType...) or a plain value."""
    return x.value if isinstance(x, Enum) else x


def cache_spec(allocator, cache, n_seq_max: int) -> CacheSpec:
    """The one converter from the harness's cache settings (a sweep point's ``allocator`` and ``cache.*``,
    or the CLI's flags in the same names) to the engine's CacheSpec."""
    return CacheSpec(allocator=choice(allocator), size=int(cache["size"]), block_size=int(cache["block_size"]),
                     type_k=choice(cache["type_k"]), type_v=choice(cache["type_v"]), offload=choice(cache["offload"]),
                     offload_layers=int(cache["offload_layers"]), n_seq_max=int(n_seq_max), growth=choice(cache["growth"]),
                     attn_rot=bool(cache.get("attn_rot", True)))


def effective_parallel(cfg: DictConfig) -> int:
    """parallel, unless the workload fixes its own (``workload.parallel``)."""
    p = OmegaConf.select(cfg, "workload.parallel")
    return int(p) if p is not None else int(cfg.parallel)


def _check_backend(cfg: DictConfig, alloc: str) -> None:
    """What applies to which backend: kvbench's allocators, tiers and growth are torch's; a few K/V types
    only llama.cpp stores."""
    backend = choice(cfg.backend)
    types = {k: choice(cfg.cache[k]) for k in ("type_k", "type_v")}
    if backend == "torch":
        for k, t in types.items():
            if t not in CACHE_TYPES:
                raise ConfigError(f"cache.{k} = {t}: only backend=llamacpp stores it; the torch backend's types are "
                                  f"{', '.join(CACHE_TYPES)}")
        return
    if alloc != "pooled":
        raise ConfigError(f"allocator = {alloc}: allocators apply to backend=torch; llama.cpp's memory is set by "
                          "llamacpp.kv_unified (true: one cell pool, as pooled; false: one stream per sequence)")
    if choice(cfg.cache.offload) != "device":
        raise ConfigError(f"cache.offload = {choice(cfg.cache.offload)}: tiers apply to backend=torch; "
                          "llama.cpp on the CPU keeps its KV in host memory")
    if cfg.model.compute != "fast" or cfg.model.dtype != "f32":
        raise ConfigError("model.compute and model.dtype apply to backend=torch; llama.cpp computes the file's "
                          "weights its own way (leave them at their defaults)")
    if cfg.device != "cpu":
        raise ConfigError(f"device = {cfg.device}: the llamacpp backend runs on the CPU here (no GPU build)")


def validate(cfg: DictConfig) -> None:
    """Checks a schema cannot express; ConfigError naming the key. Cheap: no model is loaded."""
    unknown = _unknown_keys(cfg, OmegaConf.structured(RunConfig))
    target = OmegaConf.select(cfg, "workload._target_")
    wl = next((w for w in WORKLOADS if w._target_ == target), None)
    if wl is None:
        raise ConfigError(f"workload._target_ = {target!r}: not a kvbench workload; use workload=sharegpt|fixed|"
                          "shared_prefix|churn|trace")
    unknown += _unknown_keys(cfg.workload, OmegaConf.structured(wl), "workload.")
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}; the keys are those of harness/config.py (RunConfig)")
    for key in ("cache.size", "cache.block_size", "parallel", "ubatch", "n_batch", "threads", "repeats"):
        _positive(cfg, key)
    _positive(cfg, "workload.n_requests", 0 if wl is TraceWorkload else 1)  # a trace's 0: all its requests
    if wl is TraceWorkload:
        if OmegaConf.is_missing(cfg.workload, "path"):
            raise ConfigError("workload.path is not set: workload=trace replays a trace file; add workload.path=FILE")
        _positive(cfg, "workload.time_scale", 1e-12)
        _positive(cfg, "workload.block_tokens")
        read_trace_cached(cfg.workload.path)  # every row read before anything runs: errors name the line
    _positive(cfg, "cache.offload_layers", 0)
    for key in ("repeat", "retry_noisy", "noise.max_other_cpu", "noise.max_steal", "timeout_s"):
        _positive(cfg, key, 0)
    _positive(cfg, "noise.max_probe_slowdown", 1)
    if cfg.repeat >= cfg.repeats:
        raise ConfigError(f"repeat = {cfg.repeat}: rounds are numbered 0 .. repeats - 1 = {cfg.repeats - 1}")
    _positive(cfg, "trackers.sample_interval_ms", 0)
    alloc = Allocator(cfg.allocator).value if not isinstance(cfg.allocator, Allocator) else cfg.allocator.value
    size, bs, par = cfg.cache.size, cfg.cache.block_size, effective_parallel(cfg)
    if alloc == "paged" and size % bs:
        raise ConfigError(f"cache.block_size = {bs} does not divide cache.size = {size}")
    capacity = size // bs if alloc == "paged" else size
    unit = f"blocks of {bs}" if alloc == "paged" else "cells"
    if par > capacity:
        raise ConfigError(f"parallel = {par}: more sequences than cache.size = {size} can hold "
                          f"({capacity} {unit}); lower parallel or raise cache.size")
    _model_exists(cfg.model.name)
    _check_backend(cfg, alloc)
    if cfg.model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype = {cfg.model.dtype!r}: expected one of {', '.join(DTYPES)}")
    if cfg.model.compute not in COMPUTE_MODES:
        raise ConfigError(f"model.compute = {cfg.model.compute!r}: expected one of {', '.join(COMPUTE_MODES)}")
    if cfg.device != "cpu" and not str(cfg.device).startswith("cuda"):
        raise ConfigError(f"device = {cfg.device!r}: expected cpu or cuda[:N]")
    a = cfg.workload.arrival
    if ArrivalProcess(a.process) in (ArrivalProcess.poisson, ArrivalProcess.gamma):
        _positive(cfg, "workload.arrival.rate", 1e-9)
        if ArrivalProcess(a.process) is ArrivalProcess.gamma:
            _positive(cfg, "workload.arrival.cv", 1e-9)
    w = cfg.workload
    for key in [k for k in ("prompt_len", "output_len", "prefix_len", "suffix_len", "min_len", "n_prefixes",
                            "prompt_min", "output_min") if k in w]:
        _positive(cfg, f"workload.{key}")
    for lo, hi in (("prompt_min", "prompt_max"), ("output_min", "output_max"), ("min_len", "max_len")):
        if lo in w and w[hi] < w[lo]:
            raise ConfigError(f"workload.{hi} = {w[hi]} is below workload.{lo} = {w[lo]}")
    if "scale" in w and w.scale <= 0:
        raise ConfigError(f"workload.scale = {w.scale}: must be > 0")
