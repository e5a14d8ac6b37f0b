"""KV cache element types (llama.cpp's -ctk / -ctv): f32, f16, bf16, q8_0, q4_0.

Sizes come from ggml's block layouts via ``gguf.GGML_QUANT_SIZES`` (q8_0: 32 int8 + fp16
scale = 34 bytes per 32 values; q4_0: 16 bytes of nibbles + fp16 scale = 18 bytes).
"""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

CACHE_TYPES: dict[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0,
}


def bytes_per_value(cache_type: str) -> float:
    block, size = GGML_QUANT_SIZES[CACHE_TYPES[cache_type]]
    return size / block
