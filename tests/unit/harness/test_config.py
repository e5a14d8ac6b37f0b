"""Bad configuration: one clear message naming the key, before any model loads."""

import pytest

from engine.errors import ConfigError
from harness import sweep


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was loaded during validation")

    monkeypatch.setattr("engine.loader.load_model", boom)


@pytest.mark.parametrize("argv, words", [
    (["foo=1"], ["foo", "Key"]),
    (["+foo=1"], ["unknown key 'foo'"]),
    (["+cache.foo=2"], ["cache.foo"]),
    (["model=nope"], ["unknown model 'nope'", "llama-tiny"]),
    (["workload=nope"], ["unknown workload 'nope'", "sharegpt"]),
    (["experiment=nope"], ["unknown experiment 'nope'", "default"]),
    (["allocator=slab"], ["allocator", "naive, pooled, paged"]),
    (["cache.type_k=q5"], ["cache.type_k", "q8_0"]),
    (["cache.size=abc"], ["cache.size", "Integer"]),
    (["cache.size=-3"], ["cache.size = -3"]),
    (["cache.offload=ssd"], ["cache.offload"]),
    (["cache.offload_layers=-1"], ["cache.offload_layers"]),
    (["allocator=paged", "cache.block_size=100"], ["cache.block_size = 100", "cache.size = 1024"]),
    (["parallel=2000", "cache.size=512"], ["parallel = 2000", "cache.size = 512"]),
    (["allocator=paged", "parallel=40", "cache.size=512", "cache.block_size=16"], ["parallel = 40", "32 blocks"]),
    (["-m", "parallel=4,2000", "cache.size=512"], ["parallel = 2000"]),
    (["-m", "experiment=allocators", "parallel=1,9999"], ["parallel = 9999"]),
    (["workload=churn", "workload.prompt_min=50", "workload.prompt_max=10"], ["workload.prompt_max"]),
    (["workload.arrival.process=gamma", "workload.arrival.cv=0"], ["workload.arrival.cv"]),
    (["model.dtype=int3"], ["model.dtype"]),
    (["threads=0"], ["threads"]),
    (["allocator=naive,pooled"], ["sweep"]),  # a sweep without -m is a Hydra error
])
def test_bad_values_name_the_key(argv, words):
    with pytest.raises(ConfigError) as ei:
        sweep.prevalidate(argv)
    msg = str(ei.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_sweep_points_cross_command_line_and_experiment():
    pts = sweep.sweep_points(["-m", "experiment=default", "parallel=2,4"])
    assert len(pts) == 3 * 2 * 2 * 2  # rounds (the experiment's repeats) x allocator x cache.size x parallel
    assert sum("allocator=naive" in p for p in pts) == 12
    # rounds are the outermost loop: every point once, then every point again (A B C A B C)
    assert [p[0] for p in pts] == ["repeat=0"] * 8 + ["repeat=1"] * 8 + ["repeat=2"] * 8
    assert [p[1:] for p in pts[:8]] == [p[1:] for p in pts[8:16]]
    # the command line wins over the experiment's sweep of the same key
    assert len(sweep.sweep_points(["-m", "experiment=default", "allocator=paged", "repeats=1"])) == 2


def test_good_configs_pass():
    assert sweep.prevalidate([]) == 1
    assert sweep.prevalidate(["-m", "experiment=allocators"]) == 9 * 3  # 3 rounds
    assert sweep.prevalidate(["-m", "experiment=kv_types"]) == 7 * 3  # 5 equal types + 2 K/V mixes, 3 rounds
