"""Token sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty; seeded.

The chain order is llama.cpp's default (common/sampling): penalties -> top-k -> top-p ->
min-p -> temperature -> draw. ``temperature <= 0`` is greedy (after penalties), so a penalty
still changes a greedy pick, as it does in llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repeat_penalty: float = 1.0  # 1: off
    repeat_last_n: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0"),
            (self.repeat_last_n >= 0, "repeat_last_n must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"sampling: {msg} (got {self})")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


class Sampler:
    """One sampler per sequence: its own generator, so parallel sequences draw independently."""

    def __init__(self, params: SamplingParams, seed_offset: int = 0) -> None:
        self.p = params
        self.gen = torch.Generator().manual_seed(params.seed + seed_offset)

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        """logits: (n_vocab,) float32 on any device; history: tokens of this sequence so far."""
        p = self.p
        x = logits.detach().float().cpu()
        if p.repeat_penalty != 1.0 and p.repeat_last_n > 0 and history:
            ids = torch.tensor(sorted(set(history[-p.repeat_last_n :])), dtype=torch.int64)
            v = x[ids]
            x = x.clone()
            x[ids] = torch.where(v > 0, v / p.repeat_penalty, v * p.repeat_penalty)
        if p.greedy:
            return int(torch.argmax(x))
        if p.top_k > 0 and p.top_k < x.numel():
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0 or p.min_p > 0.0:
            probs = torch.softmax(x, dim=-1)
            if p.top_p < 1.0:
                sp, si = torch.sort(probs, descending=True)
                # keep the smallest prefix whose mass reaches top_p (always at least one token)
                drop = (sp.cumsum(0) - sp) >= p.top_p
                x = x.clone()
                x[si[drop]] = float("-inf")
            if p.min_p > 0.0:
                x = x.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        probs = torch.softmax(x / p.temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.gen))
