"""Safe sweeps: a crashed point is a failed record; a killed sweep resumes; --force reruns."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.harness.test_sweep import SMALL as _SMALL
from tests.integration.harness.test_sweep import kvbench

# Resume reuses only clean points; noise tracking is off here so that what is reused does not depend on
# what else this machine is doing (tests/integration/harness/test_noise.py covers noisy points).
SMALL = _SMALL + ["noise.track=false"]


def records(d: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(d.glob("*/record.json"))}


def test_a_point_killed_like_an_oom_is_recorded_and_the_sweep_goes_on(tmp_path):
    env = dict(os.environ, KVBENCH_FAULT_INJECT="SIGKILL@allocator=pooled")
    r = subprocess.run([sys.executable, "-m", "harness.cli", "run", "-m", "allocator=naive,pooled,paged",
                        f"hydra.sweep.dir={tmp_path / 's'}", *SMALL], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1, r.stderr  # finished, with a failed point
    recs = records(tmp_path / "s")
    assert [recs[k]["status"] for k in ("0", "1", "2")] == ["ok", "failed", "ok"]
    assert "SIGKILL" in recs["1"]["error"] and "out of memory" in recs["1"]["error"]
    assert "SIGKILL" in (tmp_path / "s" / "report.md").read_text()


def test_a_killed_sweep_resumes_in_place_and_from_a_named_dir_and_force_reruns(tmp_path):
    cmd = [sys.executable, "-m", "harness.cli", "run", "-m", "allocator=naive,pooled,paged", *SMALL]
    first = tmp_path / "results" / "multirun" / "first"
    proc = subprocess.Popen(cmd + [f"hydra.sweep.dir={first}"], cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not (first / "0" / "record.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole sweep dies after its first point
    proc.wait()
    done_first = records(first)
    assert "0" in done_first and len(done_first) < 3
    kept = (first / "0" / "record.json").read_text()

    # an unrelated sweep beside it is never searched
    beside = tmp_path / "results" / "multirun" / "beside"
    r = kvbench(tmp_path, "run", *cmd[4:], f"hydra.sweep.dir={beside}")
    assert r.returncode == 0 and all(not v["resumed_from"] for v in records(beside).values())

    # the same command into the same directory resumes there: the finished record is kept as it was
    r = kvbench(tmp_path, "run", *cmd[4:], f"hydra.sweep.dir={first}")
    assert r.returncode == 0, r.stderr
    recs = records(first)
    assert sorted(recs) == ["0", "1", "2"] and all(v["status"] == "ok" for v in recs.values())
    assert (first / "0" / "record.json").read_text() == kept and "kept" in r.stderr
    assert not list(first.glob("*/record.replaced-*.json"))  # nothing had to be replaced
    assert len((first / "report.csv").read_text().strip().splitlines()) == 4  # header + 3 points

    # a new directory reuses what the user names, and says where from
    second = tmp_path / "results" / "multirun" / "second"
    r = kvbench(tmp_path, "run", *cmd[4:], "--resume-from", str(first), f"hydra.sweep.dir={second}")
    assert r.returncode == 0, r.stderr
    recs = records(second)
    assert all(v["resumed_from"].startswith(str(first)) for v in recs.values()) and r.stderr.count("reused") == 3
    assert "## Reused from earlier sweeps" in (second / "report.md").read_text()

    r = kvbench(tmp_path, "run", *cmd[4:], "--force", f"hydra.sweep.dir={first}")
    assert r.returncode == 0, r.stderr
    assert all(not v["resumed_from"] for v in records(first).values())
    assert len(list(first.glob("*/record.replaced-*.json"))) == 3  # the earlier records are kept, not deleted


def test_failed_degraded_and_noisy_points_are_not_reused(tmp_path):
    base = [sys.executable, "-m", "harness.cli", "run", "-m", "allocator=naive,pooled", *_SMALL]
    first = tmp_path / "results" / "multirun" / "first"
    # max_probe_slowdown=1 flags every point (a probe's median is never exactly its best): noisy on purpose
    r = kvbench(tmp_path, "run", *base[4:], "noise.max_probe_slowdown=1", "--retry-noisy", "1",
                f"hydra.sweep.dir={first}")
    assert r.returncode == 0, r.stderr  # noisy points are ok points, marked
    recs = records(first)
    assert all(v["metrics"]["noise.flagged"] and len(v["noisy_attempts"]) == 1 for v in recs.values())
    assert all((first / k / "noisy-attempt-1.json").exists() for k in recs)  # the evidence is kept
    assert r.stderr.count("rerunning (1 of 1)") == 2
    md = (first / "report.md").read_text()
    assert "## Noise" in md and "2 measured under contention" in md

    second = tmp_path / "results" / "multirun" / "second"
    r = kvbench(tmp_path, "run", *base[4:], "--resume-from", str(first), f"hydra.sweep.dir={second}")
    assert r.returncode == 0, r.stderr
    assert all(not v["resumed_from"] for v in records(second).values())  # noisy: measured again
    r = kvbench(tmp_path, "run", *base[4:], f"hydra.sweep.dir={first}")  # in place: remeasured, old ones kept
    assert r.returncode == 0 and len(list(first.glob("*/record.replaced-*.json"))) == 2

    third = tmp_path / "results" / "multirun" / "third"
    r = kvbench(tmp_path, "run", "-m", "allocator=naive,pooled", *_SMALL[:-2], "cache.size=16", "cache.block_size=8",
                "--quiet", f"hydra.sweep.dir={third}")
    assert r.returncode == 1
    r = kvbench(tmp_path, "run", "-m", "allocator=naive,pooled", *_SMALL[:-2], "cache.size=16", "cache.block_size=8",
                "--quiet", f"hydra.sweep.dir={third}")
    assert r.returncode == 1 and "kept" not in r.stderr  # failed: measured again in place
    assert len(list(third.glob("*/record.replaced-*.json"))) == 2
