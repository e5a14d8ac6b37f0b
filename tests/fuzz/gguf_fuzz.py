"""Fuzzing the GGUF path: mutated model files through the reader, the model loader and the tokenizer.

Every case must end in one of two ways: the file loads (and its tokenizer encodes a string), or a
``KvbenchError`` says what is wrong. Anything else is a finding:

- ``crash``: any other exception (a raw UnicodeDecodeError, IndexError, MemoryError ...);
- ``hang``: the case ran longer than ``--case-timeout`` seconds (SIGALRM; a hang inside native code
  that never returns to Python is caught by the caller's overall timeout instead);
- ``memory``: the case raised the process's peak RSS more than ``--max-rss-mib`` above where it started
  (VmHWM is reset before every case through /proc/self/clear_refs).

Seeds are micro models written by kvbench's own writer with llama.cpp's converter rules (a llama
with a SentencePiece vocabulary, a qwen2 with byte-level BPE, a Mamba), small enough that a case
takes milliseconds. Mutations, drawn by hypothesis: byte flips (biased to the header and metadata),
truncations, overwrites of the integer fields of the header (counts, lengths, value and tensor
types, dimensions, data offsets) with boundary values, duplicated or swapped regions, and a few
targeted ones the first campaign found (invalid UTF-8 in strings, a huge block_count, one huge token).

    python -m tests.fuzz.gguf_fuzz --cases 6000 --out gguf-fuzz.json       # the long campaign
    tests/unit/engine/gguf/test_fuzz.py                                    # a bounded run in the suite
"""

from __future__ import annotations

import struct
import sys
import tempfile
from collections import Counter
from pathlib import Path

from tests.fuzz.common import (
    CASE_TIMEOUT_S,
    FINDINGS,
    MAX_RSS_MIB,
    classify,
    drive,
    main,
)

_BOUNDARY = [0, 1, 2, 3, 7, 255, 256, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 40,
             (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


def seed_files(d: Path) -> list[Path]:
    """Micro models of each tokenizer and layer kind kvbench reads."""
    from engine.gguf.presets import Preset, build_preset
    from engine.gguf.writer import ModelShape

    small = dict(n_vocab=300, n_embd=64, n_layer=2, n_ctx=256)  # K/V rows of 32 values: every cache type fits
    presets = [
        Preset("fuzz-llama", ModelShape("llama", n_head=4, n_head_kv=2, n_ff=64, **small), "llama", seed=11),
        Preset("fuzz-qwen2", ModelShape("qwen2", n_head=4, n_head_kv=2, n_ff=64, tied=True, attn_bias=True, **small),
               "gpt2", seed=12),
        Preset("fuzz-mamba", ModelShape("mamba", n_head=0, n_head_kv=0, n_ff=0, **small), "gpt2", seed=13),
    ]
    d.mkdir(parents=True, exist_ok=True)
    return [build_preset(p, d / f"{p.name}.gguf") for p in presets]


def int_fields(path: Path) -> list[tuple[int, int, str]]:
    """(byte offset, width, what) of every integer in the header, metadata and tensor infos of a valid file."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    base = r.data.__array_interface__["data"][0]
    out = []
    for owner in list(r.fields.values()) + [t.field for t in r.tensors]:
        for p in owner.parts:
            if p.dtype.kind in "ui" and p.dtype.itemsize in (4, 8) and p.size <= 4:
                off = p.__array_interface__["data"][0] - base
                for i in range(p.size):
                    out.append((off + i * p.dtype.itemsize, p.dtype.itemsize, owner.name))
    del r
    return out


def string_spans(path: Path) -> list[tuple[int, int, str]]:
    """(offset, length, key) of the string values (and token strings) in the metadata of a valid file."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    base = r.data.__array_interface__["data"][0]
    out = []
    for f in r.fields.values():
        for p in f.parts:
            if p.dtype.kind == "u" and p.dtype.itemsize == 1 and p.size > 0:
                out.append((p.__array_interface__["data"][0] - base, int(p.size), f.name))
    return out


def mutate(data: bytes, draw, fields, strings) -> tuple[bytes, str]:
    """One mutation of ``data``; ``draw(kind, *args)`` makes every random choice (hypothesis or random)."""
    b = bytearray(data)
    n = len(b)
    header_end = max(off + w for off, w, _ in fields) if fields else n
    kind = draw("kind", ["flip", "truncate", "int", "int", "int", "region", "utf8", "block_count", "long_token"])
    if kind == "flip":
        for _ in range(draw("count", 1, 8)):
            pos = draw("pos", 0, (header_end if draw("in_header", [True, True, False]) else n) - 1)
            b[pos] ^= 1 << draw("bit", 0, 7)
        return bytes(b), "flip"
    if kind == "truncate":
        return bytes(b[: draw("len", 0, n - 1)]), "truncate"
    if kind == "int":
        off, width, owner = fields[draw("field", 0, len(fields) - 1)]
        value = draw("value", _BOUNDARY) if draw("boundary", [True, False]) else draw("any", 0, (1 << (8 * width)) - 1)
        value &= (1 << (8 * width)) - 1
        b[off: off + width] = value.to_bytes(width, "little")
        return bytes(b), f"int {owner}"
    if kind == "region":
        ln = draw("rlen", 1, 4096)
        src, dst = draw("src", 0, max(0, n - ln)), draw("dst", 0, max(0, n - ln))
        chunk = bytes(b[src: src + ln])
        if draw("swap", [True, False]):
            b[src: src + ln] = b[dst: dst + ln]
        b[dst: dst + ln] = chunk
        return bytes(b), "region"
    if kind == "utf8":
        off, ln, key = strings[draw("string", 0, len(strings) - 1)]
        b[off + draw("at", 0, ln - 1)] = draw("byte", [0x80, 0xC0, 0xFF, 0xFE, 0xED])
        return bytes(b), f"utf8 {key}"
    if kind == "block_count":
        off, width, owner = next(f for f in fields if f[2].endswith(".block_count") and f[1] == 4)
        b[off: off + width] = draw("blocks", [3, 64, 352_334_179, 0xFFFFFFFF]).to_bytes(width, "little")
        return bytes(b), "block_count"
    # one token made huge, the file otherwise consistent
    return _long_token(data, draw("token_len", [4096, 100_000, 1_000_000])), "long_token"


def _long_token(data: bytes, length: int) -> bytes:
    """The same file with its first token string replaced by ``length`` copies of 'a': a consistent file
    (the metadata grows, the tensor data section moves to the next aligned offset, tensor offsets stay)."""
    from gguf import GGUFReader

    with tempfile.NamedTemporaryFile(suffix=".gguf") as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            r = GGUFReader(tmp.name)
            f = r.fields["tokenizer.ggml.tokens"]
        except Exception:  # noqa: BLE001 -- an already damaged seed: leave it as it is
            return data
        base = r.data.__array_interface__["data"][0]
        len_part = f.parts[f.data[0] - 1]  # the u64 length in front of the first token
        off = len_part.__array_interface__["data"][0] - base
        old = int(len_part[0])
        owners = [t.field for t in r.tensors] or list(r.fields.values())
        last = owners[-1].parts[-1]
        info_end = last.__array_interface__["data"][0] - base + last.nbytes
        data_start, alignment = r.data_offset, r.alignment
        del r, f, len_part, last, owners
    meta = data[:off] + struct.pack("<Q", length) + b"a" * length + data[off + 8 + old: info_end]
    return meta + b"\0" * ((-len(meta)) % alignment) + data[data_start:]


def run_case(path: Path) -> str:
    """What a user's file goes through: header, metadata, config, tensors, weights, tokenizer, one prefill."""
    from engine.loader import create_engine, create_memory, load_model

    lm = load_model(path)
    ids = lm.tokenizer.encode("hello world, ünïcödé")
    lm.tokenizer.decode(ids)
    create_engine(lm, create_memory(lm, size=32)).prefill({0: ids[:16]})
    return "loaded"


def campaign(cases: int, seed: int | None, workdir: Path, timeout_s: float = CASE_TIMEOUT_S,
             max_rss_mib: float = MAX_RSS_MIB, deadline_s: float | None = None) -> dict:
    """Run ``cases`` hypothesis-drawn mutations; returns counts and the findings (kind, mutation, detail)."""
    import torch

    torch.set_num_threads(1)
    seeds = seed_files(workdir / "seeds")
    data = [p.read_bytes() for p in seeds]
    fields = [int_fields(p) for p in seeds]
    strings = [string_spans(p) for p in seeds]
    loaded_ints: Counter = Counter()  # integer overwrites that still loaded, by the key or tensor they hit
    case_path = workdir / "case.gguf"
    kept = workdir / "findings"

    def one_case(draw):
        i = draw("seed", 0, len(seeds) - 1)
        mutated, what = mutate(data[i], draw, fields[i], strings[i])
        case_path.write_bytes(mutated)
        outcome, detail = classify(lambda: run_case(case_path), timeout_s, max_rss_mib)
        if what.startswith("int") and outcome == "loaded":
            loaded_ints[what.split()[1].split(".")[-2] if what.count(".") > 1 else what.split()[1]] += 1
        extra = {"seed": seeds[i].name}
        if outcome in FINDINGS:  # keep the file that did it
            kept.mkdir(exist_ok=True)
            extra["file"] = str(kept / f"{len(list(kept.iterdir())):04d}-{outcome}.gguf")
            Path(extra["file"]).write_bytes(mutated)
        return outcome, what, detail, extra

    rep = drive(cases, seed, deadline_s, one_case)
    rep["loaded_int_overwrites"] = dict(loaded_ints.most_common())
    return rep


if __name__ == "__main__":
    sys.exit(main(__doc__, campaign, 6000))
