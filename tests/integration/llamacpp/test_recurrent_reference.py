"""The recurrent and hybrid presets against llama.cpp itself: the same GGUF files, read and run by the two
engines, give the same logits. llama.cpp is the second reference next to HF transformers (test_recurrent.py):
it reads what kvbench's writers wrote as its own converter would have, which HF never sees.

llama.cpp runs with f32 K/V and without flash attention (which rounds through f16), so both sides compute in
float32 and only summation order differs. Bound: a float32 dot product of length n is off by at most about
n eps relative to the sum of |terms|; the longest here is d_inner = 256 (2^8 x 2^-23 = 3e-5 per layer on the
scale of its inputs); with RMS norms re-scaling every layer that does not compound, and 4 layers plus the
head stay under 1e-4 of the largest logit. Measured: 4e-7 (Granite), 1.2e-6 (Jamba), 5e-7 (Mamba-1), relative.
"""

import numpy as np
import pytest
import torch

from engine.batch import Batch
from engine.llamacpp import lib
from engine.loader import create_engine, create_memory, resolve_model_path

GGML_TYPE_F32 = 0


@pytest.mark.parametrize("model", ["mamba-tiny", "hybrid-tiny", "granite-hybrid-tiny", "rwkv7-tiny"])
@pytest.mark.parametrize("n_ubatch", [512, 48])  # 48: llama.cpp carries the state across ubatches too
def test_logits_equal_llamacpp(load, model, n_ubatch):
    llama_cpp = lib.binding()  # without the extra: a ConfigError naming the install command
    prompt = [1] + np.random.default_rng(3).integers(3, 1000, 199).tolist()
    llm = llama_cpp.Llama(model_path=str(resolve_model_path(model)), n_ctx=256, n_batch=512, n_ubatch=n_ubatch,
                          logits_all=True, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False,
                          n_threads=2, verbose=False)
    try:
        llm.eval(prompt)
        ref = torch.from_numpy(np.array(llm.scores[: len(prompt)], dtype=np.float32))
    finally:
        llm.close()
    lm = load(model)
    b = Batch()
    b.add_sequence(prompt, 0, output="all")
    ours = create_engine(lm, create_memory(lm, size=256), n_ubatch=n_ubatch).decode(b)
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), f"{model}: {err:.3g} vs max |logit| {ref.abs().max().item():.3g}"
