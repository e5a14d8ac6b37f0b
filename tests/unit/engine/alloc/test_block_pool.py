"""BlockPool (vLLM-style free queue, ref counts, block tables), state asserted after every operation."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.alloc.block_pool import BlockPool


def _assert_pool(pool: BlockPool, free: list[int], ref: list[int], tables: dict[int, list[int]]) -> None:
    """The exact state: the free queue in order, every ref count, every table in order; then check()."""
    assert list(pool.free) == free
    assert pool.ref == ref
    assert pool.tables == tables
    assert pool.n_free == len(free)
    pool.check()


# -- take -------------------------------------------------------------------------------------------

def test_initial_state():
    pool = BlockPool(4)
    assert pool.n_blocks == 4
    _assert_pool(pool, free=[0, 1, 2, 3], ref=[0, 0, 0, 0], tables={})


def test_zero_blocks_rejected():
    with pytest.raises(AssertionError):
        BlockPool(0)


def test_take_pops_the_front_of_the_queue_and_appends_to_the_table():
    pool = BlockPool(4)
    assert pool.take(7) == 0
    _assert_pool(pool, free=[1, 2, 3], ref=[1, 0, 0, 0], tables={7: [0]})
    assert pool.take(3) == 1
    _assert_pool(pool, free=[2, 3], ref=[1, 1, 0, 0], tables={7: [0], 3: [1]})
    assert pool.take(7) == 2
    _assert_pool(pool, free=[3], ref=[1, 1, 1, 0], tables={7: [0, 2], 3: [1]})
    assert pool.take(7) == 3
    _assert_pool(pool, free=[], ref=[1, 1, 1, 1], tables={7: [0, 2, 3], 3: [1]})


def test_take_from_an_empty_queue_fails_without_changing_anything():
    pool = BlockPool(2)
    pool.take(0)
    pool.take(1)
    _assert_pool(pool, free=[], ref=[1, 1], tables={0: [0], 1: [1]})
    with pytest.raises(AssertionError, match="no free block"):
        pool.take(0)
    _assert_pool(pool, free=[], ref=[1, 1], tables={0: [0], 1: [1]})
    with pytest.raises(AssertionError, match="no free block"):
        pool.take(5)  # a sequence without a table: none is created
    _assert_pool(pool, free=[], ref=[1, 1], tables={0: [0], 1: [1]})


# -- release and FIFO reuse -------------------------------------------------------------------------

def test_release_returns_blocks_to_the_back_of_the_queue():
    pool = BlockPool(4)
    for _ in range(3):
        pool.take(0)
    _assert_pool(pool, free=[3], ref=[1, 1, 1, 0], tables={0: [0, 1, 2]})
    pool.release(0, 1)
    _assert_pool(pool, free=[3, 1], ref=[1, 0, 1, 0], tables={0: [0, 2]})
    pool.release(0, 0)
    _assert_pool(pool, free=[3, 1, 0], ref=[0, 0, 1, 0], tables={0: [2]})
    pool.release(0, 2)  # the table's last block: the table goes away
    _assert_pool(pool, free=[3, 1, 0, 2], ref=[0, 0, 0, 0], tables={})


def test_fifo_reuse_order():
    """Blocks freed longest ago are reused first, after the never-used ones ahead of them in the queue."""
    pool = BlockPool(6)
    for s in (0, 1, 2):
        pool.take(s)
    _assert_pool(pool, free=[3, 4, 5], ref=[1, 1, 1, 0, 0, 0], tables={0: [0], 1: [1], 2: [2]})
    pool.release(2, 2)
    _assert_pool(pool, free=[3, 4, 5, 2], ref=[1, 1, 0, 0, 0, 0], tables={0: [0], 1: [1]})
    pool.release(0, 0)
    _assert_pool(pool, free=[3, 4, 5, 2, 0], ref=[0, 1, 0, 0, 0, 0], tables={1: [1]})
    assert [pool.take(9) for _ in range(3)] == [3, 4, 5]
    _assert_pool(pool, free=[2, 0], ref=[0, 1, 0, 1, 1, 1], tables={1: [1], 9: [3, 4, 5]})
    assert pool.take(1) == 2  # freed before block 0
    _assert_pool(pool, free=[0], ref=[0, 1, 1, 1, 1, 1], tables={1: [1, 2], 9: [3, 4, 5]})
    pool.release(9, 4)
    _assert_pool(pool, free=[0, 4], ref=[0, 1, 1, 1, 0, 1], tables={1: [1, 2], 9: [3, 5]})
    assert pool.take(1) == 0
    assert pool.take(1) == 4
    _assert_pool(pool, free=[], ref=[1, 1, 1, 1, 1, 1], tables={1: [1, 2, 0, 4], 9: [3, 5]})


def test_release_errors_change_nothing():
    pool = BlockPool(3)
    pool.take(0)
    pool.take(1)
    _assert_pool(pool, free=[2], ref=[1, 1, 0], tables={0: [0], 1: [1]})
    with pytest.raises(KeyError):
        pool.release(2, 0)  # a sequence without a table
    _assert_pool(pool, free=[2], ref=[1, 1, 0], tables={0: [0], 1: [1]})
    with pytest.raises(ValueError):
        pool.release(0, 1)  # a block the table does not list (seq 1 holds it)
    _assert_pool(pool, free=[2], ref=[1, 1, 0], tables={0: [0], 1: [1]})
    with pytest.raises(ValueError):
        pool.release(0, 2)  # a free block
    _assert_pool(pool, free=[2], ref=[1, 1, 0], tables={0: [0], 1: [1]})


# -- share (prefix sharing) --------------------------------------------------------------------------

def test_share_adds_references_and_the_last_release_frees():
    pool = BlockPool(4)
    pool.take(0)
    pool.take(0)
    _assert_pool(pool, free=[2, 3], ref=[1, 1, 0, 0], tables={0: [0, 1]})
    pool.share(1, 0)
    _assert_pool(pool, free=[2, 3], ref=[2, 1, 0, 0], tables={0: [0, 1], 1: [0]})
    pool.share(1, 1)
    _assert_pool(pool, free=[2, 3], ref=[2, 2, 0, 0], tables={0: [0, 1], 1: [0, 1]})
    pool.share(2, 1)
    _assert_pool(pool, free=[2, 3], ref=[2, 3, 0, 0], tables={0: [0, 1], 1: [0, 1], 2: [1]})
    pool.release(0, 0)  # still referenced by seq 1: not freed
    _assert_pool(pool, free=[2, 3], ref=[1, 3, 0, 0], tables={0: [1], 1: [0, 1], 2: [1]})
    pool.release(0, 1)
    _assert_pool(pool, free=[2, 3], ref=[1, 2, 0, 0], tables={1: [0, 1], 2: [1]})
    pool.release(1, 1)
    _assert_pool(pool, free=[2, 3], ref=[1, 1, 0, 0], tables={1: [0], 2: [1]})
    pool.release(1, 0)  # last reference: to the back of the queue
    _assert_pool(pool, free=[2, 3, 0], ref=[0, 1, 0, 0], tables={2: [1]})
    pool.release(2, 1)
    _assert_pool(pool, free=[2, 3, 0, 1], ref=[0, 0, 0, 0], tables={})


def test_share_appends_in_call_order_after_taken_blocks():
    pool = BlockPool(4)
    pool.take(0)  # 0
    pool.take(0)  # 1
    pool.take(1)  # 2
    pool.share(1, 1)
    pool.share(1, 0)
    _assert_pool(pool, free=[3], ref=[2, 2, 1, 0], tables={0: [0, 1], 1: [2, 1, 0]})
    assert pool.take(1) == 3  # taking appends after the shared blocks
    _assert_pool(pool, free=[], ref=[2, 2, 1, 1], tables={0: [0, 1], 1: [2, 1, 0, 3]})


def test_share_errors_change_nothing():
    pool = BlockPool(3)
    pool.take(0)
    _assert_pool(pool, free=[1, 2], ref=[1, 0, 0], tables={0: [0]})
    with pytest.raises(AssertionError, match="must be in use"):
        pool.share(1, 1)  # a free block
    _assert_pool(pool, free=[1, 2], ref=[1, 0, 0], tables={0: [0]})
    with pytest.raises(AssertionError, match="already in the table"):
        pool.share(0, 0)
    _assert_pool(pool, free=[1, 2], ref=[1, 0, 0], tables={0: [0]})
    pool.share(1, 0)
    with pytest.raises(AssertionError, match="already in the table"):
        pool.share(1, 0)
    _assert_pool(pool, free=[1, 2], ref=[2, 0, 0], tables={0: [0], 1: [0]})


# -- snapshot / restore ------------------------------------------------------------------------------

def test_snapshot_restore_round_trip():
    pool = BlockPool(5)
    pool.take(0)
    pool.take(1)
    pool.take(0)
    pool.share(1, 0)
    pool.release(1, 1)
    _assert_pool(pool, free=[3, 4, 1], ref=[2, 0, 1, 0, 0], tables={0: [0, 2], 1: [0]})
    snap = pool.snapshot()

    pool.take(2)
    pool.take(2)
    pool.release(0, 0)
    pool.release(0, 2)
    pool.share(2, 0)
    _assert_pool(pool, free=[1, 2], ref=[2, 0, 0, 1, 1], tables={1: [0], 2: [3, 4, 0]})

    pool.restore(snap)
    _assert_pool(pool, free=[3, 4, 1], ref=[2, 0, 1, 0, 0], tables={0: [0, 2], 1: [0]})
    assert isinstance(pool.free, deque)
    # FIFO order survives the round trip
    assert pool.take(5) == 3


def test_snapshot_is_independent_of_later_changes_and_reusable():
    pool = BlockPool(3)
    pool.take(0)
    snap = pool.snapshot()
    pool.take(0)
    pool.share(1, 0)
    assert list(snap[0]) == [1, 2] and snap[1] == [1, 0, 0] and snap[2] == {0: [0]}
    pool.restore(snap)
    pool.take(0)  # must not write through into the snapshot
    pool.take(1)
    assert list(snap[0]) == [1, 2] and snap[1] == [1, 0, 0] and snap[2] == {0: [0]}
    pool.restore(snap)  # a second restore from the same snapshot
    _assert_pool(pool, free=[1, 2], ref=[1, 0, 0], tables={0: [0]})


# -- check() catches corrupted states -----------------------------------------------------------------

def _busy_pool() -> BlockPool:
    pool = BlockPool(4)
    pool.take(0)  # 0
    pool.take(0)  # 1
    pool.take(1)  # 2
    pool.share(1, 0)
    _assert_pool(pool, free=[3], ref=[2, 1, 1, 0], tables={0: [0, 1], 1: [2, 0]})
    return pool


def test_check_passes_on_consistent_states():
    _busy_pool().check()
    BlockPool(1).check()


@pytest.mark.parametrize("block, delta", [(0, +1), (0, -1), (1, +1), (2, -1)])
def test_check_catches_a_wrong_ref_count(block, delta):
    pool = _busy_pool()
    pool.ref[block] += delta
    with pytest.raises(AssertionError, match="reference counts disagree"):
        pool.check()


def test_check_catches_a_ref_count_on_a_free_block():
    pool = _busy_pool()
    pool.ref[3] = 1  # free block with a count, no table lists it
    with pytest.raises(AssertionError):
        pool.check()


def test_check_catches_a_table_listing_a_block_twice():
    pool = _busy_pool()
    pool.tables[0].append(1)
    pool.ref[1] += 1  # counts agree with the tables: only the duplicate is wrong
    with pytest.raises(AssertionError, match="lists a block twice"):
        pool.check()


def test_check_catches_a_table_listing_a_block_it_does_not_count():
    pool = _busy_pool()
    pool.tables[1].append(1)  # ref[1] not bumped
    with pytest.raises(AssertionError, match="reference counts disagree"):
        pool.check()


def test_check_catches_a_block_twice_in_the_free_queue():
    pool = _busy_pool()
    pool.free.append(3)
    with pytest.raises(AssertionError, match="twice in the free queue"):
        pool.check()


def test_check_catches_a_leaked_block():
    pool = _busy_pool()
    pool.free.clear()  # block 3: unreferenced but not free
    with pytest.raises(AssertionError, match="free queue != unreferenced"):
        pool.check()


def test_check_catches_a_referenced_block_in_the_free_queue():
    pool = _busy_pool()
    pool.free.append(1)  # block 1 is in seq 0's table
    with pytest.raises(AssertionError, match="free queue != unreferenced"):
        pool.check()


def test_check_catches_a_block_dropped_from_a_table_without_release():
    pool = _busy_pool()
    pool.tables[1].remove(2)  # ref[2] stays 1, no table lists block 2
    with pytest.raises(AssertionError, match="reference counts disagree"):
        pool.check()


# -- random programs against a model -------------------------------------------------------------------

_ops = st.lists(
    st.tuples(st.sampled_from(["take", "share", "release"]), st.integers(0, 3), st.integers(0, 7)),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(n_blocks=st.integers(1, 6), ops=_ops)
def test_random_programs_match_a_model(n_blocks, ops):
    """take/share/release in any order: the pool equals a list-based model after every operation."""
    pool = BlockPool(n_blocks)
    free = list(range(n_blocks))
    tables: dict[int, list[int]] = {}
    for op, s, x in ops:
        if op == "take":
            if not free:
                with pytest.raises(AssertionError):
                    pool.take(s)
            else:
                b = free.pop(0)
                assert pool.take(s) == b
                tables.setdefault(s, []).append(b)
        elif op == "share":
            used = sorted({b for t in tables.values() for b in t} - set(tables.get(s, [])))
            if not used:
                continue
            b = used[x % len(used)]
            pool.share(s, b)
            tables.setdefault(s, []).append(b)
        else:
            table = tables.get(s)
            if not table:
                continue
            b = table[x % len(table)]
            pool.release(s, b)
            table.remove(b)
            if not table:
                del tables[s]
            if all(b not in t for t in tables.values()):
                free.append(b)
        ref = [sum(b in t for t in tables.values()) for b in range(n_blocks)]
        _assert_pool(pool, free=free, ref=ref, tables=tables)
