"""Recurrent memory bookkeeping (llama.cpp semantics), state asserted after each operation."""

import pytest
import torch

from engine.alloc.recurrent_naive import RecurrentNaive
from engine.alloc.recurrent_pooled import RecurrentPooled
from engine.batch import Batch
from engine.config import SSM, ModelConfig
from engine.memory.base import MemoryStatus
from engine.memory.kv_cache import CacheSpec

CFG = ModelConfig(arch="mamba", n_vocab=10, n_embd=8, n_layer=2, n_head=0, n_head_kv=0, n_ff=0,
                  layer_kinds=(SSM, SSM), ssm_d_conv=4, ssm_d_inner=16, ssm_d_state=4, ssm_dt_rank=2)


def mem(kind="pooled", n_seq=3):
    cls = RecurrentPooled if kind == "pooled" else RecurrentNaive
    return cls(CFG, CacheSpec(allocator=kind, n_seq_max=n_seq))


def step(m, *runs, fill=None):
    """Place (seq, p0, n) runs and write states = fill (default: the seq's last position) in every layer."""
    b = Batch()
    for s, p0, n in runs:
        b.add_sequence([0] * n, s, pos0=p0)
    ctx = m.init_batch(b, 512)
    assert ctx.status is MemoryStatus.SUCCESS
    while True:
        ctx.apply()
        ub = ctx.ubatch
        n_seqs = ub.n_seqs
        per = ub.n_tokens // n_seqs
        for il in CFG.ssm_layers:
            r, s = ctx.rs_get(il)
            last = torch.tensor([float(ub.pos_host[(i + 1) * per - 1]) for i in range(n_seqs)])
            val = last if fill is None else torch.full((n_seqs,), float(fill))
            ctx.rs_set(il, torch.zeros_like(r) + val[:, None, None], torch.zeros_like(s) + val[:, None, None])
        if not ctx.next():
            return


def state(m, s):
    r, st = m.rs_get(0, torch.tensor([int(m.tail[s])]) if isinstance(m, RecurrentPooled) else [s])
    return r.flatten()[0].item(), st.flatten()[0].item()


def test_one_cell_per_sequence_and_positions():
    m = mem()
    step(m, (0, 0, 5), (1, 0, 5))
    assert m.tail.tolist() == [0, 1, -1] and m.pos.tolist() == [4, 4, -1]
    assert m.seq_pos_max(0) == 4 == m.seq_pos_min(0)
    step(m, (0, 5, 1), (1, 5, 1))
    assert m.pos.tolist() == [5, 5, -1] and state(m, 0) == (5.0, 5.0)
    st = m.stats()
    assert (st.used_cells, st.free_cells, st.n_seqs) == (2, 1, 2)
    assert st.live_bytes == 2 * m.bytes_per_seq and st.reserved_bytes == 3 * m.bytes_per_seq


@pytest.mark.parametrize("kind", ["pooled", "naive"])
def test_partial_removal_is_refused(kind):
    m = mem(kind)
    step(m, (0, 0, 8))
    assert m.seq_rm(0, 4, -1) is False  # would need the state at position 3
    assert m.seq_pos_max(0) == 7
    assert m.seq_rm(0, 0, 3) is True and m.seq_pos_max(0) == 7  # before the state: nothing to undo
    assert m.seq_rm(0, 0, -1) is True and m.seq_pos_max(0) == -1  # the whole history
    step(m, (1, 0, 2), (2, 0, 2))
    assert m.seq_rm(-1, 1, -1) is False and m.seq_pos_max(1) == 1
    assert m.seq_rm(-1, -1, -1) is True and m.stats().used_cells == 0


def test_seq_cp_shares_the_cell_and_the_first_to_advance_forks():
    m = mem()
    step(m, (0, 0, 4))
    m.seq_cp(0, 1)
    assert m.tail.tolist() == [0, 0, -1] and m.owners[0].tolist() == [True, True, False]
    assert m.stats().used_cells == 1
    step(m, (1, 4, 1), fill=99)  # seq 1 moves to a free cell with a copy, then writes 99
    assert m.tail.tolist() == [0, 1, -1] and m.owners[0].tolist() == [True, False, False]
    assert state(m, 0) == (3.0, 3.0) and state(m, 1) == (99.0, 99.0)
    assert m.seq_pos_max(1) == 4 and m.seq_pos_max(0) == 3


def test_fork_copies_the_state_before_the_step():
    m = mem()
    step(m, (0, 0, 4), fill=7)
    m.seq_cp(0, 2)
    b = Batch()
    b.add(0, 4, 2, True)
    ctx = m.init_batch(b, 512)
    ctx.apply()
    r, s = ctx.rs_get(0)
    assert r.flatten()[0].item() == 7.0 and s.flatten()[0].item() == 7.0  # seq 2 starts from seq 0's state


def test_naive_allocates_when_a_sequence_appears_and_copies_on_cp():
    m = mem("naive")
    n0 = m.alloc_calls
    step(m, (0, 0, 3))
    assert m.alloc_calls - n0 == 2 * len(CFG.ssm_layers)  # r and s per layer, once
    step(m, (0, 3, 1))
    assert m.alloc_calls_last_step == 0
    m.seq_cp(0, 1)
    assert state(m, 1) == state(m, 0) and m.stats().used_cells == 2  # a copy, not a share
    m.seq_rm(0)
    assert m.stats().reserved_bytes == m.bytes_per_seq


def test_hybrid_refuses_a_partial_removal_without_touching_the_kv_part(load):
    from engine.loader import create_engine, create_memory

    lm = load("hybrid-tiny")
    m = create_memory(lm, size=64, n_seq_max=2)
    create_engine(lm, m).prefill({0: list(range(1, 11))})
    before = m.kv.cells.pos.copy()
    assert m.seq_rm(0, 5, -1) is False
    assert (m.kv.cells.pos == before).all() and m.seq_pos_max(0) == 9
    assert m.seq_rm(0) is True and m.kv.stats().used_cells == 0 and m.rs.stats().used_cells == 0
