"""Make damaged or altered GGUF files from a good one, for bad-input tests."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter


def rewrite(src: Path, dst: Path, drop_keys=(), set_keys: dict | None = None, arch: str | None = None,
            tensors: dict | None = None) -> Path:
    """Copy src to dst through GGUFWriter, dropping/overriding keys and replacing tensors.

    tensors: name -> (array, raw_dtype or None); None drops the tensor.
    """
    r = GGUFReader(src)
    arch = arch or str(r.fields["general.architecture"].contents())
    w = GGUFWriter(dst, arch)
    set_keys = dict(set_keys or {})
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_keys or key in set_keys:
            continue
        vtype = f.types[0]
        if vtype == GGUFValueType.ARRAY:
            w.add_array(key, f.contents())
        else:
            w.add_key_value(key, f.contents(), vtype)
    for key, (val, vtype) in set_keys.items():
        w.add_key_value(key, val, vtype)
    tensors = dict(tensors or {})
    for t in r.tensors:
        if t.name in tensors:
            rep = tensors.pop(t.name)
            if rep is None:
                continue
            arr, qtype = rep
            w.add_tensor(t.name, arr, raw_dtype=qtype)
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    for name, (arr, qtype) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def patch(src: Path, dst: Path, offset: int, fmt: str, value) -> Path:
    """Copy src to dst with one little-endian struct value overwritten at offset."""
    b = bytearray(src.read_bytes())
    struct.pack_into("<" + fmt, b, offset, value)
    dst.write_bytes(bytes(b))
    return dst


def key_value_offset(src: Path, key: str) -> int:
    """Byte offset of a metadata key's value (after its name and type)."""
    f = GGUFReader(src).fields[key]
    return f.offset + 8 + len(key.encode()) + 4


def tensor_info_offset(src: Path, name: str) -> tuple[int, int]:
    """(offset of the tensor's type field, its number of dims) in the tensor info section."""
    r = GGUFReader(src)
    t = next(t for t in r.tensors if t.name == name)
    n_dims = len(t.shape)
    return t.field.offset + 8 + len(name.encode()) + 4 + 8 * n_dims, n_dims


def random_block_bytes(qtype: GGMLQuantizationType, rows: int, row_len: int, seed: int = 0) -> np.ndarray:
    """Valid-looking block data: every byte < 0x78, so no fp16/bf16/fp8 scale is Inf or NaN."""
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    return rng.integers(0, 0x78, size=(rows, row_len // block * size), dtype=np.uint8)
