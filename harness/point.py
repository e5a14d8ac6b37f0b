"""Run one sweep point in a process of its own, and record it even if that process dies.

``run_isolated`` writes the resolved config into the job directory and starts
``python -m harness.point JOB_DIR``. The child runs ``run_point`` and writes ``record.json``.
If the child dies without a record (killed by the OS for memory, a segfault in a kernel, a
timeout), the parent writes a failed record that says how it died. A fresh process per point
also keeps measurements apart: peak RSS, malloc's free lists and torch's caches start clean.

Resume: a point whose config hash matches a clean record (``ok``, not noisy) already in this sweep's
directory (the same command rerun with the same ``hydra.sweep.dir``), or in a directory the user
names with ``--resume-from``, is not run again: its own record is kept, or the other one is copied in
with ``resumed_from`` set, so this sweep's report covers it and says where it came from. Nothing is
searched beyond those directories, and no record is ever deleted: one that must be replaced (failed,
degraded, noisy, or of another config) is renamed ``record.replaced-<k>.json`` first.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from harness.config import RunConfig, register_configs
from harness.faults import inject_signals
from harness.records import RECORD_NAME, Record, config_hash, read_record, write_record
from harness.run import run_point

POINT_CONFIG = "point.yaml"
def reusable(rec: Record) -> bool:
    """Resume reuses only clean measurements: not failed, not degraded, not measured under contention."""
    return rec.status == "ok" and not rec.metrics.get("noise.flagged")


def find_done(roots: list[Path], h: str, exclude: Path) -> Path | None:
    """A reusable original record (not itself a copy) with config hash h under roots (not in exclude), newest first."""
    best = None
    for root in roots:
        for p in Path(root).rglob(RECORD_NAME) if Path(root).is_dir() else []:
            if exclude in p.parents:
                continue
            try:
                rec = read_record(p)
            except (OSError, ValueError, TypeError):
                continue
            if rec.config_hash == h and reusable(rec) and not rec.resumed_from:
                if best is None or p.stat().st_mtime > best.stat().st_mtime:
                    best = p
    return best


def set_aside(path: Path) -> Path | None:
    """Rename a record that is about to be replaced to record.replaced-<k>.json; never delete it."""
    if not path.exists():
        return None
    k = 1
    while (dst := path.with_name(f"record.replaced-{k}.json")).exists():
        k += 1
    path.rename(dst)
    return dst


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the OS kills processes that run out of memory this way)" if -code == signal.SIGKILL else ""
        return f"the point's process was killed by {name}{hint}"
    return f"the point's process exited with status {code} without writing a record"


def _ignore_sigint() -> None:
    """In the child: Ctrl-C goes to the whole foreground process group, and a child interrupted in the
    middle of its imports prints a traceback. The child ignores SIGINT instead; the parent gets the
    KeyboardInterrupt, and subprocess.run kills the child on its way out (no record: the point reruns)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_isolated(cfg: DictConfig, out_dir: Path, overrides: list[str], choices: dict[str, str]) -> Record:
    out_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out_dir / POINT_CONFIG, resolve=True)
    (out_dir / "point.json").write_text(json.dumps({"overrides": overrides, "choices": choices}))
    record_path = out_dir / RECORD_NAME
    set_aside(record_path)  # a record here must come from this run; an older one is kept beside it
    timeout = cfg.timeout_s if cfg.timeout_s and cfg.timeout_s > 0 else None
    cmd = [sys.executable, "-m", "harness.point", str(out_dir)]
    try:
        proc = subprocess.run(cmd, timeout=timeout, env=dict(os.environ), stdout=None, stderr=None,
                              preexec_fn=_ignore_sigint)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = None
    if record_path.exists():
        try:
            return read_record(record_path)
        except (OSError, ValueError, TypeError):
            pass  # a torn record cannot happen (atomic writes), but never trust it blindly
    reason = (f"the point ran longer than timeout_s = {timeout} s and was stopped" if code is None
              else _describe_exit(code))
    conf = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    rec = Record(status="failed", config=conf, error=reason, overrides=overrides, config_hash=config_hash(cfg),
                 choices=choices)
    write_record(record_path, rec)
    return rec


def main(argv: list[str]) -> int:
    """Child process: run the point whose config is in JOB_DIR."""
    register_configs()
    out_dir = Path(argv[0])
    loaded = OmegaConf.load(out_dir / POINT_CONFIG)
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), loaded)
    point = json.loads((out_dir / "point.json").read_text())
    if os.environ.get("KVBENCH_FAULT_INJECT"):  # testing the crash path: die the way the OS would kill a point
        inject_signals(cfg)
    run_point(cfg, out_dir, point["overrides"], point["choices"])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the parent says what happened
        sys.exit(130)
