"""Read a GGUF file's header -- metadata and tensor table -- without trusting any count in it.

Why kvbench parses the header itself instead of using ``gguf.GGUFReader`` (which ``tests/fuzz`` still
uses as the reference):

* **Memory.** GGUFReader keeps a numpy view per part of every field: two per string, so a real
  vocabulary (SmolLM2: 49,152 tokens and 48,900 merges) costs ~170 MiB of process memory and 2.4 s,
  more than the model's 94 MiB of weights. Here a string array becomes one list of ``str``: a few MiB,
  ~0.1 s. The engine's peak RSS is part of what kvbench measures (docs/engine.md).
* **Bounds.** GGUFReader walks arrays one element at a time and slices its memmap without bounds
  checks: a header that declares 2**60 items spins forever, a truncated file fails inside numpy. This
  walk checks every length and count against the bytes that remain and raises a ``ModelFileError``
  that names the file and the key or tensor, before anything large is allocated.

Values are decoded as the walk goes (GGUF types follow ``gguf.GGUFValueType``). A string that is not
valid UTF-8 does not fail the walk: the key reads as an error when it is used, so ``kvbench info`` can
still describe a file whose vocabulary is damaged.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from engine.errors import ModelFileError, UnsupportedError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32

# Fixed-size GGUF value types -> numpy dtype (little-endian; strings and arrays are variable).
_SCALAR = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}
_SCALAR = {int(k): np.dtype(v) for k, v in _SCALAR.items()}
_STRING, _ARRAY = int(GGUFValueType.STRING), int(GGUFValueType.ARRAY)
# integer and double tensor types: llama.cpp stores no model weights in them
_NOT_WEIGHTS = {GGMLQuantizationType[n] for n in ("I8", "I16", "I32", "I64", "F64")
                if n in GGMLQuantizationType.__members__}
# Tensor types numpy can view as they are stored; every other type is viewed as bytes per row.
_VIEW_DTYPE = {GGMLQuantizationType.F32: np.dtype("<f4"), GGMLQuantizationType.F16: np.dtype("<f2")}


class Undecodable:
    """A metadata value whose bytes are not what its type says (invalid UTF-8): an error on use."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table. ``shape`` is in GGUF order (ne0 = row length first)."""

    name: str
    shape: tuple[int, ...]
    tensor_type: GGMLQuantizationType
    data_offset: int  # absolute byte offset in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def view_layout(self) -> tuple[np.dtype, tuple[int, ...]]:
        """dtype and (torch-order) shape of the stored data: elements for F32/F16, bytes per row otherwise."""
        dims = list(reversed(self.shape))
        dtype = _VIEW_DTYPE.get(self.tensor_type)
        if dtype is None:
            block, type_size = GGML_QUANT_SIZES[self.tensor_type]
            dims[-1] = dims[-1] // block * type_size
            dtype = np.dtype(np.uint8)
        return dtype, tuple(dims)


@dataclass
class GGUFHeader:
    version: int
    n_tensors: int
    n_kv: int
    alignment: int
    data_offset: int
    file_size: int
    fields: dict[str, Any] = field(default_factory=dict)  # key -> decoded value (or Undecodable)
    types: dict[str, tuple[int, ...]] = field(default_factory=dict)  # key -> (type,) or (ARRAY, item type)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)  # in file order


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path, size: int) -> None:
        self.buf, self.path, self.size, self.pos = buf, path, size, 0

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
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = struct.unpack_from("<I", self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = struct.unpack_from("<Q", self.buf, self.pos)
        self.pos += 8
        return v

    def raw_string(self, what: str) -> bytes:
        return self.read(self.u64(f"length of {what}"), what)

    def name(self, what: str) -> str:
        try:
            return self.raw_string(what).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def numbers(self, dtype: np.dtype, count: int, what: str) -> list:
        b = self.read(count * dtype.itemsize, what)  # a copy: no numpy view keeps the mapping open
        return np.frombuffer(b, dtype=dtype).tolist()


def _value(cur: _Cursor, vtype: int, key: str) -> Any:
    if vtype in _SCALAR:
        return cur.numbers(_SCALAR[vtype], 1, f"value of key {key!r}")[0]
    if vtype == _STRING:
        raw = cur.raw_string(f"value of key {key!r}")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return Undecodable(f"holds a string that is not valid UTF-8 (byte {e.start}: {e.reason})")
    if vtype == _ARRAY:
        itype = cur.u32(f"item type of key {key!r}")
        count = cur.u64(f"item count of key {key!r}")
        if itype in _SCALAR:
            return cur.numbers(_SCALAR[itype], count, f"{count} items of key {key!r}")
        if itype == _STRING:
            # Every string costs at least its 8-byte length: reject absurd counts before looping.
            cur.need(count * 8, f"{count} strings of key {key!r}")
            items, bad = [], None
            for i in range(count):
                raw = cur.raw_string(f"item {i} of key {key!r}")
                try:
                    items.append(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    bad = bad or Undecodable(f"item {i} is not valid UTF-8 (byte {e.start}: {e.reason})")
            return bad or items
        if itype == _ARRAY:
            raise cur.fail(f"key {key!r} holds a nested array, which GGUF models do not use")
        raise cur.fail(f"key {key!r} has unknown array item type {itype}")
    raise cur.fail(f"key {key!r} has unknown value type {vtype}")


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """Metadata and tensor table of a GGUF file, every count checked before it is trusted."""
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
        if size == 0:
            raise ModelFileError(f"{path}: truncated at byte 0 while reading magic (the file is empty); "
                                 "the file is damaged or not a GGUF model")
        # Only the header's pages are ever touched (file-backed, shared with the page cache).
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _walk(_Cursor(buf, path, size), path, size)


def _walk(cur: _Cursor, path: Path, size: int) -> GGUFHeader:
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
    fields: dict[str, Any] = {}
    types: dict[str, tuple[int, ...]] = {}
    for i in range(n_kv):
        key = cur.name(f"name of metadata key #{i}")
        vtype = cur.u32(f"type of key {key!r}")
        if vtype == _ARRAY:  # the item type, read again by _value
            cur.need(4, f"item type of key {key!r}")
            types[key] = (vtype, struct.unpack_from("<I", cur.buf, cur.pos)[0])
        else:
            types[key] = (vtype,)
        fields[key] = _value(cur, vtype, key)
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if "general.alignment" in fields:
        if types["general.alignment"] != (int(GGUFValueType.UINT32),):
            raise cur.fail("general.alignment must be a uint32")
        if alignment == 0 or alignment & (alignment - 1):
            raise cur.fail(f"general.alignment = {alignment} is not a power of two")
    infos = []
    for i in range(n_tensors):
        name = cur.name(f"name of tensor #{i}")
        n_dims = cur.u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
        dims = struct.unpack(f"<{n_dims}Q", cur.read(8 * n_dims, f"shape of tensor {name!r}"))
        ttype = cur.u32(f"type of tensor {name!r}")
        offset = cur.u64(f"data offset of tensor {name!r}")
        infos.append((name, dims, ttype, offset))
    data_offset = cur.pos + (-cur.pos) % alignment

    tensors: dict[str, TensorInfo] = {}
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
        if name in tensors:
            raise cur.fail(f"tensor {name!r} appears twice in the tensor table")
        tensors[name] = TensorInfo(name, tuple(int(d) for d in dims), qtype, start, n_bytes)
    # As llama.cpp's loader: every tensor inside the data section (checked above: offsets are unsigned
    # and relative to it), aligned (above), and no two tensors sharing bytes. A changed type id or data
    # offset usually shows up here: GGUF has no checksum, so this is the check there is.
    regions = sorted((t.data_offset, t.data_offset + t.n_bytes, t.name) for t in tensors.values())
    for (s0, e0, n0), (s1, e1, n1) in zip(regions, regions[1:]):
        if s1 < e0:
            raise cur.fail(f"tensors {n0!r} [{s0}, {e0}) and {n1!r} [{s1}, {e1}) overlap")
    return GGUFHeader(version, n_tensors, n_kv, alignment, data_offset, size, fields, types, tensors)


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(unknown version)"
