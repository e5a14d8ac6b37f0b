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
        """split_simple: consecutive runs of at most n_ubatch tokens, in submission order."""
        assert n_ubatch > 0
        return [UBatch.from_lists(self, i, min(i + n_ubatch, len(self)), device) for i in range(0, len(self), n_ubatch)]

    def split_equal(self, n_ubatch: int, device: torch.device | str = "cpu") -> list[UBatch]:
        """llama.cpp's split_equal: every sequence in a ubatch has the same number of tokens, and a
        ubatch lists them sequence after sequence. Recurrent layers need that shape: their scan runs
        all the ubatch's sequences as one (n_seqs, n_seq_tokens) block. Each sequence's tokens keep
        their order; sequences are taken in order of first appearance."""
        assert n_ubatch > 0
        order: dict[int, list[int]] = {}
        for i, s in enumerate(self.seq_id):
            order.setdefault(s, []).append(i)
        queues = {s: list(ix) for s, ix in order.items()}
        out = []
        while queues:
            seqs = list(queues)[:n_ubatch]
            n_per = max(1, min(min(len(queues[s]) for s in seqs), n_ubatch // len(seqs)))
            rows = []
            for s in seqs:
                rows += queues[s][:n_per]
                queues[s] = queues[s][n_per:]
                if not queues[s]:
                    del queues[s]
            out.append(UBatch.from_rows(self, rows, device, n_seqs=len(seqs)))
        return out


@dataclass
class UBatch:
    """One forward pass worth of tokens. Host arrays drive bookkeeping; tensors drive compute."""

    pos_host: np.ndarray  # (T,) int64
    seq_host: np.ndarray  # (T,) int64
    token: torch.Tensor  # (T,) int64 on the compute device
    pos: torch.Tensor  # (T,) int64 on the compute device
    out_rows: torch.Tensor | None  # indices of rows that need logits; None = all rows
    n_out: int
    out_host: np.ndarray | None = None  # host copy of the output row indices
    rows: np.ndarray | None = None  # for split_equal: positions of these tokens in the batch (logits order)
    n_seqs: int = 0  # split_equal: sequences in this ubatch, each with n_tokens // n_seqs tokens

    @property
    def n_tokens(self) -> int:
        return len(self.pos_host)

    @classmethod
    def from_rows(cls, b: Batch, rows: list[int], device, n_seqs: int) -> UBatch:
        sub = Batch([b.token[i] for i in rows], [b.pos[i] for i in rows], [b.seq_id[i] for i in rows],
                    [b.output[i] for i in rows])
        ub = cls.from_lists(sub, 0, len(rows), device)
        ub.rows, ub.n_seqs = np.asarray(rows, dtype=np.int64), n_seqs
        return ub

    def out_batch_rows(self) -> np.ndarray:
        """Batch indices of the tokens that produce logits, in this ubatch's row order."""
        return self.out_host if self.rows is None else self.rows[self.out_host]

    @classmethod
    def from_lists(cls, b: Batch, i0: int, i1: int, device) -> UBatch:
        # token, pos and seq as one array and one tensor over it (views of rows): a decode step builds one
        # UBatch, and there each numpy or torch call costs several microseconds, the caches just flushed by
        # the weights' stream
        cols = np.array((b.token[i0:i1], b.pos[i0:i1], b.seq_id[i0:i1]), dtype=np.int64)  # (3, T)
        t = torch.from_numpy(cols)
        token, pos = (t[0], t[1]) if torch.device(device).type == "cpu" else (t[0].to(device), t[1].to(device))
        flags = b.output[i0:i1]
        n = i1 - i0
        out = np.arange(n) if all(flags) else np.flatnonzero(np.asarray(flags, dtype=bool))
        return cls(
            pos_host=cols[1],
            seq_host=cols[2],
            token=token,
            pos=pos,
            out_rows=None if len(out) == n else torch.from_numpy(out).to(device),
            n_out=len(out),
            out_host=out,
        )
