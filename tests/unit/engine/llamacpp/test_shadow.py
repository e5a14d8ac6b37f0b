"""engine/llamacpp/memory.py's _Shadow: llama.cpp's cell semantics, asserted after every verb (used cells,
tokens summed over sequences). tests/integration/llamacpp checks the same counts against llama.cpp itself."""

from engine.llamacpp.memory import _Shadow


def _fill(sh: _Shadow, seq: int, n: int, p0: int = 0) -> None:
    for p in range(p0, p0 + n):
        sh.add(seq, p)


def test_unified_seq_cp_shares_cells_and_rm_frees_them_when_last_owner_leaves():
    sh = _Shadow(4, unified=True)
    _fill(sh, 0, 10)
    assert (sh.used(), sh.seq_tokens()) == (10, 10)
    sh.cp(0, 1, 0, 6)  # a 6-token prefix: cells gain sequence 1, no new cells
    assert (sh.used(), sh.seq_tokens()) == (10, 16)
    _fill(sh, 1, 3, p0=6)
    assert (sh.used(), sh.seq_tokens()) == (13, 19)
    sh.rm(0, 0, 2**62)  # 0 leaves: its 4 unshared cells are freed, the 6 shared stay with 1
    assert (sh.used(), sh.seq_tokens()) == (9, 9)
    sh.rm(1, 3, 2**62)
    assert (sh.used(), sh.seq_tokens()) == (3, 3)
    assert sorted(sh.seqs[1]) == [0, 1, 2]


def test_streams_seq_cp_copies_the_stream():
    sh = _Shadow(4, unified=False)
    _fill(sh, 0, 10)
    sh.cp(0, 2, 0, 2**62)
    assert (sh.used(), sh.used(0), sh.used(2), sh.seq_tokens()) == (20, 10, 10, 20)
    sh.rm(0, 0, 2**62)
    assert (sh.used(), sh.used(2)) == (10, 10)


def test_keep_in_streams_touches_only_its_own_stream():
    sh = _Shadow(3, unified=False)
    _fill(sh, 0, 5)
    _fill(sh, 1, 3)
    sh.keep(1)  # as llama.cpp: seq_keep walks seq 1's stream, which holds only seq 1
    assert (sh.used(), sorted(sh.seqs[0])) == (8, [0, 1, 2, 3, 4])


def test_keep_shift_clear():
    sh = _Shadow(3, unified=True)
    _fill(sh, 0, 5)
    sh.cp(0, 1, 0, 2**62)
    _fill(sh, 2, 4)
    sh.keep(1)  # 0 and 2 leave; 1 keeps the 5 cells it shared with 0
    assert (sh.used(), sh.seq_tokens(), sorted(sh.seqs[1])) == (5, 5, [0, 1, 2, 3, 4])
    sh.shift(1, 0, 2**62, -2)  # positions 0, 1 fall below 0: llama.cpp frees those cells
    assert (sh.used(), sorted(sh.seqs[1])) == (3, [0, 1, 2])
    sh.clear()
    assert (sh.used(), sh.seq_tokens(), sh.refs, sh.stream_of) == (0, 0, {}, {})

