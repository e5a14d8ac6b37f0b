"""The model's tokenizer, built from the GGUF tokenizer block with the ``tokenizers`` library.

Two vocabulary kinds, as llama.cpp names them in ``tokenizer.ggml.model``:

- ``llama`` (SentencePiece with scores and byte fallback): a BPE model whose merges come from
  the scores (SPM merges the adjacent pair whose concatenation scores highest; ordering merges
  by that score gives the same segmentation). Spaces become "▁" and, when
  ``tokenizer.ggml.add_space_prefix`` says so, "▁" is prepended to the text and after every
  special token, as llama.cpp's llm_tokenizer_spm does.
- ``gpt2`` (byte-level BPE with a merges list): the pre-tokenizer regex is chosen by
  ``tokenizer.ggml.pre``.

BOS is added when ``tokenizer.ggml.add_bos_token`` says so (default: yes for ``llama``).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from gguf import TokenType
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
)

from engine.errors import KvbenchError, ModelFileError, UnsupportedError

# tokenizer.ggml.pre -> split regex (llama.cpp's llama-vocab.cpp pre-tokenizer families).
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {"qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2, "llama-bpe": _LLAMA3, "llama3": _LLAMA3,
               "llama-v3": _LLAMA3, "smaug-bpe": _LLAMA3, "dbrx": _LLAMA3}
# families that isolate every digit first, then apply GPT-2's regex (llama-vocab.cpp: starcoder, refact,
# command-r, smollm, codeshell, exaone, minerva)
_DIGITS_THEN_GPT2 = {"starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the spelling of byte-level vocabs)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every split (l, r) of every piece with both halves in the vocab, best-scoring piece first.

    Linear in the total length of the tokens: a split point k can only work if some token has
    length k and some token has length len(tok) - k, so only those k are tried (a vocabulary has a
    few dozen distinct lengths). Trying every k costs O(len(tok)^2) per token, and one damaged
    token of a million characters then takes hours."""
    vocab = {t: i for i, t in enumerate(tokens)}
    lengths = sorted({len(t) for t in vocab})
    have = set(lengths)
    out = []
    for tok, score in dict(zip(tokens, scores)).items():
        n = len(tok)
        local = [(tok[:k], tok[k:], score) for k in lengths if 0 < k < n and (n - k) in have
                 and tok[:k] in vocab and tok[k:] in vocab]
        out.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    out.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=True)  # stable: ties keep id order
    return [(a, b) for a, b, _ in out]


class GGUFTokenizer:
    def __init__(self, meta: dict[str, Any], source: str = "model") -> None:
        self.source = source
        try:
            self.kind = str(meta["tokenizer.ggml.model"])
            self.tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        except KeyError as e:
            raise ModelFileError(f"{source}: missing tokenizer key {e.args[0]!r}; the file has no tokenizer") from None
        n = len(self.tokens)
        self.types: list[int] = list(meta.get("tokenizer.ggml.token_type", [int(TokenType.NORMAL)] * n))
        self.bos_id = meta.get("tokenizer.ggml.bos_token_id")
        self.eos_id = meta.get("tokenizer.ggml.eos_token_id")
        default_bos = self.kind == "llama"
        self.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)) and self.bos_id is not None
        for key, tid in (("bos", self.bos_id), ("eos", self.eos_id)):
            if tid is not None and not (isinstance(tid, int) and 0 <= tid < n):
                raise ModelFileError(f"{source}: tokenizer.ggml.{key}_token_id = {tid} is not a token id "
                                     f"(the vocabulary has {n} tokens)")
        if len(self.types) != n:
            raise ModelFileError(f"{source}: tokenizer.ggml.token_type has {len(self.types)} entries for {n} tokens")
        if self.kind not in ("llama", "gpt2"):
            raise UnsupportedError(
                f"{source}: tokenizer model {self.kind!r} (tokenizer.ggml.model) is not supported; "
                "supported: llama (SentencePiece), gpt2 (byte-level BPE)"
            )
        key = "tokenizer.ggml.scores" if self.kind == "llama" else "tokenizer.ggml.merges"
        table = meta.get(key)
        if table is None:
            raise ModelFileError(f"{source}: a {self.kind!r} tokenizer needs {key}")
        if self.kind == "llama" and len(table) != n:
            raise ModelFileError(f"{source}: {key} has {len(table)} entries for {n} tokens")
        try:
            if self.kind == "llama":
                self.tk = self._build_spm(list(table), bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
            else:
                self.tk = self._build_bpe(list(table), str(meta.get("tokenizer.ggml.pre", "default")))
            self._add_specials()
        except KvbenchError:
            raise
        except Exception as e:  # noqa: BLE001 -- the tokenizers library raises a bare Exception for an
            # inconsistent vocabulary (a merge of tokens that do not exist...): bad input, said in one line
            raise ModelFileError(f"{source}: the tokenizer cannot be built from this file's vocabulary "
                                 f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); the file is damaged") from None

    def _build_spm(self, scores: list[float], add_space_prefix: bool) -> Tokenizer:
        vocab = {t: i for i, t in enumerate(self.tokens)}
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges_from_scores(self.tokens, scores),
                                  fuse_unk=True, byte_fallback=True, dropout=None))
        steps = [normalizers.Prepend("▁")] if add_space_prefix else []
        tk.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
        tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                       + ([decoders.Strip(content=" ", left=1, right=0)] if add_space_prefix else []))
        return tk

    def _build_bpe(self, merges: list[str], pre: str) -> Tokenizer:
        spell = _bytes_to_unicode()
        alpha = set(spell.values())
        vocab = {(t if set(t) <= alpha else "".join(spell[b] for b in t.encode("utf-8"))): i
                 for i, t in enumerate(self.tokens)}
        tk = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], dropout=None,
                                  continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
        split = _PRE_SPLITS.get(pre)
        if pre in _DIGITS_THEN_GPT2:
            tk.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ])
        elif split:
            tk.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        else:  # "default"/"gpt2" and unknown families: GPT-2's own regex
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        return tk

    def _add_specials(self) -> None:
        ctrl = [AddedToken(t, normalized=False, special=True)
                for t, ty in zip(self.tokens, self.types) if ty == TokenType.CONTROL]
        if ctrl:
            self.tk.add_special_tokens(ctrl)
        user = [AddedToken(t, normalized=False, special=False)
                for t, ty in zip(self.tokens, self.types) if ty == TokenType.USER_DEFINED]
        if user:
            self.tk.add_tokens(user)

    @cached_property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids for text; BOS per the GGUF unless add_bos overrides it."""
        bos = self.add_bos if add_bos is None else (add_bos and self.bos_id is not None)
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return [int(self.bos_id)] + ids if bos else ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special)

    def continuation(self, prompt: list[int], generated: list[int]) -> str:
        """Text the generated ids add after the prompt (keeps the boundary space SPM strips)."""
        head = self.decode(prompt)
        full = self.decode(prompt + generated)
        return full[len(head):] if full.startswith(head) else self.decode(generated)
