"""Random programs of sequence operations on every KV allocator, checked against a reference model.

The reference is llama.cpp's semantics on a dict ``seq_id -> {position: token id}``: appends add
positions, ``seq_rm`` / ``seq_cp`` / ``seq_keep`` / ``seq_add`` act on half-open ranges where a
negative bound is open-ended. Every appended token writes a V row that holds a unique id, so the
model also follows the data: which row a sequence reads at a position, after copies, copy-on-write,
shifts and reallocations.

Checked after every operation: positions (and ids) per sequence, seq_pos_min/max, no position held
twice, cell and block bookkeeping, stats, allocation counts. Checked after every ``apply``: what
each token of the ubatch attends to (the positions and V rows its mask shows) is exactly its
sequence's positions at or before it (within the window on SWA models).

On sliding-window models an append may drop positions the next token cannot see; the check there
is what is guaranteed (visible ⊆ after ⊆ unpruned), not a pruning policy: pooled prunes lazily
while placing, paged and naive eagerly before placing.

Caller preconditions the programs respect (the engine's usage): a sequence's new tokens continue it
(from seq_pos_max + 1); ``seq_cp`` into a sequence that already holds one of the copied positions is
preceded by clearing that sequence (the scheduler copies into fresh slots); ``seq_add`` shifts that
would land on a position the sequence still holds are not issued; ``seq_add`` programs have no
``seq_cp`` (shared cells move together in cell caches, unlike naive's per-sequence copies).

Regression tests for engine bugs these properties found are at the end of the file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.alloc import create_kv_cache
from engine.batch import Batch
from engine.config import ModelConfig
from engine.errors import MemoryFullError
from engine.memory.base import MemoryStatus, norm_range
from engine.memory.kv_cache import CacheSpec
from engine.model.layers import Rope

N_LAYER = 2
ROW = 32  # n_embd_k_gqa = n_embd_v_gqa
NSM = 3  # sequences per memory
ALLOCS = ("naive", "pooled", "paged")



def _cfg(n_swa: int) -> ModelConfig:
    return ModelConfig(arch="llama", n_vocab=10, n_embd=64, n_layer=N_LAYER, n_head=2, n_head_kv=1, n_ff=8,
                       n_swa=n_swa)


def _make(alloc: str, n_swa: int = 0, size: int = 16, block_size: int = 4, n_seq_max: int = NSM, **kw):
    cfg = _cfg(n_swa)
    spec = CacheSpec(allocator=alloc, size=size, block_size=block_size, n_seq_max=n_seq_max, **kw)
    return create_kv_cache(cfg, spec, rope=Rope(cfg))


class Harness:
    """One memory, its reference, and the checks."""

    def __init__(self, alloc: str, n_swa: int, size: int, block_size: int, growth: str = "cat", n_pad: int = 1):
        self.alloc, self.n_swa = alloc, n_swa
        self.mem = _make(alloc, n_swa, size, block_size, growth=growth, n_pad=n_pad)
        self.cells = alloc in ("pooled", "paged")
        self.ref: dict[int, dict[int, int]] = {s: {} for s in range(NSM)}
        self.next_id = 1  # V rows hold their token's id; 0 = never written
        self.rope = self.mem.rope
        self.alloc0 = self.mem.alloc_calls
        if self.cells:
            assert self.alloc0 == 2 * N_LAYER  # one K and one V tensor per layer
        else:
            assert self.alloc0 == 0
        self.check()

    # -- reading the memory ----------------------------------------------------------------------
    def actual(self) -> dict[int, dict[int, int]]:
        """seq -> {pos: id} read from the memory's bookkeeping and V rows; asserts (b), (c)."""
        mem = self.mem
        out: dict[int, dict[int, int]] = {s: {} for s in range(NSM)}
        if self.cells:
            c = mem.cells
            used = c.pos >= 0
            assert (used == c.seq.any(axis=1)).all(), "(c) pos >= 0 iff the cell has an owner"
            assert c.used <= c.size
            assert c.used == int(np.count_nonzero(c.pos >= 0)), "the maintained used count drifted"
            ids = [mem.v[il][:, 0].tolist() for il in range(N_LAYER)]
            for i in np.flatnonzero(used).tolist():
                vid = int(ids[0][i])
                assert all(int(x[i]) == vid for x in ids), f"cell {i}: layers hold different rows"
                p = int(c.pos[i])
                for s in np.flatnonzero(c.seq[i]).tolist():
                    assert p not in out[s], f"(b) sequence {s} holds position {p} twice"
                    out[s][p] = vid
        else:
            for s, sk in mem.seqs.items():
                assert 0 <= s < NSM
                pos = sk.pos.tolist()
                assert len(set(pos)) == len(pos), f"(b) sequence {s} holds a position twice: {sorted(pos)}"
                if sk.k[0] is None:
                    assert sk.n == 0
                    continue
                for il in range(N_LAYER):
                    assert sk.k[il].shape[0] == sk.v[il].shape[0] == sk.cap >= sk.n
                ids = [sk.v[il][: sk.n, 0].tolist() for il in range(N_LAYER)]
                for j, p in enumerate(pos):
                    vid = int(ids[0][j])
                    assert all(int(x[j]) == vid for x in ids)
                    out[s][int(p)] = vid
        return out

    # -- invariants --------------------------------------------------------------------------------
    def check(self, exact: bool = True) -> dict[int, dict[int, int]]:
        mem = self.mem
        act = self.actual()
        if exact:
            assert act == self.ref, "(a) the memory's sequences differ from the reference"
        for s in range(NSM):  # (a) seq_pos_min / max
            ps = act[s]
            assert mem.seq_pos_min(s) == (min(ps) if ps else -1)
            assert mem.seq_pos_max(s) == (max(ps) if ps else -1)
        st_ = mem.stats()
        bpt = mem.bytes_per_token
        seq_tokens = sum(len(m) for m in act.values())
        n_seqs = sum(1 for m in act.values() if m)
        # (e) stats
        assert st_.live_bytes == st_.used_cells * bpt
        assert 0 <= st_.used_cells <= st_.n_cells == mem.size
        assert st_.free_cells >= 0
        assert st_.reserved_bytes >= st_.live_bytes
        assert st_.reserved_bytes == sum(mem.memory_breakdown().values())
        assert st_.seq_tokens == seq_tokens
        assert st_.alloc_calls == mem.alloc_calls
        if self.cells:
            c = mem.cells
            assert st_.used_cells == c.used
            assert st_.reserved_bytes == mem.size * bpt
            assert st_.n_seqs == n_seqs
            # (f) no storage allocated after construction
            assert mem.alloc_calls == self.alloc0
        else:
            assert st_.used_cells == st_.seq_tokens == seq_tokens
            assert st_.free_cells == mem.size - st_.used_cells
            assert all(sk.n for sk in mem.seqs.values())  # no empty sequence lingers
            assert st_.n_seqs == n_seqs
            assert mem.alloc_calls >= self.alloc0
            self.alloc0 = mem.alloc_calls
        if self.alloc == "pooled":
            assert st_.free_cells == mem.size - c.used
            assert 0 <= mem.head < mem.size
        if self.alloc == "paged":
            self.check_paged(st_)
        return act

    def check_paged(self, st_) -> None:
        """(d) the block pool and the tables agree with the cells."""
        mem = self.mem
        pool, c, bs = mem.pool, mem.cells, mem.block_size
        pool.check()
        owned = c.seq.reshape(mem.n_blocks, bs, NSM).any(axis=1)  # (n_blocks, NSM)
        used_blocks = (c.pos >= 0).reshape(mem.n_blocks, bs).any(axis=1)
        for s in range(NSM):
            want = set(np.flatnonzero(owned[:, s]).tolist())
            table = pool.tables.get(s, [])
            assert set(table) == want, f"seq {s}: table {table} != blocks holding its cells {sorted(want)}"
        assert set(pool.tables) <= set(range(NSM))
        assert all(pool.tables.values()), "an empty table is kept"
        for b in pool.free:
            assert not used_blocks[b], f"free block {b} holds used cells"
        assert st_.free_blocks == pool.n_free and st_.used_blocks == mem.n_blocks - pool.n_free
        assert st_.free_cells == pool.n_free * bs
        assert st_.used_blocks * bs >= st_.used_cells

    # -- operations ----------------------------------------------------------------------------------
    def _state(self):
        return self.actual(), self.mem.stats()

    def _assert_unchanged(self, before) -> None:
        act, stats = self._state()
        assert act == before[0], "a failed operation changed the memory"
        assert stats.as_dict() == before[1].as_dict()

    def _visible(self, state: dict[int, int], q: int) -> list[tuple[int, int]]:
        return sorted((p, i) for p, i in state.items() if p <= q and (not self.n_swa or q - p < self.n_swa))

    def append(self, runs: list[tuple[int, int]], n_ubatch: int, interleave: bool) -> bool:
        mem = self.mem
        per_seq = []
        for s, k in runs:
            p0 = mem.seq_pos_max(s) + 1
            per_seq.append([(s, p0 + j) for j in range(k)])
        if interleave:  # round robin over the sequences, each in position order
            toks = [g[j] for j in range(max(map(len, per_seq))) for g in per_seq if j < len(g)]
        else:
            toks = [t for g in per_seq for t in g]
        b = Batch()
        for s, p in toks:
            b.add(0, p, s)
        ids = list(range(self.next_id, self.next_id + len(toks)))
        total = {s: k for s, k in runs}

        before = self._state()
        expect_fail = self._predict_failure(total)
        if self.alloc == "paged":
            lo, hi = self._paged_blocks_needed(total)
            n_free0 = mem.pool.n_free
        ctx = mem.init_batch(b, n_ubatch)
        if ctx.status is not MemoryStatus.SUCCESS:
            assert ctx.status is MemoryStatus.FAILED_PREPARE
            if expect_fail is not None:
                assert expect_fail, "init_batch failed although the batch fits"
            if self.alloc == "paged" and not self.n_swa:
                assert hi > n_free0, "init_batch failed although the blocks it needs are free"
            self._assert_unchanged(before)  # a failed batch changes nothing (SWA pruning included)
            self.check()
            return False
        if expect_fail is not None:
            assert not expect_fail, "init_batch succeeded although the batch cannot fit"
        if self.alloc == "paged" and not self.n_swa:
            assert lo <= n_free0, "init_batch succeeded although the blocks it needs are not free"
        self.next_id += len(toks)

        state = {s: dict(m) for s, m in before[0].items()}  # what the memory holds, unpruned
        i0 = 0
        while True:
            naive_caps = None
            if self.alloc == "naive":  # rows held and capacity per sequence, before this ubatch
                naive_caps = {s: (sk.n, sk.cap if sk.k[0] is not None else 0) for s, sk in mem.seqs.items()}
            ctx.apply()
            ub = ctx.ubatch
            T = ub.n_tokens
            mine = toks[i0 : i0 + T]
            assert ub.seq_host.tolist() == [s for s, _ in mine] and ub.pos_host.tolist() == [p for _, p in mine]
            uids = ids[i0 : i0 + T]
            for (s, p), vid in zip(mine, uids):
                state[s][p] = vid
            v = torch.tensor(uids, dtype=torch.float32).view(T, 1, 1).expand(T, 1, ROW).contiguous()
            k = self._k_rows(ub.pos_host)
            for il in range(N_LAYER):
                ctx.store(il, k, v)
            for il in range(N_LAYER):
                seen = self._attended(ctx, il)
                for t, (s, q) in enumerate(mine):
                    assert seen[t] == self._visible(state[s], q), f"token {t} (seq {s}, pos {q}) attends wrongly"
            self._check_step_allocs(ctx, naive_caps)
            i0 += T
            if not ctx.next():
                break
        assert i0 == len(toks)

        if self.n_swa:
            act = self.check(exact=False)
            for s in range(NSM):
                unpruned = state[s]
                assert act[s].items() <= unpruned.items(), f"seq {s}: holds what it never had"
                if unpruned:
                    nxt = max(unpruned) + 1
                    vis = {p: i for p, i in unpruned.items() if nxt - p < self.n_swa}
                    assert vis.items() <= act[s].items(), f"seq {s}: dropped positions its next token sees"
            self.ref = act
        else:
            self.ref = state
            self.check()
            if self.alloc == "paged":  # blocks taken (net of copied-away shared blocks freed)
                assert lo <= n_free0 - mem.pool.n_free <= hi
        return True

    def _k_rows(self, pos) -> torch.Tensor:
        """K as a model stores it: one fixed vector rotated to each token's position. After a
        K-shift (seq_add) a row must read as if it had been computed at its new position."""
        pos = torch.as_tensor(np.asarray(pos, dtype=np.int64))
        u = torch.linspace(-1.0, 1.0, ROW).expand(len(pos), 1, ROW)
        return self.rope.apply(u, self.rope.angles(pos, torch.float32))

    def _check_k(self, k: torch.Tensor, pos) -> None:
        torch.testing.assert_close(k, self._k_rows(pos), atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f"K rows do not match their positions (K-shift / copy): {m}")

    def _attended(self, ctx, il: int) -> list[list[tuple[int, int]]]:
        """For each ubatch token, the (position, V id) pairs its attention input lets it see."""
        mem = self.mem
        T = ctx.ubatch.n_tokens
        inps = ctx.attn_inputs(il)
        seen: list[list[tuple[int, int]] | None] = [None] * T
        if self.cells:
            assert len(inps) == 1 and inps[0].rows is None
            inp = inps[0]
            cells = ctx.view.cells
            pos = mem.cells.pos[cells] if isinstance(cells, slice) else mem.cells.pos[cells.numpy()]
            assert inp.mask.shape == (T, len(pos)) and inp.v.shape[0] == len(pos)
            assert mem.stats().n_kv == len(pos)
            vids = inp.v[:, 0, 0].tolist()
            stack = ctx.kv_stack(mem.n_layers)  # every layer at once (the one-op forward), asked first this ubatch
            st = ctx.kv_storage(il)  # float rows on the device: the same places as raw storage (KVStorage)
            read = torch.arange(st.n_kv) if st.cells is None else st.cells
            assert torch.equal(st.k[read].view_as(inp.k), inp.k) and torch.equal(st.v[read].view_as(inp.v), inp.v)
            assert st.mask is inp.mask and st.n_kv == len(pos)
            assert stack.k[il] is st.k and stack.v[il] is st.v and len(stack.k) == len(stack.v) == mem.n_layers
            assert stack.slots is st.slots and stack.cells is st.cells and stack.mask is st.mask
            assert (stack.slot0, stack.n_kv) == (st.slot0, st.n_kv)
            wrote = torch.arange(st.slot0, st.slot0 + T) if st.slots is None else st.slots
            assert (mem.cells.pos[wrote.numpy()] == ctx.ubatch.pos_host).all()
            live = np.flatnonzero(pos >= 0)
            self._check_k(inp.k[live], pos[live])
            mask = inp.mask.numpy()
            for t in range(T):
                seen[t] = sorted((int(pos[j]), int(vids[j])) for j in np.flatnonzero(mask[t]))
        else:
            assert ctx.kv_storage(il) is None  # per-sequence tensors: store and attn_inputs only
            assert ctx.kv_stack(mem.n_layers) is None
            assert len(inps) == len(ctx.view)
            assert mem.stats().n_kv == sum(g.n for g in ctx.view)
            for inp, g in zip(inps, ctx.view):
                pos = mem.seqs[g.seq].pos[: g.n].tolist()
                vids = inp.v[:, 0, 0].tolist()
                assert len(vids) == len(pos) == g.n
                self._check_k(inp.k, pos)
                rows = list(range(T)) if inp.rows is None else inp.rows.tolist()
                m = len(rows)
                for r, t in enumerate(rows):
                    assert seen[t] is None, f"ubatch row {t} answered twice"
                    if inp.mask is None:  # plain causal: rows are the last m positions
                        cols = range(g.n - m + r + 1)
                    else:
                        cols = np.flatnonzero(inp.mask[r].numpy()).tolist()
                    seen[t] = sorted((int(pos[j]), int(vids[j])) for j in cols)
            assert all(x is not None for x in seen), "a ubatch row has no attention input"
        return seen

    def _check_step_allocs(self, ctx, naive_caps) -> None:
        """(f) pooled / paged: no allocation while committing; naive: exactly when a sequence grows."""
        mem = self.mem
        if self.cells:
            assert mem.alloc_calls_last_step == 0 and mem.alloc_calls == self.alloc0
            return
        ub = ctx.ubatch
        want = 0
        for s in dict.fromkeys(ub.seq_host.tolist()):
            m = int((ub.seq_host == s).sum())
            n, cap = naive_caps.get(s, (0, 0))
            if mem.spec.growth == "cat" or s not in naive_caps or cap == 0 or n + m > cap:
                want += 2 * N_LAYER
        assert mem.alloc_calls_last_step == want

    def _predict_failure(self, total: dict[int, int]) -> bool | None:
        """Whether the batch cannot fit, where the allocator's policy makes it predictable."""
        mem = self.mem
        n = sum(total.values())
        if self.alloc == "naive" and not self.n_swa:
            return mem.stats().used_cells + n > mem.size
        if self.alloc == "pooled" and not self.n_swa:
            return mem.cells.used + n > mem.size
        return None

    def _paged_blocks_needed(self, total: dict[int, int]) -> tuple[int, int]:
        """(fewest, most) blocks the batch takes. A sequence fills the room after its last cell in
        the last block of its table, then takes whole blocks; if that block is shared it is first
        copied to a fresh block, unless an earlier ubatch's copy left it unshared."""
        mem = self.mem
        bs, c = mem.block_size, mem.cells
        lo = hi = 0
        for s, k in total.items():
            table = mem.pool.tables.get(s)
            if table:
                b = table[-1]
                offs = np.flatnonzero(c.seq[b * bs : (b + 1) * bs, s])
                room = bs - (int(offs[-1]) + 1)
                if room > 0:
                    hi += mem.pool.ref[b] > 1  # copy-on-write
                    k -= min(k, room)
            lo += -(-k // bs)
            hi += -(-k // bs)
        return lo, hi

    def seq_rm(self, s: int, p0: int, p1: int) -> None:
        a, b = norm_range(p0, p1)
        for t in (range(NSM) if s < 0 else [s]):
            self.ref[t] = {p: i for p, i in self.ref[t].items() if not a <= p < b}
        assert self.mem.seq_rm(s, p0, p1) is True
        self.check()

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        a, b = norm_range(p0, p1)
        if src == dst:
            before = self._state()
            self.mem.seq_cp(src, dst, p0, p1)
            self._assert_unchanged(before)
            return
        copied = {p: i for p, i in self.ref[src].items() if a <= p < b}
        if copied.keys() & self.ref[dst].keys():
            self.seq_rm(dst, -1, -1)  # precondition: copy into a fresh sequence
        if self.alloc == "naive":
            used = sum(len(m) for m in self.ref.values())
            if used + len(copied) > self.mem.size:  # naive copies rows: it can run out of room
                before = self._state()
                with pytest.raises(MemoryFullError):
                    self.mem.seq_cp(src, dst, p0, p1)
                self._assert_unchanged(before)
                return
        self.mem.seq_cp(src, dst, p0, p1)
        self.ref[dst].update(copied)
        self.check()

    def clear(self, data: bool) -> None:
        self.ref = {s: {} for s in range(NSM)}
        self.mem.clear(data)
        self.check()

    def seq_keep(self, s: int) -> None:
        self.ref = {t: (m if t == s else {}) for t, m in self.ref.items()}
        self.mem.seq_keep(s)
        self.check()

    def seq_add(self, s: int, p0: int, p1: int, shift: int) -> bool:
        """False (nothing done) when the shift would land on a position s still holds."""
        a, b = norm_range(p0, p1)
        moved = {p: i for p, i in self.ref[s].items() if a <= p < b}
        rest = {p: i for p, i in self.ref[s].items() if not a <= p < b}
        if shift == 0 or a == b:
            moved, shift = {}, 0
        new = {p + shift: i for p, i in moved.items() if p + shift >= 0}
        if new.keys() & rest.keys():
            return False
        self.ref[s] = {**rest, **new} if shift else self.ref[s]
        self.mem.seq_add(s, p0, p1, shift)
        self.check()
        return True

    def context_shift(self, s: int, n_keep: int, n_discard: int) -> None:
        """What a generation loop does when the context is full: drop a run, shift the rest back."""
        self.seq_rm(s, n_keep, n_keep + n_discard)
        assert self.seq_add(s, n_keep + n_discard, -1, -n_discard)


# -- strategies ------------------------------------------------------------------------------------------

_seq = st.integers(0, NSM - 1)
_p = st.integers(-3, 16)
_range = st.one_of(  # (p0, p1): whole, open-ended either side, or any pair (empty and reversed included)
    st.just((-1, -1)), st.tuples(st.just(-1), _p), st.tuples(_p, st.just(-1)), st.tuples(_p, _p)
)


def _append():
    runs = st.lists(st.tuples(_seq, st.integers(1, 6)), min_size=1, max_size=3, unique_by=lambda r: r[0])
    return st.tuples(st.just("append"), runs, st.sampled_from([1, 2, 3, 5, 512]), st.booleans())


_rm = st.tuples(st.just("rm"), st.integers(-1, NSM - 1), _range)
_cp = st.tuples(st.just("cp"), _seq, _seq, _range)  # the source: the n-th sequence that holds tokens
_keep = st.tuples(st.just("keep"), _seq)
_clear = st.tuples(st.just("clear"), st.booleans())
_add = st.tuples(st.just("add"), _seq, _range, st.integers(-14, 14))
_shift = st.tuples(st.just("shift"), _seq, st.integers(0, 8), st.integers(1, 8))
# a parallel-sampling fork: share (a prefix of) a sequence into another, then extend both
_fork = st.tuples(st.just("fork"), _seq, _seq, st.one_of(st.just(-1), st.integers(0, 16)),
                  st.integers(1, 6), st.integers(1, 6), st.sampled_from([1, 2, 512]))

# appends weigh about half of the operations (one_of picks its branches uniformly)
PROGRAMS = st.lists(st.one_of(_append(), _append(), _append(), _append(), _rm, _cp, _fork, _keep, _clear),
                    min_size=2, max_size=30)
SHIFT_PROGRAMS = st.lists(st.one_of(_append(), _append(), _append(), _append(), _rm, _keep, _add, _shift),
                          min_size=2, max_size=30)


@st.composite
def _setups(draw, attn: str):
    bs = draw(st.sampled_from([1, 2, 3, 4]))
    size = bs * draw(st.integers(3, 10))
    return dict(
        n_swa=draw(st.integers(2, 5)) if attn == "swa" else 0,
        size=size,
        block_size=bs,
        growth=draw(st.sampled_from(["cat", "double"])),
        n_pad=draw(st.sampled_from([1, 4])),
    )


def _run(h: Harness, ops) -> None:
    for op in ops:
        kind = op[0]
        if kind == "append":
            h.append(*op[1:])
        elif kind == "rm":
            h.seq_rm(op[1], *op[2])
        elif kind == "cp":
            held = [s for s in range(NSM) if h.ref[s]]
            src = held[op[1] % len(held)] if held else op[1]
            h.seq_cp(src, op[2], *op[3])
        elif kind == "fork":
            held = [s for s in range(NSM) if h.ref[s]]
            src = held[op[1] % len(held)] if held else op[1]
            dst, p1, k_src, k_dst, n_ubatch = op[2:]
            if dst == src:
                continue
            h.seq_rm(dst, -1, -1)
            h.seq_cp(src, dst, -1, p1)
            h.append([(src, k_src), (dst, k_dst)], n_ubatch, False)
        elif kind == "keep":
            h.seq_keep(op[1])
        elif kind == "add":
            h.seq_add(op[1], *op[2], op[3])
        elif kind == "shift":
            h.context_shift(*op[1:])
        elif kind == "clear":
            h.clear(op[1])


_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("attn", ["full", "swa"])
@pytest.mark.parametrize("alloc", ALLOCS)
@_SETTINGS
@given(data=st.data(), ops=PROGRAMS)
def test_random_programs(alloc, attn, data, ops):
    """append / seq_rm / seq_cp / seq_keep in any order."""
    h = Harness(alloc, **data.draw(_setups(attn)))
    _run(h, ops)


@pytest.mark.parametrize("attn", ["full", "swa"])
@pytest.mark.parametrize("alloc", ALLOCS)
@_SETTINGS
@given(data=st.data(), ops=SHIFT_PROGRAMS)
def test_random_programs_with_seq_add(alloc, attn, data, ops):
    """append / seq_rm / seq_keep / seq_add (incl. shifts below 0) / context shifts, no seq_cp."""
    h = Harness(alloc, **data.draw(_setups(attn)))
    _run(h, ops)


# -- known bugs: minimal repros ----------------------------------------------------------------------------

def _place(mem, runs, n_ubatch: int = 512) -> MemoryStatus:
    """Place tokens (seq, p0, n) like the engine does, minus the model; returns the status."""
    b = Batch()
    for s, p0, n in runs:
        b.add_sequence([0] * n, s, pos0=p0)
    ctx = mem.init_batch(b, n_ubatch)
    if ctx.status is not MemoryStatus.SUCCESS:
        return ctx.status
    while True:
        ctx.apply()
        T = ctx.ubatch.n_tokens
        for il in range(N_LAYER):
            ctx.store(il, torch.randn(T, 1, ROW), torch.randn(T, 1, ROW))
        if not ctx.next():
            return ctx.status


def _positions(mem, s: int) -> list[int]:
    if hasattr(mem, "cells"):
        c = mem.cells
        return sorted(c.pos[c.seq[:, s]].tolist())
    sk = mem.seqs.get(s)
    return [] if sk is None else sorted(sk.pos.tolist())


@pytest.mark.parametrize("alloc", ALLOCS)
def test_swa_failed_init_batch_changes_nothing(alloc):
    mem = _make(alloc, n_swa=4, size=8, block_size=4)
    assert _place(mem, [(0, 0, 6)]) is MemoryStatus.SUCCESS
    before = _positions(mem, 0), mem.stats().as_dict()
    assert before[0] == [0, 1, 2, 3, 4, 5]
    assert _place(mem, [(0, 6, 7)]) is MemoryStatus.FAILED_PREPARE  # 7 tokens do not fit in 8 cells
    assert (_positions(mem, 0), mem.stats().as_dict()) == before


@pytest.mark.parametrize("alloc", ALLOCS)
def test_seq_cp_of_an_empty_range_creates_no_sequence(alloc):
    mem = _make(alloc, size=16, block_size=4)
    assert _place(mem, [(0, 0, 3)]) is MemoryStatus.SUCCESS
    mem.seq_cp(0, 1, 5, 9)  # seq 0 holds no position in [5, 9)
    assert _positions(mem, 1) == [] and mem.seq_pos_max(1) == -1
    assert mem.stats().n_seqs == 1


def _shared_then_shifted_below_zero(alloc):
    """Shared cells move together in cell caches (llama.cpp): shifting them below 0 frees them for all owners."""
    mem = _make(alloc, size=16, block_size=4)
    assert _place(mem, [(0, 0, 4)]) is MemoryStatus.SUCCESS
    mem.seq_cp(0, 1)
    mem.seq_add(0, -1, -1, -10)
    assert _positions(mem, 0) == _positions(mem, 1) == []
    return mem


@pytest.mark.parametrize("alloc", ["pooled", "paged"])
def test_seq_add_below_zero_on_shared_cells_frees_them(alloc):
    mem = _shared_then_shifted_below_zero(alloc)
    st_ = mem.stats()
    assert (st_.used_cells, st_.free_cells) == (0, 16)
    if alloc == "paged":
        assert mem.pool.tables == {} and mem.pool.n_free == 4


@pytest.mark.parametrize("alloc", ["pooled", "paged"])
def test_seq_add_below_zero_on_shared_cells_then_append(alloc):
    mem = _shared_then_shifted_below_zero(alloc)
    assert _place(mem, [(1, 0, 1)]) is MemoryStatus.SUCCESS
    assert _positions(mem, 1) == [0]
