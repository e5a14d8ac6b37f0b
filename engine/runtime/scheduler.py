"""Parallel sequences: admission, continuous batching, preemption, prefix sharing.

Up to ``parallel`` requests run at once, each in its own sequence slot (seq_id = slot). Every
``step`` builds one batch: the pending prompt tokens of newly admitted requests (at most
``n_batch`` tokens per step, so a long prompt is prefilled over several steps) and one token for
every request that is decoding. A finished request frees its memory with ``seq_rm`` and the next
queued request is admitted in the same step loop (continuous batching).

When the memory cannot hold the batch (``MemoryFullError`` from ``Engine.decode``; nothing was
changed), the youngest running request is preempted: its cells are freed and it goes back to the
front of the queue, to be recomputed from its prompt plus the tokens it had generated (vLLM's
recompute policy). A request that cannot fit even alone fails with a reason. The scheduler never
raises for a full memory and never overwrites a live cell (the memory's ``init_batch`` is a dry
run).

Prefix sharing: a newly admitted request whose prompt starts with tokens another running request
already holds gets them by ``seq_cp`` (cells or blocks are shared, naive copies) and prefills
only the rest.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.batch import Batch
from engine.errors import ConfigError, MemoryFullError
from engine.runtime.engine import Generator, synchronize
from engine.runtime.sampling import Sampler, SamplingParams


@dataclass
class Request:
    id: int
    prompt: list[int]
    n_predict: int
    seed_offset: int | None = None  # sampling stream; default: the request id


@dataclass
class RequestResult:
    id: int
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    status: str = "queued"  # queued | running | done | failed
    error: str = ""
    preemptions: int = 0
    shared_prefix: int = 0  # prompt tokens obtained by seq_cp instead of prefill (first admission)
    t_submit: float = 0.0
    token_times: list[float] = field(default_factory=list)  # clock after each generated token



@dataclass
class _Running:
    req: Request
    res: RequestResult
    slot: int
    order: int  # admission counter: the highest is the youngest
    history: list[int]  # tokens whose K/V are (or will be, after pending) in memory, then the last sampled
    pending: list[int]  # prompt tokens still to prefill
    n_cached: int  # tokens of history held in memory
    sampler: Sampler


@dataclass
class StepInfo:
    n_tokens: int  # tokens in the batch that ran
    n_prefill: int
    n_decode: int
    seconds: float
    preempted: list[int]  # request ids preempted while building this step
    finished: list[int]
    failed: list[int]
    # (KV, recurrent state) live bytes after the batch ran and before this step freed its finished sequences:
    # the step's true peak, which the memory no longer shows when the step returns. None: nothing was freed.
    live_before_free: tuple[int, int] | None = None

    @property
    def is_decode(self) -> bool:
        """A decode step: it carried decode tokens and no prompt tokens (docs/metrics.md)."""
        return self.n_decode > 0 and self.n_prefill == 0


class Scheduler:
    def __init__(self, engine: Generator, parallel: int, sampling: SamplingParams = SamplingParams(),
                 eos_id: int | None = None, share_prefix: bool = True, n_batch: int = 2048,
                 clock=time.perf_counter) -> None:
        if parallel <= 0:
            raise ConfigError(f"parallel {parallel}: must be positive")
        if n_batch <= 0:
            raise ConfigError(f"n_batch {n_batch}: must be positive")
        self.engine, self.mem = engine, engine.memory
        self.parallel, self.sampling, self.eos_id = parallel, sampling, eos_id
        self.share_prefix, self.n_batch, self.clock = share_prefix, n_batch, clock
        self.queue: deque[tuple[Request, RequestResult]] = deque()
        self.running: dict[int, _Running] = {}  # slot -> running request
        self.results: dict[int, RequestResult] = {}
        self.preemptions = 0
        self._order = 0

    # -- queue ---------------------------------------------------------------------------------
    def submit(self, req: Request, t_submit: float | None = None) -> RequestResult:
        """Queue a request; ``t_submit`` (clock time) is when it arrived, default now."""
        if not req.prompt:
            raise ConfigError(f"request {req.id}: empty prompt")
        if req.n_predict <= 0:
            raise ConfigError(f"request {req.id}: n_predict must be positive")
        res = RequestResult(req.id, list(req.prompt), t_submit=self.clock() if t_submit is None else t_submit)
        self.results[req.id] = res
        self.queue.append((req, res))
        return res

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.running)

    def _prefix_pending(self, tokens: list[int]) -> bool:
        """Is a running request still prefilling tokens this one could share? (then wait a step)"""
        for o in self.running.values():
            if o.pending and o.history[: o.n_cached + 1] == tokens[: o.n_cached + 1] and len(tokens) > o.n_cached + 1:
                return True
        return False

    def _admit(self) -> None:
        """FIFO admission into free slots, while the memory has room for the next prompt.

        The room check (vLLM's can_allocate) keeps a preempted request from being re-admitted
        into a memory that is still full, only to be preempted again at the next step. With
        nothing running a request is admitted regardless, so one too big for the cache fails
        with its reason instead of waiting forever.
        """
        while self.queue and len(self.running) < self.parallel:
            req, res = self.queue[0]
            history = res.prompt + res.tokens  # a preempted request resumes where it was
            if self.share_prefix and self.mem.shares_partial_prefix and self._prefix_pending(history):
                return  # admit once the shared prefix is in memory, then seq_cp it
            src, n_shared = self._best_prefix(history) if self.share_prefix else (None, 0)
            if self.running and not self.mem.can_admit(len(history) - n_shared + 1):
                return
            self.queue.popleft()
            slot = min(set(range(self.parallel)) - set(self.running))
            r = _Running(req, res, slot, self._order, history, list(history), 0,
                         Sampler(self.sampling, req.id if req.seed_offset is None else req.seed_offset))
            self._order += 1
            res.status = "running"
            if src is not None and self._share(r, src, n_shared) and not res.preemptions and not res.tokens:
                res.shared_prefix = n_shared
            self.running[slot] = r

    def _best_prefix(self, history: list[int]) -> tuple[_Running | None, int]:
        """The running request holding the longest prefix of history (the last token always runs)."""
        best, src = 0, None
        limit = len(history) - 1
        partial = self.mem.shares_partial_prefix
        for o in self.running.values():
            n, m = 0, min(limit, o.n_cached)
            while n < m and o.history[n] == history[n]:
                n += 1
            if not partial and n != o.n_cached:
                continue  # a recurrent state exists only at o's last position: all or nothing
            if n > best:
                best, src = n, o
        return src, best

    def _share(self, r: _Running, src: _Running, n: int) -> bool:
        """seq_cp src's first n tokens to r; r then prefills only the rest."""
        try:
            self.mem.seq_cp(src.slot, r.slot, 0, n)
        except MemoryFullError:  # naive copies and may not have room; prefill instead
            return False
        r.pending, r.n_cached = r.history[n:], n
        return True

    # -- one step ------------------------------------------------------------------------------
    def _build(self) -> tuple[Batch, list[tuple[_Running, int]]]:
        """The batch for this step and, per output row, (request, tokens it consumes)."""
        batch, rows = Batch(), []
        budget = self.n_batch
        for r in sorted(self.running.values(), key=lambda r: r.order):
            if r.pending:
                if budget <= 0:
                    continue
                chunk = r.pending[:budget]
                last = len(chunk) == len(r.pending)
                batch.add_sequence(chunk, r.slot, pos0=r.n_cached, output="last" if last else "none")
                budget -= len(chunk)
                rows.append((r, len(chunk)))
            else:
                batch.add(r.history[-1], r.n_cached, r.slot, output=True)
                rows.append((r, 1))
        return batch, rows

    def _preempt(self, r: _Running) -> tuple[Request, RequestResult]:
        """Free r's memory and hand it back for recompute (prompt + tokens generated so far)."""
        self.mem.seq_rm(r.slot, -1, -1)
        del self.running[r.slot]
        r.res.status = "queued"
        r.res.preemptions += 1
        self.preemptions += 1
        return r.req, r.res

    def _fail(self, r: _Running) -> None:
        self.mem.seq_rm(r.slot, -1, -1)
        del self.running[r.slot]
        r.res.status = "failed"
        r.res.error = (f"request {r.req.id} needs more memory than the whole cache alone "
                       f"({len(r.history)} tokens of context, cache.size {self.mem.stats().n_cells}); "
                       "raise cache.size")

    def step(self) -> StepInfo | None:
        """Admit, then run one batch. None when nothing is left to do.

        Terminates: each failed attempt removes one request from the running set, either for
        good (it failed alone) or parked until after this step (preempted while others run).
        """
        preempted, failed, parked = [], [], []
        while True:
            self._admit()
            if not self.running:
                if not parked:
                    return None
                self.queue.extendleft(reversed(parked))
                parked = []
                continue
            batch, rows = self._build()
            try:
                synchronize(self.engine.device)
                t0 = self.clock()
                logits = self.engine.decode(batch)
                synchronize(self.engine.device)
                t1 = self.clock()
                break
            except MemoryFullError:
                youngest = max(self.running.values(), key=lambda r: r.order)
                if len(self.running) == 1:
                    self._fail(youngest)
                    failed.append(youngest.req.id)
                else:
                    parked.append(self._preempt(youngest))
                    preempted.append(youngest.req.id)
        self.queue.extendleft(reversed(parked))  # preempted requests go first once room frees up
        finished, i_out = [], 0
        n_prefill = n_decode = 0
        before_free = None
        for r, n in rows:
            if r.pending:
                r.pending = r.pending[n:]
                r.n_cached += n
                n_prefill += n
                if r.pending:
                    continue
            else:
                r.n_cached += 1
                n_decode += 1
            tok = r.sampler(logits[i_out], r.history)
            i_out += 1
            r.history.append(tok)
            r.res.tokens.append(tok)
            r.res.token_times.append(t1)
            if len(r.res.tokens) >= r.req.n_predict or tok == self.eos_id:
                r.res.status = "done"
                if before_free is None:
                    before_free = tuple(p.usage()[0] if p is not None else 0 for p in self.mem.parts())
                self.mem.seq_rm(r.slot, -1, -1)
                del self.running[r.slot]
                finished.append(r.req.id)
        return StepInfo(len(batch), n_prefill, n_decode, t1 - t0, preempted, finished, failed, before_free)
