"""The decode loop: batches in, logits out, memory in between (llama_decode), and generation.

``decode`` is the one entry point to the model: it asks the memory for room (a dry run over
all ubatches), then commits and runs one ubatch at a time. ``prefill`` and ``decode_step``
build the two kinds of batches generation needs; ``generate`` is the whole loop with
sampling and timing.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.batch import Batch
from engine.errors import ConfigError, MemoryFullError
from engine.memory.base import Memory, MemoryStatus


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Generator:
    """What every engine shares: batch checks and the two kinds of batches generation builds. A subclass
    has ``memory``, ``device``, ``n_vocab`` and ``decode(batch) -> logits`` (torch: ``Engine``; llama.cpp:
    engine/llamacpp/engine.py)."""

    memory: Memory
    device: torch.device
    n_vocab: int

    def decode(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def run_metrics(self) -> dict:
        """What this engine measured during a run beyond what the trackers see (records' metrics)."""
        return {}

    def close(self) -> None:
        """Release what the engine holds outside Python's memory (the memory has its own close)."""

    def _check_batch(self, batch: Batch) -> None:
        """Token ids in the vocabulary; each sequence continues at seq_pos_max + 1, without gaps."""
        if len(batch) == 0:
            raise ConfigError("batch: empty batch")
        bad = [t for t in batch.token if not 0 <= t < self.n_vocab]
        if bad:
            raise ConfigError(f"batch: token id {bad[0]} is outside the vocabulary [0, {self.n_vocab})")
        seen: dict[int, int] = {}
        for p, s in zip(batch.pos, batch.seq_id):
            want = seen.get(s)
            if want is None:
                want = self.memory.seq_pos_max(s) + 1
            if p != want:
                raise ConfigError(
                    f"batch: sequence {s} has a token at position {p} where {want} was expected; "
                    "positions must continue the sequence without gaps"
                )
            seen[s] = p + 1

    def prefill(self, prompts: dict[int, list[int]]) -> torch.Tensor:
        """Prompts (seq_id -> tokens) in one batch; logits of each prompt's last token, in dict order."""
        batch = Batch()
        for s, toks in prompts.items():
            batch.add_sequence(toks, s, pos0=self.memory.seq_pos_max(s) + 1)
        return self.decode(batch)

    def decode_step(self, tokens: dict[int, int]) -> torch.Tensor:
        """One token per sequence (seq_id -> token); (n_seqs, n_vocab) logits in dict order."""
        batch = Batch()
        for s, t in tokens.items():
            batch.add(t, self.memory.seq_pos_max(s) + 1, s, output=True)
        return self.decode(batch)

    def warmup(self, n_tokens: int = 8) -> None:
        """One short prefill and decode step on a scratch sequence, then memory cleared."""
        n_tokens = max(1, min(n_tokens, self.memory.stats().n_cells - 1))
        self.prefill({0: [0] * n_tokens})
        self.decode_step({0: 0})
        self.memory.clear()


class Engine(Generator):
    def __init__(self, model: torch.nn.Module, memory: Memory, n_ubatch: int = 512) -> None:
        if n_ubatch <= 0:
            raise ConfigError(f"n_ubatch must be positive (got {n_ubatch})")
        self.model = model
        self.memory = memory
        self.n_ubatch = n_ubatch
        self.device = next(model.parameters()).device
        self.n_vocab = model.config.n_vocab

    # -- llama_decode --------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, batch: Batch) -> torch.Tensor:
        """Run a batch; returns float32 logits (n_outputs, n_vocab) in batch order."""
        self._check_batch(batch)
        mctx = self.memory.init_batch(batch, self.n_ubatch)
        if mctx.status is not MemoryStatus.SUCCESS:
            st = self.memory.stats()
            raise MemoryFullError(
                f"memory full: no room for a batch of {len(batch)} tokens "
                f"({st.used_cells}/{st.n_cells} cells used); raise the cache size or run fewer sequences"
            )
        outs, where = [], []
        offset = 0
        while True:
            mctx.apply()
            ub = mctx.ubatch
            if ub.n_out:
                outs.append(self.model(ub.token, ub.pos, mctx, ub.out_rows))
                rows = ub.out_batch_rows()
                where.append(rows if ub.rows is not None else rows + offset)
            else:
                self.model(ub.token, ub.pos, mctx, ub.token[:0])
            offset += ub.n_tokens
            if not mctx.next():
                break
        if not outs:
            return torch.empty(0)
        if len(outs) == 1 and ub.rows is None:  # one output ubatch, in batch order (split_simple): as it is
            return outs[0]
        logits = torch.cat(outs)
        order = np.argsort(np.concatenate(where), kind="stable")  # split_equal reorders tokens: back to batch order
        return logits if (np.diff(order) == 1).all() else logits[torch.from_numpy(order)]
