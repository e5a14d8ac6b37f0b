"""Write real GGUF files the way llama.cpp's converter would, from HF-layout weights.

Presets and tests start from a checkpoint in HF's layout (``model.layers.N.self_attn.q_proj``,
rotate-half RoPE) and convert it here with convert_hf_to_gguf.py's rules: llama.cpp tensor
names, Q/K rows permuted for llama's interleaved ("NORM") RoPE, llama-3 rope scaling as a
``rope_freqs`` tensor. The same HF-layout weights can then be loaded into HF transformers,
which is what makes the logit-parity tests independent of this engine.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    RopeScalingType,
)
from gguf import quants as gguf_quants

from engine.atomic import atomic_path
from engine.errors import ConfigError
from engine.gguf.keymap import TIED_KEY
from engine.gguf.shapes import ModelShape
from engine.gguf.vocab import Vocab
from engine.gguf.writer_attention import (
    add_attention_metadata,
    hf_to_gguf_attention,
    random_hf_weights_attention,
)
from engine.gguf.writer_granite import (
    add_granite_metadata,
    hf_to_gguf_granite,
    random_hf_weights_granite,
)
from engine.gguf.writer_hybrid import (
    add_hybrid_metadata,
    hf_to_gguf_hybrid,
    random_hf_weights_hybrid,
)
from engine.gguf.writer_rwkv7 import (
    add_rwkv7_metadata,
    hf_to_gguf_rwkv7,
    random_hf_weights_rwkv7,
)

FILE_TYPES = {
    "f32": (LlamaFileType.ALL_F32, GGMLQuantizationType.F32),
    "f16": (LlamaFileType.MOSTLY_F16, GGMLQuantizationType.F16),
    "bf16": (LlamaFileType.MOSTLY_BF16, GGMLQuantizationType.BF16),
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, GGMLQuantizationType.Q8_0),
    "q4_0": (LlamaFileType.MOSTLY_Q4_0, GGMLQuantizationType.Q4_0),
    "q4_1": (LlamaFileType.MOSTLY_Q4_1, GGMLQuantizationType.Q4_1),
    "q5_0": (LlamaFileType.MOSTLY_Q5_0, GGMLQuantizationType.Q5_0),
    "q5_1": (LlamaFileType.MOSTLY_Q5_1, GGMLQuantizationType.Q5_1),
}


@dataclass(frozen=True)
class ArchWriter:
    """How one family of architectures is written: random HF weights, HF -> GGUF tensors, metadata."""

    random_weights: Callable[[ModelShape, int], dict[str, np.ndarray]]
    to_gguf: Callable[[ModelShape, dict[str, np.ndarray]], dict[str, np.ndarray]]
    add_metadata: Callable[[GGUFWriter, ModelShape], None]


_ATTENTION = ArchWriter(random_hf_weights_attention, hf_to_gguf_attention, add_attention_metadata)
_HYBRID = ArchWriter(random_hf_weights_hybrid, hf_to_gguf_hybrid, add_hybrid_metadata)
_GRANITE = ArchWriter(random_hf_weights_granite, hf_to_gguf_granite, add_granite_metadata)
_RWKV7 = ArchWriter(random_hf_weights_rwkv7, hf_to_gguf_rwkv7, add_rwkv7_metadata)
WRITERS: dict[str, ArchWriter] = {"llama": _ATTENTION, "qwen2": _ATTENTION, "mamba": _HYBRID, "jamba": _HYBRID,
                                  "granitehybrid": _GRANITE, "rwkv7": _RWKV7}


def writer_for(shape: ModelShape) -> ArchWriter:
    if shape.arch not in WRITERS:
        raise ConfigError(f"model shape arch {shape.arch!r}: kvbench writes {', '.join(WRITERS)}")
    return WRITERS[shape.arch]


def random_hf_weights(shape: ModelShape, seed: int) -> dict[str, np.ndarray]:
    """HF-named float32 weights for ``shape`` (N(0, 0.02) matrices, U(0.8, 1.2) norms; see the writers)."""
    return writer_for(shape).random_weights(shape, seed)


def hf_to_gguf_tensors(shape: ModelShape, hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF names and layout -> llama.cpp names and layout (float32 arrays, torch [out, in] order)."""
    return writer_for(shape).to_gguf(shape, hf)


def write_gguf(
    path: str | os.PathLike,
    shape: ModelShape,
    tensors: dict[str, np.ndarray] | None,
    vocab: Vocab,
    name: str,
    file_type: str = "f32",
) -> Path:
    """Write a GGUF atomically (temp file + rename). ``tensors=None`` writes a shape-only file."""
    if file_type not in FILE_TYPES:
        raise ConfigError(f"file type {file_type!r}: expected one of {', '.join(FILE_TYPES)}")
    ftype, qtype = FILE_TYPES[file_type]
    path = Path(path)
    with atomic_path(path) as tmp:
        w = GGUFWriter(tmp, shape.arch)
        w.add_name(name)
        w.add_context_length(shape.n_ctx)
        w.add_embedding_length(shape.n_embd)
        w.add_block_count(shape.n_layer)
        w.add_layer_norm_rms_eps(shape.rms_eps)
        w.add_vocab_size(shape.n_vocab)
        w.add_file_type(int(ftype))
        writer_for(shape).add_metadata(w, shape)
        if shape.n_swa:
            w.add_sliding_window(shape.n_swa)
        if shape.rope_linear_factor is not None:
            w.add_rope_scaling_type(RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(shape.rope_linear_factor)
        _add_vocab(w, vocab)
        if tensors is None and shape.tied:
            w.add_bool(TIED_KEY, True)
        for tname, x in (tensors or {}).items():
            if x.ndim == 2 and qtype != GGMLQuantizationType.F32:
                # Rows that do not split into whole blocks fall back to F16, as the converter does.
                t = qtype if x.shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0 else GGMLQuantizationType.F16
                w.add_tensor(tname, gguf_quants.quantize(x, t), raw_dtype=t)
            else:
                w.add_tensor(tname, np.ascontiguousarray(x, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def _add_vocab(w: GGUFWriter, v: Vocab) -> None:
    w.add_tokenizer_model(v.model)
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.token_types)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    if v.merges is not None:
        w.add_token_merges(v.merges)
    w.add_bos_token_id(v.bos_id)
    w.add_eos_token_id(v.eos_id)
    if v.unk_id is not None:
        w.add_unk_token_id(v.unk_id)
    w.add_add_bos_token(v.add_bos)
    w.add_add_eos_token(False)
