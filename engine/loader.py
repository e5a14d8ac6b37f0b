"""The engine's public factory: a model name or path in, a ready model, memory and engine out.

The harness and the CLI build everything through here, so a sweep point and a
``kvbench generate`` run construct exactly the same objects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from engine import alloc, kernels
from engine.config import ModelConfig
from engine.errors import ConfigError, DeviceError
from engine.gguf import presets
from engine.gguf.reader import GGUFFile, open_gguf
from engine.memory.base import Memory
from engine.memory.kv_cache import CacheSpec
from engine.model.families import model_class
from engine.model.llama import Transformer
from engine.model.memory_only import MemoryOnlyModel
from engine.model.weights import CatWeight, Weight, check_compute
from engine.runtime.engine import Engine
from engine.tokenizer import GGUFTokenizer

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# Who runs a sweep point: kvbench's own engine over its allocators, or llama.cpp (engine/llamacpp).
BACKENDS = ("torch", "llamacpp")


def resolve_device(device: str) -> torch.device:
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {device!r}: CUDA is not available to this torch ({torch.__version__}); "
                "install a CUDA build of torch or use --device cpu"
            )
        return torch.device(device)
    raise ConfigError(f"device {device!r}: expected cpu or cuda[:N]")


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A preset name (built into the cache on first use) or a path to a .gguf file."""
    name = str(model)
    if name in presets.MODEL_NAMES:
        return presets.ensure_model(name)
    path = Path(name).expanduser()
    if not path.exists():
        raise ConfigError(
            f"model {name!r}: no such file and not a preset; presets: {', '.join(presets.MODEL_NAMES)}"
        )
    return path


@dataclass
class LoadedModel:
    path: Path
    file: GGUFFile
    config: ModelConfig
    model: Transformer
    device: torch.device
    dtype: torch.dtype  # activations and the KV cache's float type
    compute: str = "exact"  # engine/model/weights.py: exact (float32 everywhere) or fast (packed weights)

    @cached_property
    def tokenizer(self) -> GGUFTokenizer:
        return GGUFTokenizer(self.file.tokenizer_metadata(), str(self.path))

    @property
    def kernels(self) -> str:
        """Which matmul kernels run: engine.kernels.backend() ('native-avx512', 'native-avx2', ...), 'torch'
        (its fallback), or 'aten' (exact mode, GPUs: torch's own GEMMs only)."""
        return kernels.backend() if self.compute == "fast" and self.device.type == "cpu" else "aten"

    @property
    def memory_only(self) -> bool:
        return isinstance(self.model, MemoryOnlyModel)

    def weight_bytes(self) -> int:
        """Bytes of the weights as held (packed blocks in fast mode; exact on the meta device too:
        counted from shapes). A tied matrix counts once."""
        seen, total = set(), 0
        for t in self.model.state_dict(keep_vars=True).values():
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    def weight_types(self) -> dict[str, int]:
        """Bytes held per storage type ("Q4_0", "F32" ...), matrices only."""
        out: dict[str, int] = {}
        for m in {id(m): m for m in self.model.modules() if isinstance(m, Weight) and not isinstance(m, CatWeight)}.values():
            out[m.ggml_type] = out.get(m.ggml_type, 0) + m.nbytes
        return out


def load_model(model: str | os.PathLike, device: str = "cpu", dtype: str = "f32", mmap: bool = False,
               memory_only: bool = False, allow_memory_only: bool = False, compute: str = "exact") -> LoadedModel:
    """Load a model. ``memory_only`` builds the real shapes on the meta device: exact byte
    accounting, no weights, no arithmetic. With ``allow_memory_only`` a shape-only file (such as
    the llama-7b preset) loads that way; without it, it is an error (generation needs weights).

    ``compute="exact"`` dequantizes every weight to ``dtype``; ``compute="fast"`` keeps matrices in
    the file's format (engine/model/weights.py) with float32 activations -- on a GPU, where the
    packed kernels do not run, matrices are dequantized to bf16 instead. ``dtype`` is exact mode's
    (and memory-only runs') knob."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    check_compute(compute)
    path = resolve_model_path(model)
    f = open_gguf(path)
    cfg = f.config()
    if memory_only or (allow_memory_only and not cfg.weights_present):
        f.check_tensors(cfg)
        return LoadedModel(path, f, cfg, MemoryOnlyModel(cfg, DTYPES[dtype]), torch.device("meta"), DTYPES[dtype])
    if compute == "fast" and dtype != "f32":
        raise ConfigError(f"dtype {dtype!r} applies to compute=exact; compute=fast keeps the file's weight "
                          "types and computes in float32/bf16 (drop --dtype, or use --compute exact)")
    dev = resolve_device(device)
    if compute == "fast" and dev.type != "cpu":
        weights = f.load_weights(cfg, torch.bfloat16, mmap=mmap)
        weights = {k: (v if v.dim() == 2 else v.float()) for k, v in weights.items()}  # only matrices in bf16
    else:
        weights = f.load_weights(cfg, DTYPES[dtype], mmap=mmap, compute=compute)
    model_cls = model_class(cfg)
    net = model_cls.from_weights(cfg, weights, dev, fuse_copy=not mmap, compute=compute)
    return LoadedModel(path, f, cfg, net, dev, DTYPES[dtype], compute)


def create_memory(lm: LoadedModel, spec: CacheSpec | None = None, **overrides):
    """The model's memory: ``spec`` fields (allocator, size, block_size, type_k, type_v, offload,
    offload_layers, n_seq_max, growth) or keyword overrides of the defaults.

    Attention-only models get a KV cache; Mamba a recurrent memory; hybrids (Jamba) both, the KV
    cache over the attention layers only (engine/alloc's factory)."""
    return alloc.create_memory(lm.config, spec, lm.device, lm.dtype, lm.model.rope, **overrides)


def create_engine(lm: LoadedModel, memory: Memory, n_ubatch: int = 512) -> Engine:
    return Engine(lm.model, memory, n_ubatch)
