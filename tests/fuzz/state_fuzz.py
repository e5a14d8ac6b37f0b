"""Fuzzing memory state files: mutated states restored into a live memory.

Every case must end in one of two ways: the state is restored (and the memory can save itself
again), or a ``KvbenchError`` is raised and the memory is exactly as it was (its own saved state,
byte for byte, is unchanged). Anything else is a finding (crash, hang, memory; see gguf_fuzz).

Sources: whole and single-sequence states of a micro llama (KV cache, f32 and q8_0/q4_0 rows, every
allocator, a shared prefix) and of a micro Mamba (recurrent state). Mutations, drawn by hypothesis:
raw byte flips and truncations (the CRC must catch them), and edits with the CRC recomputed (what
only validation can catch): header fields deleted, retyped, set to boundary values or added;
positions, owner counts and owner ids overwritten.

    python -m tests.fuzz.state_fuzz --cases 3000 --out state-fuzz.json
"""

from __future__ import annotations

import io
import json
import struct
import sys
import zlib
from pathlib import Path

from tests.fuzz.common import (
    CASE_TIMEOUT_S,
    MAX_RSS_MIB,
    Finding,
    classify,
    drive,
    main,
)
from tests.fuzz.gguf_fuzz import seed_files

_VALUES = [None, True, 0, -1, 1, 2**31, 2**40, -(2**40), 1.5, float("inf"), "", "x", "pooled", "kvbench-state",
           [], [0], [0, 1, 2, 3], {}, {"a": 1}]


def _split(blob: bytes) -> tuple[dict, bytes]:
    hdr_len = struct.unpack_from("<I", blob, 12)[0]
    return json.loads(blob[16:16 + hdr_len]), blob[16 + hdr_len:-4]


def _frame(header, body: bytes) -> bytes:
    hdr = json.dumps(header).encode()
    blob = b"KVBSTATE" + struct.pack("<II", 1, len(hdr)) + hdr + body
    return blob + struct.pack("<I", zlib.crc32(blob))


class Sources:
    """Live memories to restore into and the valid states to mutate."""

    def __init__(self, workdir: Path) -> None:
        from engine.loader import create_engine, create_memory, load_model

        llama, _, mamba = seed_files(workdir / "seeds")
        self.models = {"kv": load_model(llama), "recurrent": load_model(mamba)}
        self.states: list[tuple[str, bytes, int | None]] = []  # (model kind, state bytes, seq_id)
        for kind, lm in self.models.items():
            for alloc, tk in (("pooled", "f32"), ("paged", "q8_0"), ("naive", "q4_0")):
                if kind == "recurrent" and tk != "f32":
                    continue
                eng = create_engine(lm, create_memory(lm, allocator=alloc, size=64, block_size=8, n_seq_max=4,
                                                      type_k=tk, type_v=tk))
                eng.prefill({0: list(range(3, 20)), 1: list(range(40, 49))})
                if kind == "kv":
                    eng.memory.seq_cp(0, 2, 0, 8)  # a shared prefix
                for seq in (None, 0):
                    f = io.BytesIO()
                    eng.memory.state_write(f, seq)
                    self.states.append((kind, f.getvalue(), seq))
        self.create_engine, self.create_memory = create_engine, create_memory

    def target(self, kind: str, allocator: str, type_k: str):
        """A memory holding content of its own (so that 'unchanged' means something)."""
        lm = self.models[kind]
        if kind == "recurrent":
            type_k = "f32"
        eng = self.create_engine(lm, self.create_memory(lm, allocator=allocator, size=64, block_size=8, n_seq_max=4,
                                                        type_k=type_k, type_v=type_k))
        eng.prefill({1: list(range(60, 71)), 3: list(range(80, 85))})
        return eng.memory


def mutate(blob: bytes, draw) -> tuple[bytes, str]:
    b = bytearray(blob)
    kind = draw("kind", ["flip", "truncate", "header", "header", "header", "body", "body"])
    if kind == "flip":
        for _ in range(draw("count", 1, 4)):
            b[draw("pos", 0, len(b) - 1)] ^= 1 << draw("bit", 0, 7)
        return bytes(b), "flip"
    if kind == "truncate":
        return bytes(b[: draw("len", 0, len(b) - 1)]), "truncate"
    header, body = _split(blob)
    if kind == "header":
        key = draw("key", sorted(header) + ["extra_field"])
        op = draw("op", ["delete", "set", "set"])
        if op == "delete":
            header.pop(key, None)
        else:
            header[key] = draw("value", _VALUES + [header.get(key)])
        return _frame(header, body), f"header {key} {op}"
    n, n_ids = header["n_tokens"], header["n_seq_ids"]
    body = bytearray(body)
    region = draw("region", ["pos", "counts", "ids"])
    size = {"pos": n, "counts": n, "ids": n_ids}[region]
    start = {"pos": 0, "counts": 4 * n, "ids": 8 * n}[region]
    if size == 0:
        return _frame(header, bytes(body)), f"body {region} (empty)"
    i = draw("index", 0, size - 1)
    value = draw("int", [0, 1, 2, 3, 7, 63, 64, 2**24, 2**31 - 1, 2**31, 2**32 - 1])
    body[start + 4 * i: start + 4 * i + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")
    return _frame(header, bytes(body)), f"body {region}"


def restore(src: Sources, kind: str, blob: bytes, seq: int | None, allocator: str, type_k: str) -> str:
    """Restore ``blob`` into a live memory: restored (and it saves itself again), or refused with the
    memory exactly as it was (``Finding`` otherwise)."""
    from engine.errors import KvbenchError

    mem = src.target(kind, allocator, type_k)
    before = io.BytesIO()
    mem.state_write(before)
    try:
        mem.state_read(io.BytesIO(blob), seq, source="case")
        mem.state_write(io.BytesIO())
        return "restored"
    except KvbenchError as e:
        after = io.BytesIO()
        mem.state_write(after)
        if after.getvalue() != before.getvalue():
            raise Finding(f"refused ({e}) but the memory changed") from None
        raise
    finally:
        mem.close()


def campaign(cases: int, seed: int | None, workdir: Path, timeout_s: float = CASE_TIMEOUT_S,
             max_rss_mib: float = MAX_RSS_MIB, deadline_s: float | None = None) -> dict:
    import torch

    torch.set_num_threads(1)
    src = Sources(workdir)

    def one_case(draw):
        kind, blob, seq = src.states[draw("state", 0, len(src.states) - 1)]
        mutated, what = mutate(blob, draw)
        alloc = draw("allocator", ["naive", "pooled", "paged"])
        type_k = draw("type", ["f32", "q8_0", "q4_0"])
        into = None if seq is None else draw("into", [0, 2, 3])
        outcome, detail = classify(lambda: restore(src, kind, mutated, into, alloc, type_k), timeout_s, max_rss_mib)
        return outcome, what, detail, {"allocator": alloc}

    return drive(cases, seed, deadline_s, one_case)


if __name__ == "__main__":
    sys.exit(main(__doc__, campaign, 3000))
