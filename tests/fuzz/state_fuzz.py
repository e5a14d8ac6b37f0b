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

import argparse
import io
import json
import os
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

from tests.fuzz.gguf_fuzz import Hang, _hwm_mib, _hwm_reset, seed_files

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


def classify(src: Sources, kind: str, blob: bytes, seq: int | None, allocator: str, type_k: str,
             timeout_s: float, max_rss_mib: float) -> tuple[str, str]:
    import signal
    import traceback

    from engine.errors import KvbenchError

    mem = src.target(kind, allocator, type_k)
    before = io.BytesIO()
    mem.state_write(before)

    def alarm(*_):
        raise Hang()

    old = signal.signal(signal.SIGALRM, alarm)
    _hwm_reset()
    start = _hwm_mib()
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        mem.state_read(io.BytesIO(blob), seq, source="case")
        again = io.BytesIO()
        mem.state_write(again)  # restored: the memory must be able to write itself again
        outcome, detail = "restored", ""
    except KvbenchError as e:
        after = io.BytesIO()
        mem.state_write(after)
        if after.getvalue() != before.getvalue():
            outcome, detail = "crash", f"refused but the memory changed: {e}"
        else:
            outcome, detail = "clean", str(e)[:300]
    except Hang:
        outcome, detail = "hang", f"still running after {timeout_s} s"
    except Exception as e:  # noqa: BLE001 -- the finding
        outcome, detail = "crash", "".join(traceback.format_exception_only(type(e), e)).strip()[:300]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    grew = _hwm_mib() - start
    if grew > max_rss_mib and outcome != "crash":
        outcome, detail = "memory", f"peak RSS grew {grew:.0f} MiB"
    mem.close()
    return outcome, detail


def campaign(cases: int, seed: int | None, workdir: Path, timeout_s: float = 10, max_rss_mib: float = 1024,
             deadline_s: float | None = None) -> dict:
    import torch
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    torch.set_num_threads(1)
    src = Sources(workdir)
    counts: Counter = Counter()
    by_mutation: Counter = Counter()
    findings: list[dict] = []
    t0 = time.monotonic()

    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              derandomize=seed is None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one(d):
        if deadline_s is not None and time.monotonic() - t0 > deadline_s:
            return

        def draw(label, *args):
            if len(args) == 1:
                return d.draw(st.sampled_from(args[0]), label=label)
            return d.draw(st.integers(args[0], max(args[0], args[1])), label=label)

        kind, blob, seq = src.states[draw("state", 0, len(src.states) - 1)]
        mutated, what = mutate(blob, draw)
        alloc = draw("allocator", ["naive", "pooled", "paged"])
        type_k = draw("type", ["f32", "q8_0", "q4_0"])
        into = None if seq is None else draw("into", [0, 2, 3])
        outcome, detail = classify(src, kind, mutated, into, alloc, type_k, timeout_s, max_rss_mib)
        counts[outcome] += 1
        by_mutation[f"{what.split()[0]}:{outcome}"] += 1
        if outcome in ("crash", "hang", "memory"):
            findings.append({"outcome": outcome, "mutation": what, "detail": detail, "allocator": alloc})

    if seed is not None:
        one = __import__("hypothesis").seed(seed)(one)
    one()
    return {"cases": sum(counts.values()), "counts": dict(counts), "by_mutation": dict(sorted(by_mutation.items())),
            "findings": findings, "seconds": round(time.monotonic() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--deadline", type=float, default=None)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="kvbench-state-fuzz-"))
    os.environ.setdefault("KVBENCH_CACHE", str(workdir / "cache"))
    rep = campaign(a.cases, a.seed, workdir, deadline_s=a.deadline)
    if a.out:
        Path(a.out).write_text(json.dumps(rep, indent=1))
    print(json.dumps({k: rep[k] for k in ("cases", "counts", "seconds")}))
    for f in rep["findings"][:20]:
        print(f"{f['outcome']:<7} {f['mutation']:<40} {f['detail'][:160]}", file=sys.stderr)
    return 0 if not rep["findings"] else 1


if __name__ == "__main__":
    sys.exit(main())
