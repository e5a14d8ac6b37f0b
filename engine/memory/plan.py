"""What a run will allocate, computed from shapes before anything is allocated, and checked against
what the machine has.

``cache.size=1000000000000`` used to start a run that died inside torch with a MemoryError for a
7 TiB array, and ``cache.size=100000000`` grew the process to 25 GB before failing. The plan turns
both into one line before the first byte: the weights in the dtype they are loaded to, the KV cache
at ``cache.size`` (every allocator reserves up to that many cells; naive growth briefly holds a
layer twice, and doubling up to twice what it holds), the recurrent state of every sequence slot,
and the transient buffers of one ubatch (hidden states, the attention scores over the cells a
pooled memory can span, logits). It is an estimate of the largest simultaneous need, from shapes
alone, within tens of percent; it does not include the Python / torch runtime itself (a few
hundred MB), which is already resident when the check runs.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import torch

from engine.config import ModelConfig
from engine.errors import ConfigError
from engine.memory.codecs import get_codec
from engine.memory.kv_cache import CacheSpec
from engine.memory.tiers import default_disk_dir, tier_of_layer

GIB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    weights: int  # parameters in the loaded dtype (0 when they are already resident)
    kv: int  # KV cache on the device and host tiers
    kv_disk: int  # KV cache on the disk tier (file-backed: counts against free disk space)
    state: int  # recurrent state of every sequence slot
    activations: int  # one ubatch's transient buffers

    @property
    def ram(self) -> int:
        return self.weights + self.kv + self.state + self.activations

    def describe(self) -> str:
        parts = [("weights", self.weights), ("KV cache", self.kv), ("recurrent state", self.state),
                 ("activations", self.activations)]
        return ", ".join(f"{name} {b / GIB:.3g} GiB" for name, b in parts if b)


def plan(cfg: ModelConfig, spec: CacheSpec, n_ubatch: int = 512, weight_bytes: int = 0,
         compute_bytes: int = 4) -> MemoryPlan:
    """The plan of a run of ``cfg`` with memory ``spec`` (resolved or not) and ubatches of ``n_ubatch``."""
    size = spec.size or cfg.n_ctx_train
    kv = kv_disk = 0
    if cfg.attn_layers:
        ck, cv = get_codec(spec.type_k), get_codec(spec.type_v)
        per_layer = size * (ck.row_bytes(cfg.n_embd_k_gqa) + cv.row_bytes(cfg.n_embd_v_gqa))
        for il in cfg.attn_layers:
            if tier_of_layer(il, spec.offload, spec.offload_layers) == "disk":
                kv_disk += per_layer
            else:
                kv += per_layer
        if spec.allocator == "naive":  # growth: cat holds one layer twice for an instant; doubling overshoots 2x
            extra = (kv + kv_disk) if spec.growth == "double" else per_layer
            kv += extra
    state = (spec.n_seq_max + 1) * cfg.recurrent_bytes_per_seq if cfg.ssm_layers else 0
    # transient, for one ubatch of t tokens on one layer at a time: hidden states and the FFN's, logits, and the
    # attention over the cells a pooled memory can span (all of them in the worst case, never more than the
    # slots' contexts): K and V read in the compute dtype (a dequantized copy for a quantized or f16 cache)
    # twice over while the next layer's are made, and the mask, t x n_kv bools that SDPA turns into floats.
    # No t x n_kv x heads scores: torch's CPU attention is a tiled flash kernel (measured on llama-small,
    # f16 K/V, pooled, ubatch 512: 6.5 KiB more peak RSS per cell of n_kv, against 4 + 2.5 here).
    t = max(1, n_ubatch)
    n_kv = min(size, spec.n_seq_max * cfg.n_ctx_train)
    hidden = t * (8 * cfg.n_embd + 3 * max(cfg.n_ff, 0)) * compute_bytes
    kv_read = 2 * n_kv * (cfg.n_embd_k_gqa + cfg.n_embd_v_gqa) * compute_bytes if cfg.attn_layers else 0
    mask = t * n_kv * (1 + compute_bytes) if cfg.attn_layers else 0
    logits = t * cfg.n_vocab * 4
    return MemoryPlan(weight_bytes, kv, kv_disk, state, hidden + kv_read + mask + logits)


def available(device: torch.device) -> int:
    """Bytes the device can still give: free CUDA memory, or the OS's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def check(p: MemoryPlan, device: torch.device, spec: CacheSpec, override: str = "memory_check=false") -> None:
    """ConfigError with the numbers when the plan does not fit what the machine has now."""
    have = available(device)
    where = "GPU memory" if device.type == "cuda" else "RAM"
    if p.ram > have:
        raise ConfigError(f"cache.size = {spec.size}: this run needs about {p.ram / GIB:.3g} GiB ({p.describe()}) "
                          f"and the machine has {have / GIB:.3g} GiB of {where} available; lower cache.size, "
                          f"parallel or ubatch, or set {override} to try anyway")
    if p.kv_disk:
        d = default_disk_dir()
        free = shutil.disk_usage(d).free
        if p.kv_disk > free:
            raise ConfigError(f"cache.size = {spec.size}: the disk tier needs {p.kv_disk / GIB:.3g} GiB in {d} and "
                              f"{free / GIB:.3g} GiB are free; lower cache.size, keep more layers on the device "
                              f"(cache.offload_layers), set KVBENCH_OFFLOAD_DIR, or set {override}")
