"""compute=fast: weights held in the file's GGUF types, and what that costs in accuracy.

Reference for the accuracy bounds: compute=exact on the same file (float32 on the dequantized
weights, itself checked against HF transformers and llama.cpp's logits elsewhere).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import kernels
from engine.batch import Batch
from engine.gguf.presets import build_preset, get_preset
from engine.loader import create_engine, create_memory, load_model
from engine.model import llama, weights
from engine.model.llama import TransformerBlock
from engine.model.weights import PackedWeight

TYPES = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1"}


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("typed")
    return {ft: build_preset(get_preset("llama-tiny"), d / f"llama-tiny-{ft}.gguf", file_type=ft) for ft in TYPES}


def _logits(lm, tokens, n_ubatch=512):
    eng = create_engine(lm, create_memory(lm, size=len(tokens) + 8), n_ubatch)
    b = Batch()
    b.add_sequence(tokens, 0, output="all")
    return eng.decode(b)


@pytest.mark.parametrize("ft", list(TYPES))
def test_fast_keeps_the_file_types(tiny_files, ft):
    """Matrices stay in the file's types (the writer falls back to F16 for rows that are not whole
    blocks, as llama.cpp's converter does; the 1-D norms are F32), and the bytes held are the file's
    tensor bytes, which the memory plan predicts from the header alone."""
    lm = load_model(tiny_files[ft], compute="fast")
    held = lm.weight_types()
    in_file = {t.tensor_type.name for t in lm.file.tensors.values() if len(t.shape) == 2}
    assert set(held) == in_file and TYPES[ft] in in_file, (held, in_file)
    tensor_bytes = sum(int(t.n_bytes) for t in lm.file.tensors.values())
    assert lm.weight_bytes() == tensor_bytes
    assert lm.file.planned_weight_bytes(lm.config, "fast", torch.float32) == tensor_bytes
    exact = load_model(tiny_files[ft], compute="exact")
    assert exact.weight_bytes() == exact.file.planned_weight_bytes(exact.config, "exact", torch.float32)
    if ft not in ("f16", "bf16"):
        assert any(isinstance(m, PackedWeight) for m in lm.model.modules())


def test_fast_on_f32_weights_is_float32(load):
    """An F32 file has nothing to pack: prefill runs the same float32 GEMMs as exact mode, decode-sized
    batches the kernel's float32 GEMV (the same products summed in another order), and the norms one
    native op (sum of squares in double). Bound: 7 matmuls per layer, each a K-term sum (K <= 688) off
    by ~sqrt(K) u relative, over 4 layers."""
    tokens = [1] + list(range(5, 60))
    fast_lm = load_model("llama-tiny", compute="fast")
    for n_ubatch in (8, 512):
        exact = _logits(load("llama-tiny"), tokens, n_ubatch)
        fast = _logits(fast_lm, tokens, n_ubatch)
        bound = 7 * 4 * 688**0.5 * 2.0**-24 * exact.abs().max().item()
        assert (exact - fast).abs().max().item() <= bound


def _kld_top1(exact: torch.Tensor, fast: torch.Tensor):
    p, q = torch.log_softmax(exact.double(), -1), torch.log_softmax(fast.double(), -1)
    return (p.exp() * (p - q)).sum(-1), exact.argmax(-1) == fast.argmax(-1)


def _flips_are_ties(exact: torch.Tensor, fast: torch.Tensor, agree: torch.Tensor) -> bool:
    """A top-1 change is only possible where exact's top two logits are closer than the perturbation
    can move them apart: margin < 2 max|fast - exact| at that position."""
    top2 = exact.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    moved = (fast - exact).abs().amax(-1)
    return bool((margin[~agree] < 2 * moved[~agree]).all())


@pytest.fixture(scope="module")
def smollm():
    from harness.corpus import load_text  # real English text (Python's pydoc topics)

    exact = load_model("smollm2-135m", compute="exact")
    fast = load_model("smollm2-135m", compute="fast")
    text, _ = load_text(None)
    ids = exact.tokenizer.encode(text[:60000])
    chunks = [[exact.config.bos_id] + ids[i * 255:(i + 1) * 255] for i in range(3)]
    return exact, fast, chunks


def test_real_model_decode_path_matches_exact(smollm):
    """Batches of up to 16 rows (decode) take activations as 16-bit fixed point per 32 values (q16,
    engine/model/weights.py): each x moves by at most 1.5 max|x| / 32512 of its block (typically a third
    of that), where llama.cpp's int8 moves it by max|x| / 254. KLD grows with the square of the
    perturbation: int8 activations measured KLD 3.7e-3 here (docs/engine.md), so q16 should land between
    3.7e-3 x (254 / (3 x 32512))^2 = 5.7e-8 and 3.7e-3 x (1.5 x 254 / 32512)^2 = 5.1e-7 (measured 3.5e-7).
    Bound: 2e-6. Top-1 may change only at near ties (margin < 2x how far the position's logits moved;
    asserted): those are 11 of the 768 positions here (logits move by up to 0.027), and 0 (AVX-512 build)
    or 1 (AVX2 build) of them flipped, so agreement is held at 99%. The integer dots are exact on any CPU;
    the float32 sums around them, and where a format's minimum meets x or its q16 copy, differ by path."""
    exact, fast, chunks = smollm
    assert fast.weight_types().keys() == {"Q4_1", "Q8_0"}  # the file's own types, nothing dequantized
    kl, agree = [], []
    for ids in chunks:
        a, b = _logits(exact, ids, n_ubatch=16), _logits(fast, ids, n_ubatch=16)
        k, t = _kld_top1(a, b)
        assert _flips_are_ties(a, b, t)
        kl.append(k), agree.append(t)
    assert torch.cat(kl).mean() < 2e-6
    assert torch.cat(agree).double().mean() >= 0.99


def test_real_model_prefill_path_quality(smollm):
    """Larger batches (prefill) run a bf16 GEMM: weights and activations rounded to 8 significant bits,
    relative error up to 2**-9 each per product. On SmolLM2 that moves the logits by ~0.2 (median of
    the per-position max, on logits up to ~41, 30 layers deep), and KLD ~ Var_p(delta)/2 comes to
    6.5e-4 .. 7.6e-4 per 256-token chunk. Bounds: the mean under 1e-3 (the issue's figure), and every
    top-1 change at a near tie (measured margins 1e-4 .. 0.25, all below the perturbation). Top-1
    agreement measured 97.7-98.8% per chunk, held here at 97%. Why those figures carry to another CPU:
    the bf16 roundings of weights and activations are round-to-nearest-even of the same float32 values
    on any CPU; only the GEMM's float32 accumulation order differs (oneDNN with or without AMX), a
    2**-24-level change against the 2**-9-level rounding that moves the logits."""
    exact, fast, chunks = smollm
    kl, agree = [], []
    for ids in chunks:
        a, b = _logits(exact, ids), _logits(fast, ids)
        k, t = _kld_top1(a, b)
        assert _flips_are_ties(a, b, t)
        kl.append(k), agree.append(t)
    kld = torch.cat(kl).mean().item()
    top1 = torch.cat(agree).double().mean().item()
    assert kld < 1e-3, kld
    assert top1 >= 0.97, top1


@pytest.mark.parametrize("allocator", ["naive", "paged"])
def test_allocators_agree_in_fast_mode(tiny_files, allocator):
    """Fast mode's weights do not touch the KV memory: every allocator gives pooled's greedy tokens."""
    from engine.runtime.scheduler import Request, Scheduler
    from tests.helpers.runs import run_all

    lm = load_model(tiny_files["q4_0"], compute="fast")

    def tokens(a):
        rng = np.random.default_rng(5)
        reqs = [Request(i, [1] + rng.integers(3, 1000, int(rng.integers(3, 60))).tolist(), 12) for i in range(6)]
        eng = create_engine(lm, create_memory(lm, allocator=a, size=512, block_size=16, n_seq_max=4))
        return [r.tokens for r in run_all(Scheduler(eng, 4), reqs)]

    assert tokens(allocator) == tokens("pooled")


def _decode_run(lm, level: str, **memory) -> list[torch.Tensor]:
    """Prefill three sequences (20+ tokens: the module path), then decode steps of 3 and 1 tokens and a 5-token
    continuation (one output row), run at ``level``: "stack" (one native op for the blocks and the head,
    Transformer.fuse), "blocks" (two native ops per block around the memory) or "modules" (torch modules)."""
    if level != "stack":
        lm.model.native = None
    if level == "modules":
        for m in lm.model.modules():
            if isinstance(m, TransformerBlock):
                m.native = None
    eng = create_engine(lm, create_memory(lm, **{"size": 256, "n_seq_max": 3, **memory}))
    rng = np.random.default_rng(3)
    n_vocab = lm.config.n_vocab
    out = [eng.prefill({s: [1] + rng.integers(3, n_vocab, 20 + 7 * s).tolist() for s in range(3)})]
    nxt = {s: int(t) for s, t in zip(range(3), out[-1].argmax(-1), strict=True)}
    for _ in range(4):
        out.append(eng.decode_step(nxt))
        nxt = {s: int(t) for s, t in zip(nxt, out[-1].argmax(-1), strict=True)}
    out.append(eng.decode_step({1: nxt[1]}))
    out.append(eng.prefill({2: rng.integers(3, n_vocab, 5).tolist()}))  # a short ubatch: logits of its last row only
    return out


@pytest.mark.parametrize("ft", ["f16", "q8_0", "q4_0", "q4_1", "qwen2-q4_0", "q4_0-mmap"])
def test_fused_decode_equals_the_module_path(tiny_files, tmp_path, ft):
    """Decode-sized ubatches run each block as two native ops (TransformerBlock.fuse): the same operations in
    the same order, so logits equal the module path's bit for bit (qwen2-tiny: q/k/v biases, NEOX rope). Q4_0,
    Q4_1 and Q8_0 matrices with whole 16-row tiles are interleaved where the build has that kernel (PackedWeight.interleave)."""
    path = (build_preset(get_preset("qwen2-tiny"), tmp_path / "qwen2-tiny-q4_0.gguf", file_type="q4_0")
            if ft.startswith("qwen2") else tiny_files[ft.removesuffix("-mmap")])
    mmap = ft.endswith("mmap")  # q, k and v stay three views of the mapped file: the fused op takes them as parts
    lm = load_model(path, compute="fast", mmap=mmap)
    assert all(m.native is not None for m in lm.model.modules() if isinstance(m, TransformerBlock))
    packed = [m for m in lm.model.modules() if isinstance(m, PackedWeight)]
    if mmap:
        assert all(len(b.native.wqkv) == 3 for b in lm.model.modules() if isinstance(b, TransformerBlock))
        assert not any(m.ktype in kernels.X16.values() for m in packed)  # never a copy of mapped pages
    elif ft.endswith(("q4_0", "q4_1", "q8_0")):
        assert all((m.ktype in kernels.X16.values()) == (kernels.x16_available() and m.n % 16 == 0) for m in packed)
    assert lm.model.native is not None  # every block fused: the whole stack is one op at decode
    stack = _decode_run(lm, "stack")
    for level in ("blocks", "modules"):
        other = _decode_run(load_model(path, compute="fast", mmap=mmap), level)
        for f, p in zip(stack, other, strict=True):
            assert torch.equal(f, p), level


def test_fused_decode_past_the_first_angle_table(tiny_files):
    """The one-op forward takes rope's angles from tables grown 256 positions at a time (qmm.cpp, DecodeStack):
    decode steps at positions 299-303 and, in a second sequence, 530-531 (two more growths, one of them a jump)
    give the module path's logits bit for bit."""
    runs = []
    for level in ("stack", "modules"):
        lm = load_model(tiny_files["q4_0"], compute="fast")
        if level == "modules":
            lm.model.native = None
            for m in lm.model.modules():
                if isinstance(m, TransformerBlock):
                    m.native = None
        eng = create_engine(lm, create_memory(lm, size=1024, n_seq_max=2))
        rng = np.random.default_rng(5)
        n_vocab = lm.config.n_vocab
        out = [eng.prefill({0: rng.integers(3, n_vocab, 299).tolist(), 1: rng.integers(3, n_vocab, 530).tolist()})]
        nxt = {s: int(t) for s, t in zip((0, 1), out[-1].argmax(-1), strict=True)}
        for _ in range(2):
            out.append(eng.decode_step(nxt))
            nxt = {s: int(t) for s, t in zip(nxt, out[-1].argmax(-1), strict=True)}
        for _ in range(3):
            out.append(eng.decode_step({0: nxt[0]}))
            nxt[0] = int(out[-1][0].argmax())
        runs.append(out)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("ft", ["q4_0", "q8_0", "q4_0-mmap"])
def test_packed_matrices_in_huge_pages(tiny_files, monkeypatch, ft):
    """A fast-mode load moves every packed matrix into one buffer of huge pages (weights.place_in_huge_pages), not
    over a mapped file; the logits equal a load that leaves them where the reader put them, bit for bit."""
    mmap = ft.endswith("mmap")
    lm = load_model(tiny_files[ft.removesuffix("-mmap")], compute="fast", mmap=mmap)
    packed = [m for m in lm.model.modules() if isinstance(m, PackedWeight)]
    bases = {m.data.untyped_storage().data_ptr() for m in packed}
    if mmap:
        assert len(bases) > 1  # views of the mapped file, left where they are
    elif weights.HAS_HUGE_PAGES:
        assert len(bases) == 1 and packed[0].data.data_ptr() % weights.HUGE_PAGE == 0
    monkeypatch.setattr(llama, "place_in_huge_pages", lambda ws: 0)
    plain = load_model(tiny_files[ft.removesuffix("-mmap")], compute="fast", mmap=mmap)
    assert len({m.data.untyped_storage().data_ptr() for m in plain.model.modules() if isinstance(m, PackedWeight)}) > 1
    for a, b in zip(_decode_run(lm, "stack"), _decode_run(plain, "stack"), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("memory", [dict(type_k="f16", type_v="f16"), dict(type_k="bf16", type_v="f32"),
                                    dict(allocator="paged", block_size=16, type_k="f16", type_v="f16"),
                                    dict(type_k="q8_0", type_v="q8_0"), dict(allocator="naive")])
def test_fused_decode_over_memories(tiny_files, memory):
    """The stack and the per-block ops read and write the memory's own storage where it is float rows on the
    device (KVStorage: pooled runs and paged index lists, f16 / bf16 rows), and go through store / attn_inputs
    where it is not (a quantized cache, naive's per-sequence tensors): every way gives the module path's bits."""
    path = tiny_files["q4_0"]
    runs = {level: _decode_run(load_model(path, compute="fast"), level, **memory)
            for level in ("stack", "blocks", "modules")}
    for level in ("blocks", "modules"):
        for f, p in zip(runs["stack"], runs[level], strict=True):
            assert torch.equal(f, p), level


@pytest.mark.parametrize("model", ["mamba-tiny", "hybrid-tiny", "granite-hybrid-tiny", "rwkv7-tiny"])
def test_fast_mode_on_recurrent_models(tmp_path, model):
    """Q8_0 files of the recurrent and hybrid presets in fast mode (packed matrices, q16 activations at decode
    sizes, bf16 at prefill) against exact mode on the same file: the fast-mode target of 1e-3 mean KL divergence
    holds (measured: 1e-9 decode-sized, 3e-5 prefill on rwkv7-tiny), and a next token changes only where exact
    mode's top two were within what the perturbation moved."""
    path = build_preset(get_preset(model), tmp_path / f"{model}-q8_0.gguf", file_type="q8_0")
    tokens = [1] + list(range(5, 100))
    exact, fast = load_model(path, compute="exact"), load_model(path, compute="fast")
    assert any(isinstance(m, PackedWeight) for m in fast.model.modules())
    for n_ubatch in (8, 512):
        e, f = _logits(exact, tokens, n_ubatch), _logits(fast, tokens, n_ubatch)
        kld, agree = _kld_top1(e, f)
        assert kld.mean().item() < 1e-3 and _flips_are_ties(e, f, agree), (n_ubatch, kld.mean().item())
