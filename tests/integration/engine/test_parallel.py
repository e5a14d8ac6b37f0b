"""N sequences decoded together give the same logits as each decoded alone."""

import numpy as np
import pytest
import torch

from engine.loader import create_engine, create_memory


def _run(lm, prompts, n_steps, together: bool, allocator: str = "pooled"):
    """Greedy-decode; returns per sequence the list of logits rows (prefill last + each step)."""
    out = {s: [] for s in range(len(prompts))}
    groups = [list(range(len(prompts)))] if together else [[s] for s in range(len(prompts))]
    for group in groups:
        eng = create_engine(lm, create_memory(lm, allocator=allocator, size=512, n_seq_max=len(prompts)), n_ubatch=32)
        logits = eng.prefill({s: prompts[s] for s in group})
        nxt = {}
        for s, row in zip(group, logits):
            out[s].append(row)
            nxt[s] = int(row.argmax())
        for _ in range(n_steps):
            logits = eng.decode_step(nxt)
            for s, row in zip(group, logits):
                out[s].append(row)
                nxt[s] = int(row.argmax())
    return out


@pytest.mark.parametrize("model", ["llama-tiny", "qwen2-tiny", "mistral-swa-tiny"])
def test_together_equals_alone(load, model):
    lm = load(model)
    g = np.random.default_rng(0)
    prompts = [[1] + g.integers(3, 1000, n).tolist() for n in (5, 40, 90, 17)]
    alone = _run(lm, prompts, 24, together=False)
    together = _run(lm, prompts, 24, together=True)
    for s in alone:
        a, b = torch.stack(alone[s]), torch.stack(together[s])
        assert (a - b).abs().max().item() < 1e-5, f"sequence {s}"
