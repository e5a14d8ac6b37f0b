"""Bounded structural check of a GGUF file, run before ``gguf.GGUFReader`` parses it.

Why this exists: ``GGUFReader`` trusts every count in the header. It walks arrays one element
at a time in Python and slices its memmap without bounds checks, so a header that declares 2**60
array items spins forever, and a truncated file fails deep inside numpy with an ``IndexError``.
This walk reads only lengths and type codes, checks each against the bytes that remain, and
raises a ``ModelFileError`` that names the file and the key or tensor -- before anything large
is allocated. It does not decode values; the reader does that afterwards.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from engine.errors import ModelFileError, UnsupportedError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32

# GGUF value type codes -> fixed byte size (None: variable, string or array).
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
# integer and double tensor types: llama.cpp stores no model weights in them
_NOT_WEIGHTS = {GGMLQuantizationType[n] for n in ("I8", "I16", "I32", "I64", "F64")
                if n in GGMLQuantizationType.__members__}


@dataclass(frozen=True)
class HeaderSummary:
    version: int
    n_tensors: int
    n_kv: int
    data_offset: int
    file_size: int


class _Cursor:
    def __init__(self, f, path: Path, size: int) -> None:
        self.f, self.path, self.size, self.pos = f, path, size, 0

    def fail(self, what: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: {what}; the file is damaged or not a GGUF model")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"truncated at byte {self.pos} while reading {what} "
                f"(needs {n} bytes, {self.size - self.pos} left)"
            )

    def read(self, n: int, what: str) -> bytes:
        self.need(n, what)
        self.f.seek(self.pos)
        b = self.f.read(n)
        self.pos += n
        return b

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.read(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.read(8, what))[0]

    def string(self, what: str, keep: bool) -> str | None:
        n = self.u64(f"length of {what}")
        if not keep:
            self.skip(n, what)
            return None
        raw = self.read(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None


def _skip_value(cur: _Cursor, vtype: int, key: str, depth: int = 0) -> None:
    if vtype in _SCALAR_SIZE:
        cur.skip(_SCALAR_SIZE[vtype], f"value of key {key!r}")
    elif vtype == _STRING:
        cur.string(f"value of key {key!r}", keep=False)
    elif vtype == _ARRAY:
        if depth > 0:
            raise cur.fail(f"key {key!r} holds a nested array, which GGUF models do not use")
        itype = cur.u32(f"item type of key {key!r}")
        count = cur.u64(f"item count of key {key!r}")
        if itype in _SCALAR_SIZE:
            cur.skip(count * _SCALAR_SIZE[itype], f"{count} items of key {key!r}")
        elif itype == _STRING:
            # Every string costs at least its 8-byte length: reject absurd counts before looping.
            cur.need(count * 8, f"{count} strings of key {key!r}")
            for i in range(count):
                cur.string(f"item {i} of key {key!r}", keep=False)
        else:
            raise cur.fail(f"key {key!r} has unknown array item type {itype}")
    else:
        raise cur.fail(f"key {key!r} has unknown value type {vtype}")


def check_header(path: str | os.PathLike) -> HeaderSummary:
    """Validate the structure of a GGUF file without trusting any count in it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file; pass a GGUF path or a preset name") from None
    except IsADirectoryError:
        raise ModelFileError(f"{path}: is a directory; pass the .gguf file inside it") from None
    except OSError as e:
        raise ModelFileError(f"{path}: cannot open ({e.strerror}); check the path and permissions") from None
    with f:
        cur = _Cursor(f, path, size)
        magic = cur.read(4, "magic")
        if magic != GGUF_MAGIC:
            raise ModelFileError(
                f"{path}: wrong magic {magic!r} (expected b'GGUF'); this is not a GGUF file -- "
                "convert the model with llama.cpp's convert_hf_to_gguf.py"
            )
        version = cur.u32("version")
        if version & 0xFFFF == 0 and version != 0:
            raise UnsupportedError(f"{path}: big-endian GGUF files are not supported; convert on a little-endian host")
        if version not in SUPPORTED_VERSIONS:
            raise UnsupportedError(
                f"{path}: GGUF version {version} is not supported (supported: 2, 3); "
                "re-convert the model with a current llama.cpp"
            )
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata key count")
        # A key needs >= 8 (length) + 4 (type) + 1 bytes; a tensor info needs >= 8 + 4 + 8 + 4 + 8.
        if n_kv * 13 > size or n_tensors * 32 > size:
            raise cur.fail(
                f"header declares {n_kv} metadata keys and {n_tensors} tensors, more than a "
                f"{size}-byte file can hold"
            )
        alignment = DEFAULT_ALIGNMENT
        for i in range(n_kv):
            key = cur.string(f"name of metadata key #{i}", keep=True)
            vtype = cur.u32(f"type of key {key!r}")
            if key == "general.alignment":
                if vtype != 4:
                    raise cur.fail("general.alignment must be a uint32")
                alignment = cur.u32("general.alignment")
                if alignment == 0 or alignment & (alignment - 1):
                    raise cur.fail(f"general.alignment = {alignment} is not a power of two")
            else:
                _skip_value(cur, vtype, key)
        infos = []
        for i in range(n_tensors):
            name = cur.string(f"name of tensor #{i}", keep=True)
            n_dims = cur.u32(f"dimension count of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
            dims = struct.unpack(f"<{n_dims}Q", cur.read(8 * n_dims, f"shape of tensor {name!r}"))
            ttype = cur.u32(f"type of tensor {name!r}")
            offset = cur.u64(f"data offset of tensor {name!r}")
            infos.append((name, dims, ttype, offset))
        data_offset = cur.pos + (-cur.pos) % alignment

        regions = []
        for name, dims, ttype, offset in infos:
            try:
                qtype = GGMLQuantizationType(ttype)
            except ValueError:
                raise UnsupportedError(
                    f"{path}: tensor {name!r} has tensor type id {ttype}, unknown to gguf "
                    f"{_gguf_version()}; upgrade the gguf package or re-quantize the model"
                ) from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_elems = 1
            for d in dims:
                if d == 0:
                    raise cur.fail(f"tensor {name!r} has a zero dimension in shape {list(dims)}")
                n_elems *= d
            if dims[0] % block:
                raise cur.fail(
                    f"tensor {name!r} ({qtype.name}) has row length {dims[0]}, "
                    f"not a multiple of its block size {block}"
                )
            n_bytes = n_elems // block * type_size
            start = data_offset + offset
            if offset % alignment:
                raise cur.fail(f"tensor {name!r} data offset {offset} is not {alignment}-byte aligned")
            if start + n_bytes > size:
                raise ModelFileError(
                    f"{path}: truncated: tensor {name!r} needs bytes [{start}, {start + n_bytes}) "
                    f"but the file has {size}; re-download or re-convert the model"
                )
            if qtype in _NOT_WEIGHTS:
                raise UnsupportedError(f"{path}: tensor {name!r} has type {qtype.name}; model weights are float or "
                                       "quantized types (F32, F16, BF16, Q*_*, IQ*...): the type id is damaged or "
                                       "the file is not a model")
            regions.append((start, start + n_bytes, name))
        # As llama.cpp's loader: every tensor inside the data section (checked above: offsets are unsigned
        # and relative to it), aligned (above), and no two tensors sharing bytes. A changed type id or data
        # offset usually shows up here: GGUF has no checksum, so this is the check there is.
        regions.sort()
        for (s0, e0, n0), (s1, e1, n1) in zip(regions, regions[1:]):
            if s1 < e0:
                raise cur.fail(f"tensors {n0!r} [{s0}, {e0}) and {n1!r} [{s1}, {e1}) overlap")
    return HeaderSummary(version, n_tensors, n_kv, data_offset, size)


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(unknown version)"
