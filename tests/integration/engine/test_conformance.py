"""The llama.cpp-converted fixture: our logits and greedy tokens against llama.cpp's own."""

import numpy as np
import pytest

from engine.batch import Batch
from engine.loader import create_engine, create_memory
from tests.helpers.runs import generate


@pytest.mark.parametrize("i", [0, 1, 2])
@pytest.mark.parametrize("n_ubatch", [512, 48])
def test_logits_match_llamacpp(conformance_dir, load, i, n_ubatch):
    ref = np.load(conformance_dir / "llama-tiny-F32.llamacpp.npz")
    lm = load(conformance_dir / "llama-tiny-F32.gguf")
    tokens = ref[f"tokens_{i}"].tolist()
    eng = create_engine(lm, create_memory(lm, size=256), n_ubatch=n_ubatch)
    b = Batch()
    b.add_sequence(tokens, 0, output="all")
    logits = eng.decode(b).numpy()
    assert logits.shape == ref[f"logits_{i}"].shape
    assert np.abs(logits - ref[f"logits_{i}"]).max() < 1e-4


@pytest.mark.parametrize("i", [0, 1, 2])
def test_greedy_matches_llamacpp(conformance_dir, load, i):
    ref = np.load(conformance_dir / "llama-tiny-F32.llamacpp.npz")
    lm = load(conformance_dir / "llama-tiny-F32.gguf")
    tokens = ref[f"tokens_{i}"].tolist()
    eng = create_engine(lm, create_memory(lm, size=256))
    res = generate(eng, [tokens], 32)
    assert res.tokens[0] == ref[f"greedy_{i}"].tolist()


def test_hf_reference_agrees_too(conformance_dir, load):
    """The fixture's HF logits (original model, before conversion) are within the same bound."""
    ref = np.load(conformance_dir / "llama-tiny.hf.npz")
    lm = load(conformance_dir / "llama-tiny-F32.gguf")
    eng = create_engine(lm, create_memory(lm, size=256))
    b = Batch()
    b.add_sequence(ref["tokens_2"].tolist(), 0, output="all")
    assert np.abs(eng.decode(b).numpy() - ref["logits_2"]).max() < 1e-4
