"""The one map from an architecture's model family (engine.gguf.keymap.ArchSpec.model) to its class."""

from __future__ import annotations

from engine.config import ModelConfig
from engine.gguf.keymap import ARCHS
from engine.model.hybrid import HybridLM
from engine.model.llama import Transformer
from engine.model.rwkv7 import RWKV7LM

FAMILIES: dict[str, type[Transformer]] = {"transformer": Transformer, "hybrid": HybridLM, "rwkv7": RWKV7LM}


def model_class(cfg: ModelConfig) -> type[Transformer]:
    return FAMILIES[ARCHS[cfg.arch].model]
