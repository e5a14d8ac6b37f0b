"""Naive recurrent state: per-sequence state tensors created when a sequence first appears and dropped
by ``seq_rm``; ``seq_cp`` copies them. Every creation is an allocation on the layer's tier."""

from __future__ import annotations

import numpy as np
import torch

from engine.memory.base import MemoryStats, norm_range
from engine.memory.recurrent import RecurrentMemory


class RecurrentNaive(RecurrentMemory):
    kind = "naive"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seqs: dict[int, tuple[int, list[torch.Tensor], list[torch.Tensor]]] = {}  # seq -> (pos, r, s)
        self._peak = 0

    def _new(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        rs, ss = [], []
        for i in range(len(self.layers)):
            r, s = self._empty_state(i, 1)
            rs.append(r)
            ss.append(s)
        return rs, ss

    def _prepare(self, ubs):
        return [None] * len(ubs)  # one state per sequence, created as it arrives: never out of room

    def _apply(self, plan, ub):
        seqs = self._ubatch_seqs(ub)
        for s, last in seqs:
            if s not in self.seqs:
                r, st = self._new()  # the sequence's state comes into existence: a real allocation
                self.seqs[s] = (last, r, st)
                self._peak = max(self._peak, self.usage()[1])
            else:
                _, r, st = self.seqs[s]
                self.seqs[s] = (last, r, st)
        self.n_kv_last = len(seqs)
        return [s for s, _ in seqs]

    def rs_get(self, il, seqs):
        i = self.slot[il]
        r = torch.cat([self.seqs[s][1][i] for s in seqs]).to(self.device)
        st = torch.cat([self.seqs[s][2][i] for s in seqs]).to(self.device)
        return r.view(-1, *self.r_shape), st.view(-1, *self.s_shape)

    def rs_set(self, il, seqs, r, s):
        i = self.slot[il]
        for j, q in enumerate(seqs):
            self.seqs[q][1][i].copy_(r[j].reshape(1, -1))
            self.seqs[q][2][i].copy_(s[j].reshape(1, -1))

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        a, b = norm_range(p0, p1)
        seqs = [seq_id] if seq_id >= 0 else list(self.seqs)
        if seq_id >= 0:
            self.check_seq_ids([seq_id])
        if any(s in self.seqs and a <= self.seqs[s][0] < b and a > 0 for s in seqs):
            return False
        for s in seqs:
            if s in self.seqs and a <= self.seqs[s][0] < b:
                del self.seqs[s]  # the tensors go back to the allocator
        return True

    def seq_cp(self, seq_src: int, seq_dst: int, p0: int = -1, p1: int = -1) -> None:
        self.check_seq_ids([seq_src, seq_dst])
        if seq_src == seq_dst or seq_src not in self.seqs:
            return
        pos, r, s = self.seqs[seq_src]
        nr, ns = self._new()
        for a, b in zip(nr + ns, r + s):
            a.copy_(b)
        self.seqs[seq_dst] = (pos, nr, ns)
        self._peak = max(self._peak, self.usage()[1])

    def seq_keep(self, seq_id: int) -> None:
        self.check_seq_ids([seq_id])
        self.seqs = {s: v for s, v in self.seqs.items() if s == seq_id}

    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        a, b = norm_range(p0, p1)
        if seq_id in self.seqs and a <= self.seqs[seq_id][0] < b:
            pos, r, s = self.seqs[seq_id]
            self.seqs[seq_id] = (pos + shift, r, s)

    def seq_pos_min(self, seq_id: int) -> int:
        return self.seqs[seq_id][0] if seq_id in self.seqs else -1

    seq_pos_max = seq_pos_min

    def clear(self, data: bool = True) -> None:
        self.seqs = {}

    def _export(self, seq_id):
        seqs = [seq_id] if seq_id is not None else sorted(self.seqs)
        seqs = [s for s in seqs if s in self.seqs]
        pos = np.asarray([self.seqs[s][0] for s in seqs], dtype=np.int32)
        owners = [np.asarray([s], np.int32) for s in seqs]
        r = [b"".join(self.seqs[s][1][i].cpu().contiguous().view(torch.uint8).numpy().tobytes() for s in seqs)
             for i in range(len(self.layers))]
        st = [b"".join(self.seqs[s][2][i].cpu().contiguous().view(torch.uint8).numpy().tobytes() for s in seqs)
              for i in range(len(self.layers))]
        return pos, owners, r, st

    def _import(self, pos, owners, r, s, seq_id) -> None:
        for j in range(len(pos)):
            for o in ([seq_id] if seq_id is not None else owners[j].tolist()):
                nr, ns = self._new()
                for i in range(len(self.layers)):
                    nr[i].copy_(r[i][j].reshape(1, -1))
                    ns[i].copy_(s[i][j].reshape(1, -1))
                self.seqs[int(o)] = (int(pos[j]), nr, ns)

    def _snapshot(self):
        return dict(self.seqs)

    def _restore(self, snap) -> None:
        self.seqs = snap

    def _reserved_cells_by_layer(self):
        return [len(self.seqs)] * len(self.layers)

    def usage(self) -> tuple[int, int]:
        n = len(self.seqs) * self.bytes_per_seq
        return n, n

    def reset_peak(self) -> None:
        self._peak = self.usage()[1]

    def stats(self) -> MemoryStats:
        n = len(self.seqs)
        return MemoryStats(reserved_bytes=n * self.bytes_per_seq, live_bytes=n * self.bytes_per_seq,
                           n_cells=self.n_seq_max, used_cells=n, seq_tokens=n, n_kv=self.n_kv_last,
                           free_cells=self.n_seq_max - n, largest_free_run=self.n_seq_max - n, n_seqs=n,
                           alloc_calls=self.alloc_calls, alloc_calls_last_step=self.alloc_calls_last_step,
                           reserved_peak_bytes=max(self._peak, n * self.bytes_per_seq))


# -- state files, shared by both allocators ------------------------------------------------------
