"""The paged allocator: blocks, tables and ref counts asserted after every operation."""

import dataclasses

import pytest
import torch

from engine.alloc.paged import PagedKV
from engine.errors import ConfigError
from engine.memory.base import MemoryStatus
from engine.memory.kv_cache import CacheSpec
from tests.unit.engine.alloc.helpers import CFG, batch, place


def paged(size=16, bs=4, n_seq=4, cfg=CFG):
    return PagedKV(cfg, CacheSpec(allocator="paged", size=size, block_size=bs, n_seq_max=n_seq))


def state(m):
    m.pool.check()
    return list(m.pool.free), list(m.pool.ref), {s: list(t) for s, t in m.pool.tables.items()}


def positions(m, s):
    return sorted(m.cells.pos[m.cells.seq[:, s]].tolist())


def test_append_fills_blocks_in_order():
    m = paged()
    assert place(m, batch((0, 0, 3)))
    assert state(m) == ([1, 2, 3], [1, 0, 0, 0], {0: [0]})
    assert m.cells.pos[:4].tolist() == [0, 1, 2, -1]
    assert place(m, batch((0, 3, 3)))  # fills offset 3 of block 0, then block 1
    assert state(m) == ([2, 3], [1, 1, 0, 0], {0: [0, 1]})
    assert m.cells.pos[:8].tolist() == [0, 1, 2, 3, 4, 5, -1, -1]
    st = m.stats()
    assert (st.used_blocks, st.free_blocks, st.used_cells, st.free_cells) == (2, 2, 6, 8)


def test_two_sequences_never_share_a_block_by_accident():
    m = paged()
    assert place(m, batch((0, 0, 2), (1, 0, 2)))
    assert state(m) == ([2, 3], [1, 1, 0, 0], {0: [0], 1: [1]})


def test_seq_cp_shares_blocks_without_copying_and_cow_on_append():
    m = paged()
    assert place(m, batch((0, 0, 6)))
    m.seq_cp(0, 1)
    assert state(m) == ([2, 3], [2, 2, 0, 0], {0: [0, 1], 1: [0, 1]})
    assert m.stats().used_cells == 6 and m.stats().seq_tokens == 12
    # seq 1 appends into the shared, partly filled block 1: its rows move to a fresh block first
    assert place(m, batch((1, 6, 1)))
    assert state(m) == ([3], [2, 1, 1, 0], {0: [0, 1], 1: [0, 2]})
    assert positions(m, 1) == [0, 1, 2, 3, 4, 5, 6] and positions(m, 0) == [0, 1, 2, 3, 4, 5]
    # the copied rows hold the same data (K rows were filled with the position)
    for il in range(CFG.n_layer):
        assert torch.equal(m.k[il][8:10], m.k[il][4:6]) and m.k[il][10, 0].item() == 6
    # seq 0 now appends in place: block 1 is its own again
    assert place(m, batch((0, 6, 2)))
    assert state(m) == ([3], [2, 1, 1, 0], {0: [0, 1], 1: [0, 2]})


def test_seq_rm_releases_blocks_when_refs_drop_to_zero():
    m = paged()
    assert place(m, batch((0, 0, 6)))
    m.seq_cp(0, 1, 0, 4)  # share only block 0
    assert state(m) == ([2, 3], [2, 1, 0, 0], {0: [0, 1], 1: [0]})
    m.seq_rm(0, -1, -1)
    assert state(m) == ([2, 3, 1], [1, 0, 0, 0], {1: [0]})
    assert positions(m, 1) == [0, 1, 2, 3]
    m.seq_rm(1, 2, -1)  # a partial removal keeps the block
    assert state(m) == ([2, 3, 1], [1, 0, 0, 0], {1: [0]})
    m.seq_rm(1, -1, -1)
    assert state(m) == ([2, 3, 1, 0], [0, 0, 0, 0], {})


def test_full_pool_fails_prepare_and_changes_nothing():
    m = paged()
    assert place(m, batch((0, 0, 10)))  # 3 blocks
    before = (state(m), m.cells.pos.copy(), m.cells.seq.copy())
    ctx = m.init_batch(batch((1, 0, 3), (0, 10, 3)), 2)  # needs 2 blocks, 1 free
    assert ctx.status is MemoryStatus.FAILED_PREPARE
    assert state(m) == before[0] and (m.cells.pos == before[1]).all() and (m.cells.seq == before[2]).all()
    assert place(m, batch((0, 10, 2)))  # fits in block 2's room


def test_attention_reads_only_the_batch_sequences_blocks():
    m = paged()
    assert place(m, batch((0, 0, 5), (1, 0, 2)))  # seq 0: blocks 0, 1; seq 1: block 2
    ctx = m.init_batch(batch((1, 2, 1)), 512)
    ctx.apply()
    assert ctx.view.cells.tolist() == [8, 9, 10, 11] and m.stats().n_kv == 4
    assert ctx.view.mask.tolist() == [[True, True, True, False]]


def test_swa_drops_positions_out_of_the_window_and_frees_blocks():
    cfg = dataclasses.replace(CFG, n_swa=4, swa_layers=())
    m = paged(cfg=cfg)
    assert place(m, batch((0, 0, 8)))
    assert state(m)[2] == {0: [0, 1]}
    assert place(m, batch((0, 8, 1)))  # next pos 8 cannot see p <= 4
    assert positions(m, 0) == [5, 6, 7, 8]
    assert state(m) == ([3, 0], [0, 1, 1, 0], {0: [1, 2]})


def test_block_size_must_divide_size():
    with pytest.raises(ConfigError, match="cache.block_size"):
        paged(size=18, bs=4)


def test_no_storage_allocation_after_construction():
    m = paged()
    n0 = m.alloc_calls
    assert n0 == 2 * CFG.n_layer
    for p in range(12):
        assert place(m, batch((0, p, 1)))
        assert m.alloc_calls_last_step == 0
    assert m.alloc_calls == n0
