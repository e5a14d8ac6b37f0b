"""Shared fixtures: the conformance fixtures beside the checkout, preset models, HF references."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KVBENCH_SHARED", REPO.parent / "shared"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    d = SHARED / "conformance"
    if not (d / "llama-tiny-F32.gguf").exists():
        pytest.fail(f"conformance fixtures not found in {d}; set KVBENCH_SHARED to the shared/ directory")
    return d


_loaded: dict = {}


@pytest.fixture(scope="session")
def load():
    """load(name_or_path) -> LoadedModel, cached for the session."""
    from engine.loader import load_model

    def _load(name, dtype="f32"):
        key = (str(name), dtype)
        if key not in _loaded:
            _loaded[key] = load_model(name, dtype=dtype)
        return _loaded[key]

    return _load
