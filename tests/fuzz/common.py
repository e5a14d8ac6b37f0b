"""What the fuzz campaigns share: running one case under a time and memory watch, the hypothesis loop
that draws the cases and tallies their outcomes, and the command line.

A case is a function that returns its "accepted" outcome (``loaded``, ``restored``) or raises. A
``KvbenchError`` with a one-line message is ``clean``; ``Finding`` (raised by a case that saw
something wrong that raised nothing, e.g. a refused state that changed the memory) and any other
exception are ``crash``; running past the time limit is ``hang``; growing the peak RSS past the limit
is ``memory``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Callable

CASE_TIMEOUT_S = 10
MAX_RSS_MIB = 1024
FINDINGS = ("crash", "hang", "memory")


class Hang(BaseException):
    """Raised by SIGALRM: a BaseException, so that no ``except Exception`` in the code under test eats it."""


class Finding(Exception):
    """A case saw something wrong that raised nothing (reported as a crash)."""


def _hwm_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def classify(case: Callable[[], str], timeout_s: float, max_rss_mib: float) -> tuple[str, str]:
    """(outcome, detail) of one case."""
    from engine.errors import KvbenchError

    def alarm(*_):
        raise Hang()

    old = signal.signal(signal.SIGALRM, alarm)
    _hwm_reset()
    start = _hwm_mib()
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        outcome, detail = case(), ""
    except KvbenchError as e:
        msg = str(e)
        outcome, detail = ("crash", f"multi-line message: {msg[:300]!r}") if "\n" in msg else ("clean", msg[:300])
    except Hang:
        outcome, detail = "hang", f"still running after {timeout_s} s"
    except Exception as e:  # noqa: BLE001 -- that is the finding
        outcome, detail = "crash", "".join(traceback.format_exception_only(type(e), e)).strip()[:300]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    grew = _hwm_mib() - start
    if grew > max_rss_mib and outcome != "crash":
        outcome, detail = "memory", f"peak RSS grew {grew:.0f} MiB ({outcome}: {detail})"
    return outcome, detail


def drive(cases: int, seed: int | None, deadline_s: float | None,
          one_case: Callable[[Callable], tuple[str, str, str, dict]]) -> dict:
    """Draw ``cases`` cases with hypothesis; ``one_case(draw)`` returns (outcome, mutation, detail, extra).

    ``draw(label, choices)`` picks from a list, ``draw(label, lo, hi)`` an integer in [lo, hi]. Only the
    generate phase runs (no shrinking: a campaign counts outcomes instead of stopping at the first)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hyp_seed
    from hypothesis import strategies as st

    counts: Counter = Counter()
    by_mutation: Counter = Counter()
    findings: list[dict] = []
    t0 = time.monotonic()

    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              derandomize=seed is None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one(d):
        if deadline_s is not None and time.monotonic() - t0 > deadline_s:
            return

        def draw(label, *args):
            if len(args) == 1:
                return d.draw(st.sampled_from(args[0]), label=label)
            return d.draw(st.integers(args[0], max(args[0], args[1])), label=label)

        outcome, what, detail, extra = one_case(draw)
        counts[outcome] += 1
        by_mutation[f"{what.split()[0]}:{outcome}"] += 1
        if outcome in FINDINGS:
            findings.append({"outcome": outcome, "mutation": what, "detail": detail, **extra})

    (hyp_seed(seed)(one) if seed is not None else one)()
    return {"cases": sum(counts.values()), "counts": dict(counts), "by_mutation": dict(sorted(by_mutation.items())),
            "findings": findings, "seconds": round(time.monotonic() - t0, 1)}


def main(doc: str, campaign: Callable[..., dict], default_cases: int, argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=default_cases)
    ap.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: derandomized)")
    ap.add_argument("--case-timeout", type=float, default=CASE_TIMEOUT_S)
    ap.add_argument("--max-rss-mib", type=float, default=MAX_RSS_MIB)
    ap.add_argument("--deadline", type=float, default=None, help="stop drawing new cases after this many seconds")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="write the report as JSON here")
    a = ap.parse_args(argv)
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="kvbench-fuzz-"))
    os.environ.setdefault("KVBENCH_CACHE", str(workdir / "cache"))
    rep = campaign(a.cases, a.seed, workdir, a.case_timeout, a.max_rss_mib, a.deadline)
    if a.out:
        Path(a.out).write_text(json.dumps(rep, indent=1))
    print(json.dumps({k: rep[k] for k in ("cases", "counts", "seconds")}))
    for f in rep["findings"][:20]:
        print(f"{f['outcome']:<7} {f['mutation']:<40} {f['detail'][:160]}", file=sys.stderr)
    return 0 if not rep["findings"] else 1
