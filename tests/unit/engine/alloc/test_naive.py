"""The naive allocator: per-sequence tensors, their growth and the allocations it costs."""

import dataclasses

import pytest

from engine.alloc.naive import NaiveKV
from engine.errors import MemoryFullError
from engine.memory.base import MemoryStatus
from engine.memory.kv_cache import CacheSpec
from tests.unit.engine.alloc.helpers import CFG, batch, place

N_TENSORS = 2 * CFG.n_layer  # K and V per layer


def naive(size=64, growth="cat", n_seq=4, cfg=CFG):
    return NaiveKV(cfg, CacheSpec(allocator="naive", size=size, growth=growth, n_seq_max=n_seq))


def rows(m, s, il=0):
    sk = m.seqs[s]
    return sk.k[il][: sk.n, 0].tolist()


def test_cat_allocates_every_batch_and_reserves_only_what_it_holds():
    m = naive()
    for p in range(5):
        assert place(m, batch((0, p, 1)))
        assert m.alloc_calls_last_step == N_TENSORS
        st = m.stats()
        assert st.used_cells == p + 1 and st.reserved_bytes == st.live_bytes == (p + 1) * m.bytes_per_token
    assert rows(m, 0) == [0, 1, 2, 3, 4]
    assert m.alloc_calls == 5 * N_TENSORS


def test_double_allocates_when_capacity_runs_out():
    m = naive(growth="double")
    grown = []
    for p in range(20):
        assert place(m, batch((0, p, 1)))
        grown.append(m.alloc_calls_last_step)
    assert [i for i, g in enumerate(grown) if g] == [0, 16]  # capacity 16, then 32
    assert m.seqs[0].cap == 32 and rows(m, 0) == list(range(20))
    st = m.stats()
    assert st.reserved_bytes == 32 * m.bytes_per_token and st.live_bytes == 20 * m.bytes_per_token


def test_two_sequences_two_sets_of_tensors():
    m = naive()
    assert place(m, batch((0, 0, 3), (1, 0, 2)))
    assert m.alloc_calls_last_step == 2 * N_TENSORS
    assert rows(m, 0) == [0, 1, 2] and rows(m, 1) == [0, 1]


def test_seq_rm_partial_reallocates_the_rows_that_stay():
    m = naive()
    assert place(m, batch((0, 0, 6)))
    n0 = m.alloc_calls
    m.seq_rm(0, 2, 4)
    assert m.alloc_calls - n0 == N_TENSORS
    assert rows(m, 0) == [0, 1, 4, 5] and m.seqs[0].pos.tolist() == [0, 1, 4, 5]
    m.seq_rm(0, -1, -1)
    assert 0 not in m.seqs and m.stats().reserved_bytes == 0


def test_seq_cp_copies_and_the_copies_are_independent():
    m = naive()
    assert place(m, batch((0, 0, 4)))
    m.seq_cp(0, 1, 0, 3)
    assert rows(m, 1) == [0, 1, 2] and m.stats().used_cells == 7  # nothing is shared
    m.seqs[0].k[0][0] = 99.0
    assert rows(m, 1)[0] == 0


def test_cap_on_tokens_held():
    m = naive(size=8)
    assert place(m, batch((0, 0, 6)))
    before = m.seqs[0].pos.copy()
    assert m.init_batch(batch((1, 0, 3)), 512).status is MemoryStatus.FAILED_PREPARE
    assert (m.seqs[0].pos == before).all() and 1 not in m.seqs
    with pytest.raises(MemoryFullError, match="cache.size"):
        m.seq_cp(0, 1)


def test_swa_keeps_the_window():
    cfg = dataclasses.replace(CFG, n_swa=4, swa_layers=())
    m = naive(cfg=cfg)
    assert place(m, batch((0, 0, 8)))
    assert place(m, batch((0, 8, 1)))
    assert m.seqs[0].pos.tolist() == [5, 6, 7, 8] and rows(m, 0) == [5, 6, 7, 8]


def test_breakdown_by_tier_and_release():
    m = naive()
    assert place(m, batch((0, 0, 4), (1, 0, 4)))
    bd = m.memory_breakdown()
    assert bd == {"k.device": 8 * CFG.n_layer * m.row_bytes_k, "v.device": 8 * CFG.n_layer * m.row_bytes_v}
    m.seq_keep(1)
    assert m.memory_breakdown()["k.device"] == 4 * CFG.n_layer * m.row_bytes_k
