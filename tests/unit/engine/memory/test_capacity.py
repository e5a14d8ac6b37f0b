"""engine.memory.capacity: what one sequence costs per allocator and kind of memory, checked against the
allocators themselves (memory-only runs reserve and hold exactly what real ones do)."""

import pytest

from engine.gguf.presets import ensure_preset
from engine.gguf.reader import open_gguf
from engine.loader import create_engine, create_memory, load_model
from engine.memory.capacity import (
    Budget,
    cells_per_sequence,
    fit,
    kv_row_bytes,
    max_context,
    parse_bytes,
)
from engine.memory.kv_cache import CacheSpec
from engine.runtime.scheduler import Request, Scheduler


def _cfg(name):
    return open_gguf(ensure_preset(name)).config()


def test_cells_per_sequence_per_allocator():
    c = _cfg("llama-tiny")
    assert cells_per_sequence(c, "pooled", 1000) == 1000
    assert cells_per_sequence(c, "paged", 1000, block_size=16) == 1008  # 63 blocks: 8 cells of tail waste
    assert cells_per_sequence(c, "naive", 1000, growth="cat") == 1000
    # doubling from the first 512-token ubatch: 512, then 1024
    assert cells_per_sequence(c, "naive", 1000, growth="double", n_ubatch=512) == 1024
    assert cells_per_sequence(c, "naive", 1000, growth="double", n_ubatch=100) == 1600  # 100, 200, 400, 800, 1600
    w = _cfg("mistral-swa-tiny")  # window 64 on every layer: the window and the ubatch being written
    assert cells_per_sequence(w, "pooled", 4000, n_ubatch=512) == 64 + 512
    assert cells_per_sequence(w, "pooled", 100, n_ubatch=512) == 100
    assert cells_per_sequence(_cfg("rwkv7-tiny"), "pooled", 4000) == 0  # no KV at all


def test_fit_counts_whole_sequences_and_is_monotone():
    c = _cfg("llama-tiny")
    spec = CacheSpec(type_k="f16", type_v="f16")
    row = kv_row_bytes(c, "f16", "f16")
    assert row == 4 * 2 * 64 * 2  # 4 layers, K and V, 2 KV heads of 32, f16
    b = Budget(memory=300 * 2**20, weights=13 * 2**20, runtime_floor=250 * 2**20)
    f = fit(c, "pooled", 2048, b, spec)
    assert f.total <= b.memory and f.cache_size == f.max_sequences * 2048
    more = fit(c, "pooled", 2048, Budget(b.memory + 64 * 2**20, b.weights, b.runtime_floor), spec)
    assert more.max_sequences > f.max_sequences
    assert fit(c, "pooled", 2048, Budget(200 * 2**20, b.weights, b.runtime_floor), spec).max_sequences == 0
    # the longest context for the plan's own count is at least the context asked for
    assert max_context(c, "pooled", f.max_sequences, b, spec) >= 2048


def test_recurrent_state_is_constant_and_windows_stop_growing():
    spec = CacheSpec(type_k="f16", type_v="f16")
    b = Budget(memory=400 * 2**20, weights=0, runtime_floor=250 * 2**20)
    r = _cfg("rwkv7-tiny")
    assert fit(r, "pooled", 100, b, spec).max_sequences == fit(r, "pooled", 100_000, b, spec).max_sequences
    assert max_context(r, "pooled", 4, b, spec, limit=1 << 20) == 1 << 20  # any context, once it fits
    w = _cfg("mistral-swa-tiny")
    assert fit(w, "pooled", 5000, b, spec).kv_bytes_per_sequence == fit(w, "pooled", 50_000, b, spec).kv_bytes_per_sequence


@pytest.mark.parametrize("model, allocator", [(m, a) for m in ("llama-tiny", "hybrid-tiny", "granite-hybrid-tiny")
                                              for a in ("pooled", "paged", "naive")]
                         + [("rwkv7-tiny", "pooled"), ("rwkv7-tiny", "naive")])  # paged pages KV: RWKV has none
def test_per_sequence_bytes_are_what_the_allocators_hold(model, allocator):
    """n sequences of a context through the scheduler on a memory-only model (the real allocators, no
    arithmetic): the live KV and state bytes at the peak are the plan's per-sequence bytes times n, and the
    pool the plan sizes holds them without a preemption."""
    lm = load_model(model, memory_only=True)
    c = lm.config
    n, context, out = 3, 200, 5
    spec = CacheSpec(allocator=allocator, block_size=16)
    f = fit(c, allocator, context, Budget(1 << 40, 0, 0), spec, n_max=n)
    mem = create_memory(lm, allocator=allocator, size=max(f.cache_size, 16), n_seq_max=n, block_size=16)
    sched = Scheduler(create_engine(lm, mem), n)
    peak = [0, 0]
    for i in range(n):
        sched.submit(Request(i, [5 + i] * (context - out + 1), out))
    while (info := sched.step()) is not None:
        kv, rs = mem.parts()
        now = (kv.usage()[0] if kv else 0, rs.usage()[0] if rs else 0)
        if info.live_before_free:
            now = info.live_before_free
        peak = [max(a, b) for a, b in zip(peak, now)]
    res = [sched.results[i] for i in range(n)]
    assert all(r.status == "done" for r in res) and sched.preemptions == 0
    row = kv_row_bytes(c, "f32", "f32")
    assert peak[0] == n * context * row  # live: the tokens themselves (the allocator's rounding is reserve)
    assert peak[1] == n * c.recurrent_bytes_per_seq
    if allocator in ("pooled", "paged"):
        assert mem.stats().reserved_bytes == f.cache_size * row + (n * c.recurrent_bytes_per_seq
                                                                   if c.ssm_layers else 0)


def test_sizes_parse_with_units_and_refuse_the_rest():
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("24GB") == 24 * 10**9
    assert parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("1000") == 1000 and parse_bytes("1.5 KiB") == 1536
    for bad in ("", "GiB", "-1GiB", "12XB", "nan", "inf"):
        with pytest.raises(ValueError, match="expected a size"):
            parse_bytes(bad)
