"""Run a fuzz campaign in a child process, bounded in time and memory: how the test suite calls them.

A hang inside native code never returns to Python, so the per-case SIGALRM cannot end it; the
child's wall-clock limit here does. RLIMIT_AS keeps a runaway allocation from taking the machine:
it becomes a MemoryError, which the campaign reports as a crash.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ADDRESS_SPACE = 16 << 30  # torch maps a few GB of address space at import; 16 GiB leaves room for that only


def run_campaign(module: str, out: Path, cases: int, deadline_s: float, timeout_s: float, seed: int = 0) -> dict:
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))

    cmd = [sys.executable, "-m", module, "--cases", str(cases), "--deadline", str(deadline_s), "--seed", str(seed),
           "--out", str(out), "--workdir", str(out.parent / (out.stem + "-work"))]
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, preexec_fn=limit,
                           env=dict(os.environ, PYTHONHASHSEED="0"))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{module} ran past {timeout_s} s: a case hangs in native code") from None
    if not out.exists():
        raise AssertionError(f"{module} exited {r.returncode} without a report:\n{r.stderr[-3000:]}")
    return json.loads(out.read_text())
