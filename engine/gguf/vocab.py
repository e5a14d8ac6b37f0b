"""Tokenizer blocks for presets: a real vocabulary, trained, not a placeholder list.

Presets need a tokenizer that behaves like a real one (multi-character pieces, byte fallback,
special tokens) without downloading anything. We train a BPE vocabulary with the
``tokenizers`` library on a synthetic corpus drawn from a fixed seed, then export it in the
two layouts llama.cpp reads:

- ``llama`` (SentencePiece): <unk> <s> </s>, 256 byte-fallback tokens <0xXX>, then pieces
  with scores that decrease in merge order (SPM merges the highest-scoring pair first).
- ``gpt2`` (byte-level BPE): pieces in GPT-2's byte-to-unicode spelling plus a merges list,
  then control tokens.

When the corpus cannot support the requested size, the rest is filled with ``<unused_N>``
tokens of type UNUSED, as real vocabularies reserve slots.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from gguf import TokenType
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

_COMMON = (
    "the of and to in is was that for it with as on be at by this had not are but from or have an they "
    "which one you were her all she there would their we him been has when who will more no if out so said "
    "what up its about into than them can only other new some could time these two may then do first any my "
    "now such like our over man me even most made after also did many before must through back years where "
    "much your way well down should because each just those people how too little state good very make world "
    "still own see men work long get here between both life being under never day same another know while last "
    "might us great old year off come since against go came right used take three memory cache token model "
    "layer attention sequence batch block pool cell head value key query page alloc free fragment latency peak"
).split()
_ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "ch", "sh", "th", "st", "tr", "br", "pl", "gr", "cl", "fr", "sp"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "ie", "y"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ck", "ng"]


def _corpus(seed: int, n_words: int, n_lexicon: int) -> list[str]:
    """Sentences over a Zipf-distributed lexicon of English words and pseudo-words."""
    rng = np.random.default_rng(seed)
    lexicon = list(_COMMON)
    seen = set(lexicon)
    while len(lexicon) < n_lexicon:
        n_syl = int(rng.integers(1, 4))
        w = "".join(
            _ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))] + _CODAS[rng.integers(len(_CODAS))]
            for _ in range(n_syl)
        )
        if w and w not in seen:
            seen.add(w)
            lexicon.append(w)
    ranks = np.arange(1, len(lexicon) + 1, dtype=np.float64)
    p = 1.0 / ranks**1.05
    p /= p.sum()
    words = np.asarray(lexicon, dtype=object)[rng.choice(len(lexicon), size=n_words, p=p)]
    lines, i = [], 0
    while i < n_words:
        n = int(rng.integers(4, 16))
        ws = list(words[i : i + n])
        i += n
        ws[0] = ws[0].capitalize()
        if rng.random() < 0.2:
            ws.insert(int(rng.integers(len(ws))), str(int(rng.integers(0, 10000))))
        lines.append(" ".join(ws) + (", " if rng.random() < 0.3 else ". "))
    return lines


def _train(pre, vocab_size: int, alphabet: list[str], seed: int) -> tuple[list[str], list[tuple[str, str]]]:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False, special_tokens=[])
    n_words = min(400_000, max(20_000, 40 * vocab_size))
    tk.train_from_iterator(_corpus(seed, n_words, n_lexicon=max(300, vocab_size * 2)), trainer=trainer)
    model = json.loads(tk.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    base = sorted((t for t, i in model["vocab"].items() if len(t) == 1), key=lambda t: model["vocab"][t])
    return base, merges


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "llama" or "gpt2"
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    bos_id: int
    eos_id: int
    unk_id: int | None
    add_bos: bool


def spm_vocab(n_vocab: int, seed: int) -> Vocab:
    """SentencePiece-style vocabulary (tokenizer.ggml.model = "llama")."""
    specials = ["<unk>", "<s>", "</s>"]
    byte_toks = [f"<0x{b:02X}>" for b in range(256)]
    n_fixed = len(specials) + len(byte_toks)
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    base, merges = _train(pre, max(n_vocab - len(byte_toks), 64), [], seed)
    pieces = list(dict.fromkeys(base + ["".join(m) for m in merges]))[: n_vocab - n_fixed]
    n_base = len(base)
    tokens = specials + byte_toks + pieces
    types = [int(TokenType.UNKNOWN), int(TokenType.CONTROL), int(TokenType.CONTROL)]
    types += [int(TokenType.BYTE)] * 256 + [int(TokenType.NORMAL)] * len(pieces)
    # SPM merges the adjacent pair whose concatenation scores highest: score falls with merge rank.
    scores = [-1000.0] * 3 + [0.0] * 256 + [-float(i) if i >= n_base else 0.0 for i in range(len(pieces))]
    _pad(tokens, types, scores, n_vocab)
    return Vocab("llama", "default", tokens, types, scores, None, bos_id=1, eos_id=2, unk_id=0, add_bos=True)


def bpe_vocab(n_vocab: int, seed: int, pre: str = "qwen2") -> Vocab:
    """Byte-level BPE vocabulary (tokenizer.ggml.model = "gpt2"), control tokens at the end."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bl = pre_tokenizers.ByteLevel(add_prefix_space=False)
    base, merges = _train(bl, n_vocab - len(specials), alphabet, seed)
    merges = merges[: n_vocab - len(specials) - len(base)]
    tokens = base + ["".join(m) for m in merges]
    types = [int(TokenType.NORMAL)] * len(tokens)
    _pad(tokens, types, None, n_vocab - len(specials))
    eos = len(tokens)
    tokens += specials
    types += [int(TokenType.CONTROL)] * len(specials)
    return Vocab(
        "gpt2", pre, tokens, types, None, [f"{a} {b}" for a, b in merges],
        bos_id=eos, eos_id=eos, unk_id=None, add_bos=False,
    )


def _pad(tokens: list[str], types: list[int], scores: list[float] | None, n: int) -> None:
    i = 0
    while len(tokens) < n:
        tokens.append(f"<unused_{i}>")
        types.append(int(TokenType.UNUSED))
        if scores is not None:
            scores.append(-1e9)
        i += 1
