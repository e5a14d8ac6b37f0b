"""Cache element types and storage tiers, end to end through the model."""

import os

import numpy as np
import pytest
import torch

from engine.batch import Batch
from engine.loader import create_engine, create_memory

TOKENS = [1] + np.random.default_rng(0).integers(3, 1000, 255).tolist()


def _logits(lm, **cache):
    eng = create_engine(lm, create_memory(lm, size=512, **cache), n_ubatch=64)
    b = Batch()
    b.add_sequence(TOKENS, 0, output="all")
    return eng.decode(b), eng.memory


def test_logit_error_grows_as_the_cache_type_shrinks(load):
    """Measured on llama-tiny (see the issue note): max |d| f16 3.8e-4, bf16 2.9e-3, q8_0 1.0e-2, q4_0 0.19."""
    lm = load("llama-tiny")
    ref, _ = _logits(lm)
    bound = {"f16": 2e-3, "bf16": 1e-2, "q8_0": 5e-2, "q4_0": 0.6}
    mean = {}
    for t, b in bound.items():
        lg, mem = _logits(lm, type_k=t, type_v=t)
        d = (lg - ref).abs()
        assert 0 < d.max().item() < b, t
        mean[t] = d.mean().item()
    assert mean["f16"] < mean["bf16"] < mean["q8_0"] < mean["q4_0"]


def test_mixed_k_and_v_types_and_sizes(load):
    lm = load("llama-tiny")
    _, mem = _logits(lm, type_k="q8_0", type_v="q4_0")
    n = lm.config.n_layer * 512
    assert mem.memory_breakdown() == {"k.device": n * 64 // 32 * 34, "v.device": n * 64 // 32 * 18}


@pytest.mark.parametrize("allocator", ["pooled", "paged", "naive"])
@pytest.mark.parametrize("offload, offload_layers", [("host", 0), ("disk", 0), ("disk", 2)])
def test_offload_tiers_give_identical_logits(load, tmp_path, monkeypatch, allocator, offload, offload_layers):
    monkeypatch.setenv("KVBENCH_OFFLOAD_DIR", str(tmp_path))
    lm = load("llama-tiny")
    ref, _ = _logits(lm, allocator=allocator)
    lg, mem = _logits(lm, allocator=allocator, offload=offload, offload_layers=offload_layers)
    assert torch.equal(lg, ref)
    bd = mem.memory_breakdown()
    tiers = {k.split(".")[1] for k in bd if bd[k]}
    assert tiers == ({offload} if offload_layers == 0 else {"device", offload})
    if offload_layers:
        per_layer = bd[f"k.{offload}"] // (lm.config.n_layer - offload_layers)
        assert bd["k.device"] == offload_layers * per_layer
    del mem
    assert os.listdir(tmp_path) == []  # disk storage never has a name in the directory


def test_unsupported_combinations_name_the_key(load):
    from engine.errors import ConfigError

    lm = load("llama-tiny")
    for kw, key in [(dict(type_k="q5_0"), "type_k"), (dict(offload="ssd"), "cache.offload"),
                    (dict(offload="disk", offload_layers=-1), "cache.offload_layers"),
                    (dict(allocator="slab"), "cache.allocator"), (dict(size=-3), "cache.size"),
                    (dict(allocator="paged", size=100, block_size=16), "cache.block_size")]:
        with pytest.raises(ConfigError, match=key):
            create_memory(lm, **kw)
