"""The llamacpp backend (engine/llamacpp) against llama.cpp itself and against kvbench's own memory.

Runs in CI: .ci/run installs the ``llamacpp`` extra. Without it these tests fail with the install command.
"""

import json
import sys

import pytest
import torch

from engine.errors import ConfigError
from engine.gguf.reader import open_gguf
from engine.llamacpp import lib
from engine.llamacpp.engine import LlamaCppEngine
from engine.loader import create_engine, create_memory, load_model, resolve_model_path
from tests.integration.harness.test_sweep import SMALL, kvbench


@pytest.fixture(scope="module")
def tiny():
    path = resolve_model_path("llama-tiny")
    return path, open_gguf(path).config()


def _engine(tiny, **kw) -> LlamaCppEngine:
    path, cfg = tiny
    return LlamaCppEngine(path, cfg, **({"n_ctx": 256, "n_seq_max": 4} | kw))


def test_a_missing_extra_is_one_line_naming_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    lib.binding.cache_clear()
    try:
        with pytest.raises(ConfigError) as ei:
            lib.binding()
    finally:
        monkeypatch.undo()
        lib.binding.cache_clear()
    msg = str(ei.value)
    assert "\n" not in msg and "backend=llamacpp" in msg
    assert "pip install -c constraints.txt llama-cpp-python" in msg and "-DGGML_AMX_TILE=OFF" in msg
    assert "scripts/install.sh test,llamacpp" in msg


# One script of llama.cpp's verbs, run on llama.cpp and on kvbench's pooled memory (the same cell-pool
# semantics): (verb, args). "prefill"/"step" decode through the engines.
SCRIPT = [
    ("prefill", {0: list(range(1, 21))}),
    ("seq_cp", (0, 1, 0, 12)),  # a 12-token prefix shared
    ("seq_cp", (0, 2, -1, -1)),  # all of it
    ("step", {1: 7, 2: 8}),
    ("seq_rm", (0, 15, -1)),  # a tail
    ("seq_rm", (2, 5, 9)),  # a hole in the middle
    ("step", {0: 3, 1: 4}),
    ("prefill", {3: [5, 6, 7, 8]}),
    ("seq_keep", (1,)),
    ("step", {1: 9}),
    ("seq_rm", (1, -1, -1)),
]


def _run(engine, mem, op, args):
    if op == "prefill":
        engine.prefill(args)
    elif op == "step":
        engine.decode_step(args)
    else:
        getattr(mem, op)(*args)


@pytest.fixture(scope="module")
def torch_pooled(tiny):
    lm = load_model("llama-tiny")
    mem = create_memory(lm, size=256, type_k="f16", type_v="f16", n_seq_max=4)
    return create_engine(lm, mem), mem


def test_seq_verbs_keep_the_same_positions_and_cells_as_kvbench_pooled(tiny, torch_pooled):
    """After every verb, each sequence holds the same [pos_min, pos_max] in llama.cpp and in kvbench's pooled
    memory, and llama.cpp's used cells (as engine/llamacpp follows them) equal pooled's own count."""
    eng = _engine(tiny, type_k="f16", type_v="f16")
    teng, tmem = torch_pooled
    tmem.clear()
    mem = eng.memory
    try:
        for op, args in SCRIPT:
            _run(eng, mem, op, args)
            _run(teng, tmem, op, args)
            for s in range(4):
                assert (mem.seq_pos_min(s), mem.seq_pos_max(s)) == (tmem.seq_pos_min(s), tmem.seq_pos_max(s)), (op, s)
            st, tst = mem.stats(), tmem.stats()
            assert (st.used_cells, st.seq_tokens) == (tst.used_cells, tst.seq_tokens), op
    finally:
        eng.close()


@pytest.mark.parametrize("unified", [True, False])
def test_used_cells_agree_with_llamacpps_own_state_size(tiny, unified):
    """llama.cpp's saved state (llama_state_seq_get_size(ctx, -1): every used cell once) grows by the cell's K
    and V rows plus 8 bytes (its position and sequence count, llama-kv-cache.cpp state_write_meta) per used cell
    and by 4 bytes per sequence a cell belongs to. So between any two non-empty states of one stream layout
    the size difference is fixed by (used cells, tokens summed over sequences): if engine/llamacpp's count of
    used cells were wrong, the bytes would not add up."""
    eng = _engine(tiny, kv_unified=unified)
    mem = eng.memory
    per_cell = mem.bytes_per_token + 8
    seen = []
    try:
        for op, args in SCRIPT[:-1]:
            if not unified and op == "seq_cp" and args[3] != -1:
                continue  # across streams llama.cpp copies whole streams only
            _run(eng, mem, op, args)
            st = mem.stats()
            streams = sum(1 for h in mem.shadow.seqs if h) if not unified else 1  # non-empty streams
            seen.append((mem.seq_state_bytes(-1), st.used_cells, st.seq_tokens, streams))
        (s0, u0, t0, n0) = seen[0]
        hdr = None
        for s, u, t, n in seen[1:]:
            rest = (s - s0) - (u - u0) * per_cell - 4 * (t - t0)  # what a non-empty stream adds as a header
            if n == n0:
                assert rest == 0, (s, u, t, n)
            else:
                hdr = rest // (n - n0) if hdr is None else hdr
                assert rest == hdr * (n - n0) and hdr > 0
        assert max(u for _, u, _, _ in seen) > 20  # the script did share and free cells
    finally:
        eng.close()


@pytest.mark.parametrize("types", ["f32/f32", "f16/f16", "q8_0/q8_0", "q8_0/q4_0"])
@pytest.mark.parametrize("unified", [True, False])
def test_kv_bytes_equal_kvbench_pooled_to_the_byte(tiny, load, types, unified):
    """cache.size 1024 with 4 sequences: llama.cpp's KV buffer (n_cells x K and V rows, checked against the
    size it logs) equals kvbench's pooled reserved bytes at the same cells and types."""
    tk, tv = types.split("/")
    eng = _engine(tiny, n_ctx=1024, type_k=tk, type_v=tv, kv_unified=unified)
    try:
        pooled = create_memory(load("llama-tiny"), size=1024, type_k=tk, type_v=tv, n_seq_max=4)
        assert eng.memory.n_cells == 1024
        assert eng.memory.stats().reserved_bytes == pooled.stats().reserved_bytes
        assert eng.memory.bytes_per_token == pooled.bytes_per_token
        assert abs(eng.kv_buffer_bytes - pooled.stats().reserved_bytes) <= 0.005 * 2**20  # the log's 2 decimals
    finally:
        eng.close()


def test_llamacpp_rounds_cells_up_to_256_per_stream(tiny):
    """The difference a report must explain: n_ctx 1000 gives 1024 cells; 3 streams of 1000/3 give 3 x 512."""
    for unified, cells in ((True, 1024), (False, 3 * 512)):
        eng = _engine(tiny, n_ctx=1000, n_seq_max=3, kv_unified=unified)
        try:
            assert eng.memory.n_cells == cells and eng.n_ctx_requested == 1000
        finally:
            eng.close()


def test_logits_agree_with_kvbench_exact_on_the_same_file(tiny, load):
    """Two engines nobody tuned against each other, same weights (llama-tiny, F32) and f32 K/V: the next-token
    ranking agrees. Not an equality: llama.cpp's flash attention rounds Q and softmax products to f16 (ggml's
    CPU kernel), ~2^-11 relative; logits here are O(1), so differences of a few 1e-3 are that rounding."""
    eng = _engine(tiny, type_k="f32", type_v="f32")
    try:
        prompt = list(range(3, 40))
        a = eng.prefill({0: prompt})[0]
        lm = load("llama-tiny")
        b = create_engine(lm, create_memory(lm, size=256)).prefill({0: prompt})[0]
        assert a.shape == b.shape == (lm.config.n_vocab,)
        assert torch.allclose(a, b, atol=2e-2, rtol=0)
        top = torch.topk(b, 2).values
        if top[0] - top[1] > 4e-2:  # a clear winner cannot flip under 2e-2 of noise on each side
            assert a.argmax() == b.argmax()
    finally:
        eng.close()


def test_a_sweep_puts_both_backends_side_by_side(tmp_path, tiny):
    """The issue's command on llama-tiny: four ok points, equal KV bytes per parallelism, one report."""
    d = tmp_path / "multirun"
    r = kvbench(tmp_path, "run", "-m", "backend=torch,llamacpp", "allocator=pooled", "parallel=1,2",
                "cache.kv=f16/f16", f"hydra.sweep.dir={d}", *[a for a in SMALL if not a.startswith("parallel")])
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads(p.read_text()) for p in sorted(d.glob("*/record.json"))]
    assert [x["status"] for x in recs] == ["ok"] * 4
    by = {(x["config"]["backend"], x["config"]["parallel"]): x["metrics"] for x in recs}
    for p in (1, 2):
        t, c = by[("torch", p)], by[("llamacpp", p)]
        assert c["run.memory_kind"] == "llamacpp.unified" and c["requests.done"] == 4
        assert c["latency.tpot_ms.p50"] > 0 and c["memory.peak_rss_bytes"] > 0
        assert c["llamacpp.n_ctx_requested"] == 64
        # the longest sequence held 12 prompt + 5 decoded tokens (the 6th generated token is never decoded):
        # its saved state then, measured on a fresh context with the same settings, is the recorded peak
        ref = _engine(tiny, n_ctx=64, n_seq_max=p, type_k="f16", type_v="f16")
        try:
            ref.prefill({0: list(range(1, 18))})
            assert c["llamacpp.state_seq_peak_bytes"] == ref.memory.seq_state_bytes(0)
        finally:
            ref.close()
        # cache.size 64 -> llama.cpp's 256 cells: its reserved bytes are kvbench's pooled at 256 cells
        assert c["run.cache_size"] == 256
        assert c["memory.kv_reserved_peak_bytes"] == t["memory.kv_reserved_peak_bytes"] * 256 // 64
    report = (d / "report.md").read_text()
    assert "llamacpp.unified" in report and "| torch " in report


@pytest.mark.parametrize("args, words", [
    (["backend=llamacpp", "allocator=paged"], ["allocator = paged", "llamacpp.kv_unified"]),
    (["cache.kv=q5_0/q5_0"], ["cache.type_k = q5_0", "only backend=llamacpp"]),
    (["backend=llamacpp", "model.name=llama-7b"], ["memory-only", "torch"]),
])
def test_what_belongs_to_one_backend_is_a_clear_error_on_the_other(tmp_path, args, words):
    r = kvbench(tmp_path, "run", *args, f"hydra.run.dir={tmp_path / 'a'}", *SMALL)
    err, rec = r.stderr.strip(), tmp_path / "a" / "record.json"
    if rec.exists():  # the point ran and failed (the model is only known once opened): the record says why
        assert r.returncode == 1 and json.loads(rec.read_text())["status"] == "failed"
        err = json.loads(rec.read_text())["error"]
    else:  # refused before anything ran
        assert r.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    for w in words:
        assert w in err, err


def test_state_write_is_llamacpps_saved_sequence(tiny):
    """state_write writes what llama.cpp saves for a sequence (llama_state_seq_get_data), of the size it states."""
    import io

    eng = _engine(tiny)
    try:
        eng.prefill({0: list(range(1, 17))})
        f = io.BytesIO()
        eng.memory.state_write(f, 0)
        assert len(f.getvalue()) == eng.memory.seq_state_bytes(0) > 16 * eng.memory.bytes_per_token
    finally:
        eng.close()
