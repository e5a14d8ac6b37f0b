"""KV allocators: naive (per-sequence growth), pooled (llama.cpp cells), paged (vLLM blocks)."""

from __future__ import annotations

import torch

from engine.alloc.naive import NaiveKV
from engine.alloc.paged import PagedKV
from engine.alloc.pooled import PooledKV
from engine.memory.kv_cache import CacheSpec, KVCache
from engine.model.config import ModelConfig
from engine.model.layers import Rope

KV_ALLOCATORS: dict[str, type[KVCache]] = {"naive": NaiveKV, "pooled": PooledKV, "paged": PagedKV}


def create_kv_cache(cfg: ModelConfig, spec: CacheSpec, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, rope: Rope | None = None,
                    layers: list[int] | None = None) -> KVCache:
    spec = spec.resolve(cfg)
    return KV_ALLOCATORS[spec.allocator](cfg, spec, device, dtype, rope, layers)
