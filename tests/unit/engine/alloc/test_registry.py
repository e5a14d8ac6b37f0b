"""One registry, one factory: every memory a model needs, the Memory protocol, and the refusals."""

import io

import pytest

from engine.alloc import ALLOCATORS, create_memory
from engine.errors import ConfigError, StateFileError
from engine.memory.base import Memory
from engine.memory.hybrid import HybridMemory
from engine.memory.kv_cache import CacheSpec


@pytest.mark.parametrize("model", ["llama-tiny", "mamba-tiny", "hybrid-tiny"])
@pytest.mark.parametrize("allocator", list(ALLOCATORS))
def test_every_allocator_builds_a_memory_that_speaks_the_protocol(load, model, allocator):
    lm = load(model)
    spec = CacheSpec(allocator=allocator, size=64, block_size=16, n_seq_max=2)
    if allocator == "paged" and not lm.config.attn_layers:
        with pytest.raises(ConfigError, match="paged.*no recurrent memory.*use one of naive, pooled"):
            create_memory(lm.config, spec, rope=lm.model.rope)
        return
    mem = create_memory(lm.config, spec, rope=lm.model.rope)
    assert isinstance(mem, Memory) and mem.kind == allocator
    kv, rs = mem.parts()
    assert (kv is not None) == bool(lm.config.attn_layers) and (rs is not None) == bool(lm.config.ssm_layers)
    assert mem.shares_partial_prefix == (rs is None)
    mem.close()


def test_an_unknown_allocator_names_the_choices(load):
    with pytest.raises(ConfigError, match="cache.allocator 'buddy': expected one of naive, pooled, paged"):
        create_memory(load("llama-tiny").config, CacheSpec(allocator="buddy", size=64))


def _hybrid(lm, type_k="f32"):
    from engine.loader import create_engine

    mem = create_memory(lm.config, CacheSpec(allocator="pooled", size=64, n_seq_max=2, type_k=type_k, type_v=type_k),
                        rope=lm.model.rope)
    create_engine(lm, mem).prefill({0: list(range(3, 20)), 1: list(range(30, 41))})
    return mem


def test_a_hybrid_restore_is_all_or_nothing(load):
    """The recurrent part restores first; when the KV part then refuses, the recurrent part is put back."""
    lm = load("hybrid-tiny")
    src = _hybrid(lm, "f16")  # the KV part of this state cannot go into an f32 cache; the recurrent part can
    blob = io.BytesIO()
    src.state_write(blob)
    dst = _hybrid(lm)
    dst.seq_rm(1)
    before = io.BytesIO()
    dst.state_write(before)
    assert isinstance(dst, HybridMemory)
    with pytest.raises(StateFileError, match="type_k"):
        dst.state_read(io.BytesIO(blob.getvalue()))
    after = io.BytesIO()
    dst.state_write(after)
    assert after.getvalue() == before.getvalue()


def test_a_hybrid_restore_whose_recurrent_part_is_damaged_changes_nothing(load):
    lm = load("hybrid-tiny")
    blob = io.BytesIO()
    _hybrid(lm).state_write(blob)
    b = bytearray(blob.getvalue())
    b[-10] ^= 0xFF  # inside the recurrent part (written last): its CRC fails
    dst = _hybrid(lm)
    dst.seq_rm(1)
    before = io.BytesIO()
    dst.state_write(before)
    with pytest.raises(StateFileError, match="checksum"):
        dst.state_read(io.BytesIO(bytes(b)))
    after = io.BytesIO()
    dst.state_write(after)
    assert after.getvalue() == before.getvalue()
