"""The memory plan: computed from shapes, it matches what the allocators really reserve, and refuses
a run that cannot fit before anything is allocated."""

import pytest
import torch

from engine.errors import ConfigError
from engine.loader import create_memory
from engine.memory.kv_cache import CacheSpec
from engine.memory.plan import GIB, MemoryPlan, check, plan


@pytest.mark.parametrize("allocator", ["pooled", "paged"])
@pytest.mark.parametrize("type_k, type_v", [("f32", "f32"), ("q8_0", "q4_0"), ("f16", "bf16")])
def test_the_planned_kv_is_what_a_pool_reserves(load, allocator, type_k, type_v):
    lm = load("llama-tiny")
    spec = CacheSpec(allocator=allocator, size=512, block_size=16, type_k=type_k, type_v=type_v, n_seq_max=2)
    mem = create_memory(lm, spec)
    assert plan(lm.config, spec).kv == mem.stats().reserved_bytes  # exact: the same row sizes


def test_disk_layers_count_against_the_disk_and_recurrent_state_per_slot(load):
    lm = load("llama-tiny")
    p = plan(lm.config, CacheSpec(size=256, offload="disk", offload_layers=1, n_seq_max=2))
    assert p.kv * 3 == p.kv_disk  # 1 of 4 layers on the device
    m = load("mamba-tiny")
    ps = plan(m.config, CacheSpec(size=256, n_seq_max=3))
    assert ps.kv == 0 and ps.state == 4 * m.config.recurrent_bytes_per_seq


def test_a_plan_larger_than_the_machine_is_refused_with_the_numbers(load):
    lm = load("llama-tiny")
    spec = CacheSpec(size=10**12, n_seq_max=4)
    with pytest.raises(ConfigError) as ei:
        check(plan(lm.config, spec, 512, lm.weight_bytes()), torch.device("cpu"), spec)
    msg = str(ei.value)
    assert msg.startswith("cache.size = 1000000000000: this run needs about") and "GiB of RAM available" in msg
    assert "memory_check=false" in msg and "\n" not in msg
    check(MemoryPlan(GIB // 4, 0, 0, 0, 0), torch.device("cpu"), spec)  # a quarter GiB fits anywhere we run
