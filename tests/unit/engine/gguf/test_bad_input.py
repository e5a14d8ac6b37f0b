"""Damaged and inconsistent files: one clear error from the family, before any large allocation."""

import struct
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFValueType

from engine.errors import KvbenchError, ModelFileError, UnsupportedError
from engine.gguf.presets import ensure_preset
from engine.loader import load_model
from tests.helpers import gguf_edit as ed
from tests.helpers.gguf_edit import random_block_bytes


@pytest.fixture(scope="module")
def good():
    return ensure_preset("llama-tiny")


def _cases(good, d):
    size = good.stat().st_size
    data = good.read_bytes()
    tok_off = ed.key_value_offset(good, "tokenizer.ggml.tokens")
    tt_off = ed.key_value_offset(good, "tokenizer.ggml.token_type")
    name_off = ed.key_value_offset(good, "general.name")
    type_off, _ = ed.tensor_info_offset(good, "blk.0.attn_q.weight")
    norm_type_off, _ = ed.tensor_info_offset(good, "blk.0.attn_norm.weight")
    q_embd_off = struct.unpack_from("<Q", data, ed.tensor_info_offset(good, "token_embd.weight")[0] + 4)[0]
    q8k = random_block_bytes(GGMLQuantizationType.Q8_K, 256, 256)
    (d / "truncated-data.gguf").write_bytes(data[: size // 2])
    (d / "truncated-kv.gguf").write_bytes(data[:200])
    (d / "empty.gguf").write_bytes(b"")
    (d / "magic.gguf").write_bytes(b"GGML" + data[4:])
    return {
        # name: (path, expected class, words the message must contain)
        "truncated-data": (d / "truncated-data.gguf", ModelFileError, ["truncated", "re-download"]),
        "truncated-kv": (d / "truncated-kv.gguf", ModelFileError, ["truncated"]),
        "empty": (d / "empty.gguf", ModelFileError, ["magic"]),
        "wrong-magic": (d / "magic.gguf", ModelFileError, ["magic", "not a GGUF"]),
        "version-1": (ed.patch(good, d / "v1.gguf", 4, "I", 1), UnsupportedError, ["version 1"]),
        "version-99": (ed.patch(good, d / "v99.gguf", 4, "I", 99), UnsupportedError, ["version 99"]),
        "absurd-tensor-count": (ed.patch(good, d / "tc.gguf", 8, "Q", 2**60), ModelFileError, ["tensors"]),
        "absurd-kv-count": (ed.patch(good, d / "kc.gguf", 16, "Q", 2**60), ModelFileError, ["metadata keys"]),
        "absurd-string-length": (ed.patch(good, d / "sl.gguf", name_off, "Q", 2**62), ModelFileError,
                                 ["general.name"]),
        "absurd-int-array": (ed.patch(good, d / "ia.gguf", tt_off + 4, "Q", 2**40), ModelFileError,
                             ["tokenizer.ggml.token_type"]),
        "absurd-string-array": (ed.patch(good, d / "sa.gguf", tok_off + 4, "Q", 2**40), ModelFileError,
                                ["tokenizer.ggml.tokens"]),
        "unknown-tensor-type": (ed.patch(good, d / "tt.gguf", type_off, "I", 99), UnsupportedError,
                                ["blk.0.attn_q.weight", "99"]),
        "unknown-arch": (ed.rewrite(good, d / "arch.gguf", arch="gpt-j"), UnsupportedError,
                         ["gpt-j", "general.architecture"]),
        "missing-key": (ed.rewrite(good, d / "key.gguf", drop_keys=["llama.block_count"]), ModelFileError,
                        ["llama.block_count"]),
        "shape-mismatch": (ed.rewrite(good, d / "shape.gguf", tensors={
            "blk.1.attn_k.weight": (np.zeros((32, 256), np.float32), None)}), ModelFileError,
            ["blk.1.attn_k.weight", "[256, 32]", "[256, 64]"]),
        "missing-tensor": (ed.rewrite(good, d / "mt.gguf", tensors={"blk.3.ffn_up.weight": None}), ModelFileError,
                           ["blk.3.ffn_up.weight", "missing"]),
        "undequantizable-type": (ed.rewrite(good, d / "q8k.gguf", tensors={
            "blk.0.attn_q.weight": (q8k, GGMLQuantizationType.Q8_K)}), UnsupportedError,
            ["blk.0.attn_q.weight", "Q8_K"]),
        "heads-not-dividing": (ed.rewrite(good, d / "heads.gguf", set_keys={
            "llama.attention.head_count_kv": (3, GGUFValueType.UINT32)}), ModelFileError, ["head_count_kv", "3"]),
        # found by the reliability campaign (tests/fuzz/gguf_fuzz.py)
        "name-not-utf8": (ed.patch(good, d / "name8.gguf", name_off + 8, "B", 0xFF), ModelFileError,
                          ["general.name", "UTF-8"]),
        "huge-block-count": (ed.patch(good, d / "blocks.gguf", ed.key_value_offset(good, "llama.block_count"), "I",
                                      352_334_179), ModelFileError, ["llama.block_count", "352334179", "4 blocks"]),
        "overlapping-tensors": (ed.patch(good, d / "overlap.gguf", type_off + 4, "Q", q_embd_off), ModelFileError,
                                ["overlap", "blk.0.attn_q.weight"]),
        "integer-tensor-type": (ed.patch(good, d / "i32.gguf", norm_type_off, "I", int(GGMLQuantizationType.I32)),
                                UnsupportedError, ["blk.0.attn_norm.weight", "I32"]),
    }


@pytest.fixture(scope="module")
def cases(good, tmp_path_factory):
    return _cases(good, tmp_path_factory.mktemp("bad"))


CASE_NAMES = [
    "truncated-data", "truncated-kv", "empty", "wrong-magic", "version-1", "version-99", "absurd-tensor-count",
    "absurd-kv-count", "absurd-string-length", "absurd-int-array", "absurd-string-array", "unknown-tensor-type",
    "unknown-arch", "missing-key", "shape-mismatch", "missing-tensor", "undequantizable-type", "heads-not-dividing",
    "name-not-utf8", "huge-block-count", "overlapping-tensors", "integer-tensor-type",
]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_load_raises_clear_error(cases, case):
    path, cls, words = cases[case]
    with pytest.raises(cls) as ei:
        load_model(path)
    msg = str(ei.value)
    assert "\n" not in msg
    assert str(path) in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), f"{w!r} not in {msg!r}"


@pytest.mark.parametrize("case", ["truncated-data", "absurd-int-array", "absurd-string-array", "unknown-arch",
                                  "shape-mismatch", "undequantizable-type"])
def test_cli_exits_nonzero_one_line_no_traceback(cases, case):
    path = cases[case][0]
    r = subprocess.run([sys.executable, "-m", "harness.cli", "generate", "--model", str(path), "--tokens", "1,2",
                        "-n", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert str(path) in r.stderr


def test_family():
    assert issubclass(ModelFileError, KvbenchError) and issubclass(UnsupportedError, KvbenchError)


def test_not_a_file(tmp_path):
    with pytest.raises(KvbenchError, match="no such file"):
        load_model(tmp_path / "nope.gguf")
    with pytest.raises(ModelFileError, match="directory"):
        load_model(tmp_path)


def test_gguf_v2_loads(good, tmp_path):
    """v2 and v3 share the layout kvbench reads (v3 only added big-endian files)."""
    lm = load_model(ed.patch(good, tmp_path / "v2.gguf", 4, "I", 2))
    assert lm.file.header.version == 2 and lm.config.n_layer == 4


def test_a_token_that_is_not_utf8_is_a_clear_error(good, tmp_path):
    off = ed.key_value_offset(good, "tokenizer.ggml.tokens") + 4 + 8 + 8  # item type, count, first length
    lm = load_model(ed.patch(good, tmp_path / "tok8.gguf", off, "B", 0xC0))
    with pytest.raises(ModelFileError, match="tokenizer.ggml.tokens.*UTF-8"):
        lm.tokenizer


def test_a_million_character_token_builds_in_linear_time(good, tmp_path):
    """merges_from_scores used to try every split of every token: O(length^2), hours for this token."""
    from tests.fuzz.gguf_fuzz import _long_token

    path = tmp_path / "long.gguf"
    path.write_bytes(_long_token(good.read_bytes(), 1_000_000))
    lm = load_model(path)
    assert len(lm.tokenizer.tokens[0]) == 1_000_000 and lm.tokenizer.encode("hello")
