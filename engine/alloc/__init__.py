"""Allocators: the one registry of memory designs, and the one factory that builds a model's memory.

An allocator is a KV cache class and, for models with recurrent layers, the recurrent memory that
goes with it. Adding one is one file (a ``KVCache`` subclass) and one ``register`` line; the harness
reads its choices from ``ALLOCATORS``, so the new name works in sweeps, reports and plots as it is.
An allocator kept outside this package registers itself when its module is imported: name the module
in ``KVBENCH_PLUGINS`` (comma-separated), and every kvbench process, sweep points included, imports it.

``create_memory`` builds what a model needs: a KV cache (attention-only models), a recurrent memory
(Mamba), or both as a ``HybridMemory`` (Jamba), over the same allocator design.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, replace

import torch

from engine.alloc.naive import NaiveKV
from engine.alloc.paged import PagedKV
from engine.alloc.pooled import PooledKV
from engine.alloc.recurrent_naive import RecurrentNaive
from engine.alloc.recurrent_pooled import RecurrentPooled
from engine.config import ModelConfig
from engine.errors import ConfigError
from engine.memory import state
from engine.memory.base import Memory, Rotary
from engine.memory.hybrid import HybridMemory
from engine.memory.kv_cache import CacheSpec, KVCache
from engine.memory.recurrent import RecurrentMemory


@dataclass(frozen=True)
class Allocator:
    name: str
    kv: type[KVCache]
    # the recurrent memory of this design, for models with recurrent layers; None: it has none
    recurrent: type[RecurrentMemory] | None
    # a KV-only design: a model without a KV cache (pure Mamba) cannot use it (its recurrent part,
    # if any, only serves the state next to a KV cache in a hybrid)
    kv_only: bool = False
    description: str = ""


ALLOCATORS: dict[str, Allocator] = {}


def register(a: Allocator) -> Allocator:
    """Add an allocator to the registry (the one line a new allocator needs)."""
    if a.name in ALLOCATORS and ALLOCATORS[a.name] != a:
        raise ConfigError(f"allocator {a.name!r} is already registered")
    ALLOCATORS[a.name] = a
    state.WRITERS.add(a.name)  # its state files name it
    return a


register(Allocator("naive", NaiveKV, RecurrentNaive,
                   description="per-sequence tensors grown as tokens arrive (HF DynamicCache)"))
register(Allocator("pooled", PooledKV, RecurrentPooled,
                   description="llama.cpp's pre-allocated cell pool with find_slot"))
# A recurrent state is one fixed-size cell per sequence: there is nothing to page. In a hybrid, paged
# KV blocks sit next to pooled state cells, as vLLM keeps one state slot per request beside its blocks.
register(Allocator("paged", PagedKV, RecurrentPooled, kv_only=True,
                   description="vLLM's fixed-size blocks, free-block queue and block tables"))


def get(name: str) -> Allocator:
    if name not in ALLOCATORS:
        raise ConfigError(f"cache.allocator {name!r}: expected one of {', '.join(ALLOCATORS)}")
    return ALLOCATORS[name]


def create_kv_cache(cfg: ModelConfig, spec: CacheSpec, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, rope: Rotary | None = None,
                    layers: list[int] | None = None) -> KVCache:
    spec = spec.resolve(cfg)
    return get(spec.allocator).kv(cfg, spec, device, dtype, rope, layers)


def create_memory(cfg: ModelConfig, spec: CacheSpec | None = None, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, rope: Rotary | None = None, **overrides) -> Memory:
    """The memory a model needs, over one allocator design: KV cache, recurrent memory, or both."""
    spec = replace(spec or CacheSpec(), **overrides)
    a = get(spec.allocator)
    if not cfg.ssm_layers:
        return create_kv_cache(cfg, spec, device, dtype, rope)
    if a.recurrent is None or (a.kv_only and not cfg.attn_layers):
        raise ConfigError(f"allocator {a.name!r} has no recurrent memory, and {cfg.name or cfg.arch} keeps only "
                          f"recurrent state (no KV cache to allocate that way); use one of "
                          f"{', '.join(n for n, x in ALLOCATORS.items() if x.recurrent and not x.kv_only)}")
    rs = a.recurrent(cfg, spec, device, layers=cfg.ssm_layers)
    if not cfg.attn_layers:
        return rs
    return HybridMemory(create_kv_cache(cfg, spec, device, dtype, rope, layers=cfg.attn_layers), rs)


for _module in filter(None, (m.strip() for m in os.environ.get("KVBENCH_PLUGINS", "").split(","))):
    try:
        importlib.import_module(_module)  # it calls register(...)
    except ImportError as e:  # at import time nothing can catch a KvbenchError yet: say it and exit 2
        import sys

        print(f"kvbench: error: KVBENCH_PLUGINS: cannot import {_module!r} ({e}); fix the module or the variable",
              file=sys.stderr)
        raise SystemExit(2) from None
