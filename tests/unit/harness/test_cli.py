"""kvbench subcommands: JSON shapes, files written, errors as one line with exit status 2."""

import json

import numpy as np
import pytest

from harness.cli import main


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_json(capsys):
    r = _json(capsys, ["generate", "--tokens", "1,5,9", "-n", "6", "--json", "--ignore-eos"])
    assert r["prompt_tokens"] == [1, 5, 9] and len(r["tokens"]) == 6
    assert r["n_prefill_tokens"] == 3 and r["n_decode_tokens"] == 5
    assert r["prefill_tps"] > 0 and r["decode_tps"] > 0 and isinstance(r["text"], str)


def test_generate_prompt_text_and_sampling_seeded(capsys):
    argv = ["generate", "-p", "the memory", "-n", "8", "--temperature", "0.9", "--top-k", "20", "--seed", "3",
            "--json", "--ignore-eos"]
    a, b = _json(capsys, argv), _json(capsys, argv)
    assert a["tokens"] == b["tokens"]
    assert a["prompt_tokens"][0] == 1  # BOS, as the GGUF says


def test_logits_writes_npy(tmp_path, capsys, load):
    out = tmp_path / "l.npy"
    r = _json(capsys, ["logits", "--tokens", "1,2,3,4", "--out", str(out), "--json"])
    arr = np.load(out)
    assert arr.dtype == np.float32 and arr.shape == (4, 1000) and r["shape"] == [4, 1000]


def test_tokenize(capsys):
    r = _json(capsys, ["tokenize", "--text", "Hello world", "--json"])
    assert r["tokens"][0] == 1 and r["pieces"][0] == "<s>" and len(r["tokens"]) == len(r["pieces"])


def test_info(capsys):
    r = _json(capsys, ["info", "--model", "qwen2-tiny", "--json"])
    assert r["architecture"] == "qwen2" and r["tied_output"] and r["rope"]["type"] == "neox"
    # 4 layers x (64 K + 64 V values) x 4 bytes for f32; q8_0 packs 32 values in 34 bytes
    assert r["kv_bytes_per_token"]["f32"] == 2048 and r["kv_bytes_per_token"]["q8_0"] == 4 * 128 * 34 / 32


@pytest.mark.parametrize("argv, words", [
    (["generate", "--model", "nope", "-p", "x"], ["nope", "preset"]),
    (["generate", "--tokens", "1,x"], ["--tokens"]),
    (["generate", "--tokens", "1,99999"], ["99999", "vocabulary"]),
    (["generate", "--tokens", "1", "--device", "cuda:0"], ["cuda"]),
    (["generate", "--tokens", "1", "--temperature", "-1"], ["temperature"]),
    (["generate", "--tokens", "1", "--threads", "0"], ["--threads"]),
    (["generate", "--tokens", "1,2,3,4,5", "-n", "8", "--cache-size", "4", "--no-warmup"], ["failed", "raise cache.size"]),
    (["generate", "--model", "llama-7b", "--tokens", "1"], ["shape-only"]),
])
def test_errors_are_one_line(capsys, argv, words):
    import torch

    if "cuda:0" in argv and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")  # the error path needs a machine without CUDA
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kvbench generate: error:")
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("allocator", ["naive", "pooled", "paged"])
def test_generate_parallel_prints_breakdown_and_stats(capsys, allocator):
    r = _json(capsys, ["generate", "--tokens", ",".join(["1"] + [str(5 + i) for i in range(40)]), "-n", "5",
                       "--parallel", "3", "--allocator", allocator, "--ignore-eos", "--json"])
    assert [s["status"] for s in r["sequences"]] == ["done"] * 3
    assert r["allocator"] == allocator and r["memory_breakdown"]["weights"] > 0
    assert {"k.device", "v.device"} <= set(r["memory_breakdown"])
    st = r["stats"]
    assert st["live_bytes"] <= st["reserved_bytes"] and st["n_seqs"] == 3 and "preemptions" in st
    if allocator == "naive":
        assert r["prefix_saved_bytes"] == 0
    else:  # 41-token prompt: pooled shares all of it, paged its two full blocks
        assert r["prefix_saved_bytes"] > 0


def test_generate_parallel_sampling_differs_per_copy(capsys):
    r = _json(capsys, ["generate", "-p", "the memory", "-n", "10", "--parallel", "3", "--temperature", "1.0",
                       "--json", "--ignore-eos"])
    assert len({tuple(s["tokens"]) for s in r["sequences"]}) == 3


def test_generate_with_quantized_offloaded_cache(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_OFFLOAD_DIR", str(tmp_path))
    r = _json(capsys, ["generate", "--tokens", "1,5,9", "-n", "4", "--type-k", "q8_0", "--type-v", "q4_0",
                       "--offload", "disk", "--offload-layers", "1", "--json"])
    bd = r["memory_breakdown"]
    assert bd["k.device"] * 3 == bd["k.disk"] and bd["v.device"] * 3 == bd["v.disk"]  # 1 of 4 layers on the device


def test_logits_with_each_allocator_agree(tmp_path, capsys):
    outs = []
    for a in ("naive", "pooled", "paged"):
        out = tmp_path / f"{a}.npy"
        _json(capsys, ["logits", "--tokens", "1,2,3,4,5,6", "--allocator", a, "--out", str(out), "--json"])
        outs.append(np.load(out))
    assert np.abs(outs[0] - outs[1]).max() < 1e-5 and np.abs(outs[2] - outs[1]).max() < 1e-5


def test_plan_from_metadata_alone(capsys):
    """The issue's command on the llama-7b shape (no weights): f16 weights 12.6 GiB, f16 K/V 512 KiB per token,
    so 2 GiB per 4096-token sequence; JSON carries max_sequences per allocator and the longest context."""
    r = _json(capsys, ["plan", "--model", "llama-7b", "--memory", "24GiB", "--context", "4096", "--parallel", "2",
                       "--json"])
    assert r["weights_bytes"] == 6_738_415_616 * 2 and r["kv_bytes_per_token"] == 512 * 1024
    assert set(r["max_sequences"]) == {"pooled", "paged", "naive"}
    free = 24 * 2**30 - r["weights_bytes"] - r["runtime_floor_bytes"]
    assert 0 < r["max_sequences"]["pooled"] <= free // (2 * 2**30)  # activations take their share too
    assert r["max_context"]["pooled"] >= 4096  # 2 sequences fit where the plan fits more at 4096
    g = _json(capsys, ["plan", "--model", "granite-4-h-tiny", "--memory", "24GiB", "--context", "4096", "--json"])
    assert g["state_bytes_per_sequence"] > 0 and g["max_sequences"]["pooled"] > r["max_sequences"]["pooled"]


@pytest.mark.parametrize("argv, words", [
    (["plan", "--memory", "lots", "--context", "10"], ["--memory", "24GiB"]),
    (["plan", "--memory", "1GiB", "--context", "0"], ["--context 0"]),
    (["plan", "--model", "nope", "--memory", "1GiB", "--context", "10"], ["nope"]),
])
def test_plan_errors_are_one_line(capsys, argv, words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kvbench plan: error:")
    assert all(w in err for w in words), err


def test_sweep_progress_says_how_far_and_how_long():
    from harness.sweep import progress_line

    assert progress_line(0, 36, 0.0) == "[0/36, 0s elapsed]"
    assert progress_line(5, 36, 100.0) == "[5/36, 1m40s elapsed, about 10m20s left]"
    assert progress_line(10, 36, 100.0, measured=5) == "[10/36, 1m40s elapsed, about 8m40s left]"  # 5 were reused
    assert progress_line(36, 36, 700.0) == "[36/36, 11m40s elapsed]"
