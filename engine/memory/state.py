"""The memory state file format: versioned, self-checking, allocator-agnostic, no pickle.

Layout (little-endian)::

    magic      8 bytes   b"KVBSTATE"
    version    u32       FORMAT_VERSION
    hdr_len    u32       length of the JSON header
    header     JSON      arch, n_layer, row sizes, cache types, n_tokens, n_seq_ids, seq_id, kind, ...
    pos        i32[n_tokens]
    n_seq      u32[n_tokens]      how many sequences own each token (1 unless a prefix is shared)
    seq_ids    i32[n_seq_ids]     the owners, token after token
    per layer  K rows (n_tokens x row_bytes_k), then V rows (n_tokens x row_bytes_v), in the cache
               type's storage layout (ggml blocks for q8_0 / q4_0)
    crc32      u32       of everything above

A token is a (position, owner set) and its K/V rows; nothing says which cell or block held it,
so a state written by one allocator restores into another of the same model and cache types.
``read_state`` checks everything (sizes against the file length before allocating, CRC,
field types) and raises ``StateFileError``; callers compare the header with their memory
before changing anything.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from engine.atomic import atomic_open
from engine.errors import StateFileError

MAGIC = b"KVBSTATE"
FORMAT_VERSION = 1
_MAX_HEADER = 1 << 20
MAX_POS = 1 << 24  # positions a state may hold: far beyond any model's context, far below a garbage int32
# Allocator names a state may say it was written by: engine/alloc's registry adds every allocator it
# registers (that registry sits above this layer, so it tells this one rather than being imported).
WRITERS: set[str] = set()

# Every header field and its type. A field not listed here, or of another type, is refused: the CRC
# only proves the bytes are the ones written, not that a writer (or an editor) wrote sense.
_COMMON = {"format": str, "n_tokens": int, "n_seq_ids": int, "arch": str, "model": str, "n_layer": int,
           "layers": list, "row_bytes_k": int, "row_bytes_v": int, "seq_id": (int, type(None)), "written_by": str}
_KV = {"n_embd_k_gqa": int, "n_embd_v_gqa": int, "n_swa": int, "rope_type": str, "rope_freq_base": (float, int),
       "rope_freq_scale": (float, int), "type_k": str, "type_v": str, "rot_k": int, "rot_v": int}
_RECURRENT = {"kind": str, "n_embd_r": int, "n_embd_s": int}


@dataclass
class StateData:
    header: dict
    pos: np.ndarray  # (n_tokens,) int32
    seqs: list[np.ndarray]  # per token: owner seq ids (int32)
    k: list[bytes]  # per layer: n_tokens * row_bytes_k
    v: list[bytes]


def write_state(f: BinaryIO, header: dict, pos: np.ndarray, seqs: list[np.ndarray],
                k_rows: list[bytes], v_rows: list[bytes]) -> None:
    n = len(pos)
    counts = np.asarray([len(s) for s in seqs], dtype="<u4")
    ids = np.concatenate(seqs).astype("<i4") if n else np.zeros(0, "<i4")
    header = dict(header, n_tokens=n, n_seq_ids=int(len(ids)), format="kvbench-state")
    hdr = json.dumps(header, sort_keys=True).encode()
    parts = [MAGIC, struct.pack("<II", FORMAT_VERSION, len(hdr)), hdr,
             np.asarray(pos, dtype="<i4").tobytes(), counts.tobytes(), ids.tobytes()]
    for k, v in zip(k_rows, v_rows):
        parts += [k, v]
    crc = 0
    for p in parts:
        crc = zlib.crc32(p, crc)
        f.write(p)
    f.write(struct.pack("<I", crc))


def read_state(f: BinaryIO, source: str = "state") -> StateData:
    blob = f.read()

    def bad(what: str) -> StateFileError:
        return StateFileError(f"{source}: {what}; the state file is damaged or not a kvbench state")

    if len(blob) < 20 or blob[:8] != MAGIC:
        raise bad("wrong magic (expected b'KVBSTATE')")
    version, hdr_len = struct.unpack_from("<II", blob, 8)
    if version != FORMAT_VERSION:
        raise StateFileError(f"{source}: state format version {version} is not supported (this kvbench reads "
                             f"{FORMAT_VERSION}); save the state again with this version")
    if hdr_len > _MAX_HEADER or 16 + hdr_len + 4 > len(blob):
        raise bad(f"truncated header (declares {hdr_len} bytes)")
    crc_want = struct.unpack_from("<I", blob, len(blob) - 4)[0]
    if zlib.crc32(memoryview(blob)[: len(blob) - 4]) != crc_want:
        raise bad("checksum mismatch (truncated or corrupted)")
    try:
        header = json.loads(blob[16 : 16 + hdr_len])
    except ValueError as e:  # UnicodeDecodeError and json.JSONDecodeError are ValueErrors
        raise bad(f"malformed header ({e})") from None
    _check_header_types(header, bad)  # before any value is used: sizes below are ints, not inf or "many"
    n, n_ids, n_layer = header["n_tokens"], header["n_seq_ids"], header["n_layer"]
    rk, rv = header["row_bytes_k"], header["row_bytes_v"]
    off = 16 + hdr_len
    need = 4 * n + 4 * n + 4 * n_ids + n_layer * n * (rk + rv)
    if min(n, n_ids, n_layer, rk, rv) < 0 or off + need + 4 != len(blob):
        raise bad(f"size mismatch: header implies {off + need + 4} bytes, file has {len(blob)}")
    pos = np.frombuffer(blob, "<i4", n, off).astype(np.int32)
    off += 4 * n
    counts = np.frombuffer(blob, "<u4", n, off)
    off += 4 * n
    ids = np.frombuffer(blob, "<i4", n_ids, off).astype(np.int32)
    off += 4 * n_ids
    if int(counts.sum()) != n_ids or (n and counts.min() == 0):
        raise bad("owner counts do not add up")
    if n and (pos.min() < 0 or ids.min() < 0):
        raise bad("negative position or sequence id")
    if n and pos.max() >= MAX_POS:
        raise bad(f"position {int(pos.max())} is beyond any context (positions lie in [0, {MAX_POS}))")
    seqs = np.split(ids, np.cumsum(counts)[:-1]) if n else []
    _check_header_values(header, seqs, bad)
    _check_positions(pos, seqs, counts, bad)
    k, v = [], []
    for _ in range(n_layer):
        k.append(blob[off : off + n * rk])
        off += n * rk
        v.append(blob[off : off + n * rv])
        off += n * rv
    return StateData(header, pos, seqs, k, v)


def _check_header_types(header: dict, bad) -> None:
    """Every field present with its type, nothing else."""
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    schema = _COMMON | (_RECURRENT if "kind" in header else _KV)
    for key, want in schema.items():
        if key not in header:
            raise bad(f"header field {key!r} is missing")
        v = header[key]
        if isinstance(v, bool) or not isinstance(v, want):
            raise bad(f"header field {key!r} = {v!r} has the wrong type")
    extra = sorted(set(header) - set(schema))
    if extra:
        raise bad(f"unknown header field {extra[0]!r}")


def _check_header_values(header: dict, seqs: list[np.ndarray], bad) -> None:
    """The values the data itself can confirm, and the names a writer can have written."""
    if header["format"] != "kvbench-state":
        raise bad(f"header field 'format' = {header['format']!r} (expected 'kvbench-state')")
    if header["written_by"] not in WRITERS:
        raise bad(f"header field 'written_by' = {header['written_by']!r} is not a known allocator "
                  f"({', '.join(sorted(WRITERS))})")
    if "kind" in header and header["kind"] != "recurrent":
        raise bad(f"header field 'kind' = {header['kind']!r} (expected 'recurrent')")
    layers = header["layers"]
    if len(layers) != header["n_layer"] or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                   for x in layers):
        raise bad(f"header field 'layers' = {layers!r} does not list {header['n_layer']} layer indices")
    seq = header["seq_id"]
    if seq is not None and (seq < 0 or any(len(s) != 1 or int(s[0]) != seq for s in seqs)):
        raise bad(f"header field 'seq_id' = {seq} but the tokens belong to other sequences")


def _check_positions(pos: np.ndarray, seqs: list[np.ndarray], counts: np.ndarray, bad) -> None:
    """Within a sequence, positions are distinct (sorted, they ascend strictly); a token's owners are distinct."""
    if not len(pos):
        return
    owners = np.concatenate(seqs).astype(np.int64)
    tok = np.repeat(np.arange(len(pos)), counts.astype(np.int64))
    if len(np.unique(np.stack([tok, owners]), axis=1)[0]) != len(owners):
        raise bad("a token lists the same sequence twice among its owners")
    pairs = np.stack([owners, pos[tok].astype(np.int64)])
    uniq, n_each = np.unique(pairs, axis=1, return_counts=True)
    if (n_each > 1).any():
        s, p = uniq[:, int(np.argmax(n_each > 1))]
        raise bad(f"sequence {s} holds position {p} twice (a sequence's positions must ascend strictly)")


class StateFiles:
    """save_state / load_state for any memory with state_write / state_read: atomic writes, and an
    unreadable path is a StateFileError like any other bad state."""

    def save_state(self, path, seq_id: int | None = None) -> None:
        with atomic_open(path) as f:
            self.state_write(f, seq_id)

    def load_state(self, path, seq_id: int | None = None) -> None:
        try:
            f = open(path, "rb")
        except OSError as e:
            raise StateFileError(f"{path}: cannot open ({e.strerror})") from None
        with f:
            self.state_read(f, seq_id, source=str(path))
