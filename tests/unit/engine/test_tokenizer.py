"""Our GGUF tokenizer against transformers' GGUF tokenizer conversion on the same file."""

import os

import pytest

from engine.gguf.presets import ensure_model, ensure_preset
from engine.gguf.reader import open_gguf
from engine.tokenizer import GGUFTokenizer

TEXTS = [
    "Hello world",
    "The memory cache of the model, 1234 tokens!",
    "héllo wörld ünïcode 日本語 🙂",
    "a  b   c\n\nnew line\ttab",
    "thequickbrownfox",
    "Peak latency: 85 ms -> 52 ms.",
    "It's what they'll do; you'd've guessed.",
]


def _files(conformance_dir):
    return {
        "conformance": conformance_dir / "llama-tiny-F32.gguf",
        "llama-tiny": ensure_preset("llama-tiny"),
        "qwen2-tiny": ensure_preset("qwen2-tiny"),
        "smollm2-135m": ensure_model("smollm2-135m"),  # a real vocabulary: gpt2 BPE, smollm pre-tokenizer
    }


@pytest.mark.parametrize("which", ["conformance", "llama-tiny", "qwen2-tiny", "smollm2-135m"])
def test_matches_transformers(conformance_dir, tmp_path, which):
    from transformers import AutoTokenizer

    path = _files(conformance_dir)[which]
    ours = GGUFTokenizer(open_gguf(path).tokenizer_metadata(), str(path))
    os.symlink(path, tmp_path / "m.gguf")
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for t in TEXTS:
        ids = ours.encode(t)
        assert ids == theirs(t)["input_ids"], t
        assert ours.decode(ids) == t


def test_bos_follows_the_file(conformance_dir):
    spm = GGUFTokenizer(open_gguf(conformance_dir / "llama-tiny-F32.gguf").tokenizer_metadata())
    assert spm.encode("hi")[0] == 1 and spm.encode("hi", add_bos=False)[0] != 1
    bpe = GGUFTokenizer(open_gguf(ensure_preset("qwen2-tiny")).tokenizer_metadata())
    assert not bpe.add_bos


def test_continuation_keeps_the_boundary_space():
    tok = GGUFTokenizer(open_gguf(ensure_preset("llama-tiny")).tokenizer_metadata())
    prompt, gen = tok.encode("the memory"), tok.encode("the memory cache", add_bos=False)[2:]
    assert tok.continuation(prompt, gen) == tok.decode(tok.encode("the memory cache"))[len("the memory"):]


def test_real_text_round_trips_and_special_tokens_are_single_tokens():
    from harness.corpus import default_text

    path = ensure_model("smollm2-135m")
    tok = GGUFTokenizer(open_gguf(path).tokenizer_metadata(), str(path))
    text = default_text()[:20000]
    assert tok.decode(tok.encode(text)) == text
    chat = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    ids = tok.encode(chat)
    start, end = tok.tokens.index("<|im_start|>"), tok.tokens.index("<|im_end|>")
    assert ids[0] == start and end in ids and ids.count(start) == 1  # one id each, as the GGUF lists them
    assert tok.decode(ids, skip_special=False) == chat
    assert [tok.tokens[i] for i in tok.encode("2024")] == ["2", "0", "2", "4"]  # smollm: every digit alone
