"""Noise detection end to end: a sweep run beside a CPU burner flags its points; a quiet one flags none.

The burner is a second process spinning on one core for a bounded time (BURN_S), killed at the end
of the test whatever happens. With two torch threads on two cores it is the neighbour that slows a
run 5-20x (docs/metrics.md, "Noise").
"""

import json
import subprocess
import sys
from contextlib import contextmanager

from tests.integration.harness.test_sweep import SMALL, kvbench

BURN_S = 120


@contextmanager
def burner():
    p = subprocess.Popen([sys.executable, "-c",
                          f"import time\nt = time.time() + {BURN_S}\nwhile time.time() < t: pass"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def _flags(d):
    recs = [json.loads(p.read_text()) for p in sorted(d.glob("*/record.json"))]
    return [(r["metrics"]["noise.flagged"], r["metrics"]["noise.reason"]) for r in recs]


def test_a_burner_flags_every_point_and_a_quiet_machine_none(tmp_path):
    args = ["run", "-m", "allocator=naive,pooled", *SMALL]
    # retry_noisy: a CI machine's own transient neighbour must not fail the quiet half (a point is measured
    # again when flagged, as a user would run a sweep on a shared machine); the burner's half never retries
    r = kvbench(tmp_path, *args, "retry_noisy=2", f"hydra.sweep.dir={tmp_path / 'quiet'}")
    assert r.returncode == 0, r.stderr
    quiet = _flags(tmp_path / "quiet")
    assert len(quiet) == 2 and not any(f for f, _ in quiet), quiet

    with burner():
        r = kvbench(tmp_path, *args, "--force", f"hydra.sweep.dir={tmp_path / 'busy'}")
    assert r.returncode == 0, r.stderr
    busy = _flags(tmp_path / "busy")
    assert len(busy) == 2 and all(f for f, _ in busy), busy
    assert all(reason for _, reason in busy) and "NOISY" in r.stderr
    md = (tmp_path / "busy" / "report.md").read_text()
    assert "## Noise" in md and "2 measured under contention" in md
