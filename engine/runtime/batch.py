"""Batches of tokens that mix sequences, and their split into ubatches (llama_batch / llama_ubatch).

A ``Batch`` is what a caller submits: token ids with a position, a sequence id and an output
flag each. ``split`` cuts it into ubatches of at most ``n_ubatch`` tokens in submission order
(llama.cpp's ``split_simple``); one ubatch is one forward pass and one ``init_batch``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Batch:
    token: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    seq_id: list[int] = field(default_factory=list)
    output: list[bool] = field(default_factory=list)

    def add(self, token: int, pos: int, seq_id: int, output: bool = False) -> None:
        self.token.append(token)
        self.pos.append(pos)
        self.seq_id.append(seq_id)
        self.output.append(output)

    def add_sequence(self, tokens: list[int], seq_id: int, pos0: int = 0, output: str = "last") -> None:
        """Append a run of tokens of one sequence at positions [pos0, pos0 + len)."""
        n = len(tokens)
        for i, t in enumerate(tokens):
            self.add(t, pos0 + i, seq_id, output == "all" or (output == "last" and i == n - 1))

    def __len__(self) -> int:
        return len(self.token)

    def split(self, n_ubatch: int, device: torch.device | str = "cpu") -> list[UBatch]:
        assert n_ubatch > 0
        return [UBatch.from_lists(self, i, min(i + n_ubatch, len(self)), device) for i in range(0, len(self), n_ubatch)]


@dataclass
class UBatch:
    """One forward pass worth of tokens. Host arrays drive bookkeeping; tensors drive compute."""

    pos_host: np.ndarray  # (T,) int64
    seq_host: np.ndarray  # (T,) int64
    token: torch.Tensor  # (T,) int64 on the compute device
    pos: torch.Tensor  # (T,) int64 on the compute device
    out_rows: torch.Tensor | None  # indices of rows that need logits; None = all rows
    n_out: int

    @property
    def n_tokens(self) -> int:
        return len(self.pos_host)

    @classmethod
    def from_lists(cls, b: Batch, i0: int, i1: int, device) -> UBatch:
        pos = np.asarray(b.pos[i0:i1], dtype=np.int64)
        seq = np.asarray(b.seq_id[i0:i1], dtype=np.int64)
        out = np.flatnonzero(np.asarray(b.output[i0:i1], dtype=bool))
        n = i1 - i0
        return cls(
            pos_host=pos,
            seq_host=seq,
            token=torch.tensor(b.token[i0:i1], dtype=torch.int64, device=device),
            pos=torch.from_numpy(pos).to(device),
            out_rows=None if len(out) == n else torch.from_numpy(out).to(device),
            n_out=len(out),
        )
