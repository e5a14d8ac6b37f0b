"""``kvbench run``: Hydra entry point, sweep validation, and the report at the end of a multirun.

Before Hydra launches anything, ``prevalidate`` expands the sweep (command-line sweeps and a
named experiment's ``hydra.sweeper.params``) and composes every point: an unknown key or group
option, a value of the wrong type, or a value ``harness.config.validate`` rejects stops the
command with one line naming the key, before any model loads. Then Hydra runs each point (one job
directory each); ``ReportCallback`` writes the report and plots into the sweep directory.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from engine.errors import ConfigError, KvbenchError
from engine.gguf.reader import open_gguf
from engine.loader import DTYPES, resolve_model_path
from engine.memory.plan import check, plan
from harness.config import register_configs, validate
from harness.point import find_done, reusable, run_isolated, set_aside
from harness.records import (
    RECORD_NAME,
    config_hash,
    load_records,
    read_record,
    write_record,
)
from harness.report import write_report
from harness.run import point_cache_spec, run_point

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

register_configs()


class ReportCallback(Callback):
    """When a multirun ends, collect its records into the report and plots in the sweep dir."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:

        sweep_dir = Path(config.hydra.sweep.dir)
        _STATE["dir"] = sweep_dir
        out = write_report(sweep_dir)
        print(f"kvbench: report written to {out}", file=sys.stderr)


# What main() needs to know after Hydra returns (or is interrupted): where the records are.
_STATE: dict = {"dir": None, "points": 0, "t0": 0.0, "finished": 0, "measured": 0}


def progress_line(finished: int, total: int, elapsed_s: float, measured: int | None = None) -> str:
    """'[5/36, 1m40s elapsed, about 9m50s left]': the sweep as a whole. The estimate assumes the points left
    take as long as the ``measured`` ones did (points reused from earlier sweeps take no time; a sweep over
    sizes may get slower)."""
    measured = finished if measured is None else measured
    def fmt(s: float) -> str:
        m, sec = divmod(int(round(s)), 60)
        return f"{m}m{sec:02d}s" if m else f"{sec}s"

    if total <= 0:
        return f"[{finished} done, {fmt(elapsed_s)} elapsed]"
    left = max(total - finished, 0)
    eta = f", about {fmt(elapsed_s / measured * left)} left" if measured and left else ""
    return f"[{finished}/{total}, {fmt(elapsed_s)} elapsed{eta}]"


def _fmt(m: dict, key: str, spec: str, scale: float = 1.0) -> str:
    v = m.get(key)
    return format(v * scale, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else "n/a"


def summary_line(rec) -> str:
    """One line per finished point, whatever it holds (a failed point has no metrics)."""
    m = rec.metrics
    alloc = m.get("run.memory_kind") or rec.config.get("allocator", "?")  # llama.cpp points: its memory
    if rec.status == "failed":
        return f"FAILED: {rec.error}"
    if m.get("run.memory_only"):
        line = (f"{alloc:<7} memory-only: weights {_fmt(m, 'memory.weights_bytes', '.2f', 2**-30)} GiB "
                f"+ KV peak {_fmt(m, 'memory.kv_reserved_transient_peak_bytes', '.0f', 2**-20)} MiB")
    else:
        line = (f"{alloc:<7} TPOT p50 {_fmt(m, 'latency.tpot_ms.p50', '.2f')} ms, "
                f"peak RSS {_fmt(m, 'memory.peak_rss_bytes', '.0f', 2**-20)} MiB, "
                f"kv_waste {_fmt(m, 'fragmentation.kv_waste.time_weighted', '.3f')}")
    if rec.status == "degraded":
        line += f"; DEGRADED: {rec.error}"
    if m.get("noise.flagged"):
        line += f"; NOISY: {m.get('noise.reason')}"
    return line


def _noisy(rec) -> bool:
    return rec.status == "ok" and bool(rec.metrics.get("noise.flagged"))


@hydra.main(version_base="1.3", config_path=str(EXPERIMENTS), config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    import dataclasses



    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    choices = {k: str(v) for k, v in hc.runtime.choices.items() if not k.startswith("hydra")}
    sweep_dir = Path(hc.sweep.dir if hc.mode == RunMode.MULTIRUN else hc.run.dir)
    _STATE["dir"] = sweep_dir if hc.mode == RunMode.MULTIRUN else out
    h, own = config_hash(cfg), out / RECORD_NAME
    if own.exists() and not cfg.force:  # the same sweep rerun into the same directory: keep what it finished
        try:
            prev = read_record(own)
        except (OSError, ValueError, TypeError):
            prev = None
        if prev is not None and prev.config_hash == h and reusable(prev):
            _STATE["finished"] += 1
            print(f"kvbench: {out}: finished before in this sweep directory, kept (--force reruns it)",
                  file=sys.stderr)
            return
    roots = [sweep_dir] + [Path(p) for p in str(cfg.resume_from).split(",") if p]
    done = None if cfg.force else find_done(roots, h, exclude=out)
    set_aside(own)  # failed, degraded, noisy or another config's: kept as record.replaced-<k>.json
    if done is not None:
        rec = dataclasses.replace(read_record(done), resumed_from=str(done), overrides=overrides, choices=choices)
        write_record(own, rec)
        _STATE["finished"] += 1
        print(f"kvbench: {out}: reused {done} (same config, finished cleanly; --force reruns it)", file=sys.stderr)
        return
    run = run_isolated if cfg.isolate else run_point
    rec = run(cfg, out, overrides, choices)
    noisy: list[str] = []
    while _noisy(rec) and len(noisy) < cfg.retry_noisy:  # --retry-noisy K: measure it again, keep the evidence
        noisy.append(rec.metrics.get("noise.reason", ""))
        own.rename(out / f"noisy-attempt-{len(noisy)}.json")
        print(f"kvbench: {out}: noisy ({noisy[-1]}); rerunning ({len(noisy)} of {cfg.retry_noisy})", file=sys.stderr)
        rec = run(cfg, out, overrides, choices)
    if noisy:
        rec = dataclasses.replace(rec, noisy_attempts=noisy)
        write_record(out / RECORD_NAME, rec)
    _STATE["finished"] += 1
    _STATE["measured"] += 1
    where = progress_line(_STATE["finished"], _STATE["points"], time.monotonic() - _STATE["t0"],
                          _STATE["measured"]) if hc.mode == RunMode.MULTIRUN else ""
    print(f"kvbench: {out}: {summary_line(rec)} {where}".rstrip(), file=sys.stderr)


# -- validation of a whole sweep before it starts ---------------------------------------------------
_HYDRA_FLAGS_WITH_VALUE = {"-cd", "--config-dir", "-cp", "--config-path", "-cn", "--config-name", "--cfg", "-c",
                           "--package", "-p", "--experimental-rerun"}


def _split_argv(argv: list[str]) -> list[str]:
    """The override arguments among Hydra's command line (flags and their values dropped)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in _HYDRA_FLAGS_WITH_VALUE:
            skip = True
        elif a.startswith("-"):
            continue
        else:
            out.append(a)
    return out


def _message(e: Exception) -> str:
    """Hydra's and OmegaConf's multi-line errors as one line that names the key."""
    text = str(e)
    if isinstance(e, MissingConfigException):
        m = re.search(r"Could not find '([^/']+)/([^']+)'", text)
        opts = [o for o in re.findall(r"^\t(\S+)$", text, flags=re.M) if not o.startswith("base_")]
        if m:
            return f"unknown {m.group(1)} '{m.group(2)}'; available: {', '.join(opts) or '(none)'}"
    m = re.search(r"Could not override '([^']+)'", text)
    if m and "not in struct" in text:
        return f"unknown key '{m.group(1)}'; see experiments/config.yaml and harness/config.py for the keys"
    key = re.search(r"full_key: (\S+)", text)
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    cause = e.__cause__
    if cause is not None and not key:
        key = re.search(r"full_key: (\S+)", str(cause))
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else first
    return f"{key.group(1)}: {first}" if key else first


def sweep_points(argv: list[str]) -> list[list[str]]:
    """Every point's override list, expanded exactly as Hydra's basic sweeper will: the config's
    ``hydra.sweeper.params`` first, the command line after (a key given in both: the command line wins)."""

    parser = OverridesParser.create()
    overrides = _split_argv(argv)
    try:
        parsed = parser.parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(f"bad override: {_message(e)}") from None
    swept = [o.input_line for o in parsed if o.is_sweep_override()]
    if swept and not ({"-m", "--multirun"} & set(argv)):
        raise ConfigError(f"'{swept[0]}' is a sweep; add -m (--multirun) to run every point")
    if any(o.get_key_element() in ("repeats", "repeat") for o in parsed if o.is_sweep_override()):
        raise ConfigError("repeats cannot be swept: give one number (every point then runs that many rounds)")
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    with initialize_config_dir(config_dir=str(EXPERIMENTS), version_base="1.3"):
        try:
            base = compose("config", overrides=fixed, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(_message(e)) from None
    params = OmegaConf.select(base, "hydra.sweeper.params") or {}
    if not ({"-m", "--multirun"} & set(argv)):
        if any(o.get_key_element() == "repeats" for o in parsed) and base.repeats > 1:
            raise ConfigError(f"repeats = {base.repeats} runs every point {base.repeats} times: add -m (--multirun)")
        params = {}  # a single run ignores the experiment's sweep and its repeats, as Hydra does
    lines = [f"{k}={v}" for k, v in params.items()] + overrides
    batches = BasicSweeper.split_arguments(parser.parse_overrides(lines), None)
    return [list(p) for batch in batches for p in batch] or [[]]


def prevalidate(argv: list[str]) -> int:
    """Compose and validate every sweep point; returns how many points there are."""

    points = sweep_points(argv)
    models: dict = {}
    with initialize_config_dir(config_dir=str(EXPERIMENTS), version_base="1.3"):
        for ov in points:
            try:
                cfg = compose("config", overrides=ov)
            except (HydraException, OmegaConfBaseException) as e:
                raise ConfigError(_message(e)) from None
            try:
                validate(cfg)
                if cfg.memory_check:
                    check_planned_memory(cfg, models)
            except KvbenchError as e:
                raise type(e)(f"{e} (point: {' '.join(ov) or 'defaults'})") from None
    return len(points)


def check_planned_memory(cfg: DictConfig, models: dict) -> None:
    """The point's planned memory against what the machine has, from the model file's header only."""
    import torch


    name = cfg.model.name
    if name not in models:
        f = open_gguf(resolve_model_path(name))
        models[name] = (f, f.config())
    f, mc = models[name]
    if not mc.weights_present or OmegaConf.select(cfg, "workload.fit_cache"):
        return  # memory-only: nothing is allocated; a workload-sized cache is checked when the point runs
    weights = f.planned_weight_bytes(mc, cfg.model.compute, DTYPES[cfg.model.dtype])
    spec = point_cache_spec(cfg)
    check(plan(mc, spec, cfg.ubatch, weights), torch.device(cfg.device.split(":")[0]), spec)


def _take_flags(argv: list[str]) -> list[str]:
    """kvbench's own flags as overrides: --quiet, --force, --retry-noisy K, --resume-from DIR (repeatable)."""
    argv = list(argv)
    dirs = []
    while "--resume-from" in argv:
        i = argv.index("--resume-from")
        if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
            raise ConfigError("--resume-from DIR: give the sweep directory whose finished points to reuse")
        d = Path(argv[i + 1])
        if not d.is_dir():
            raise ConfigError(f"--resume-from {d}: not a directory; give an earlier sweep's directory")
        dirs.append(str(d.resolve()))
        argv[i:i + 2] = []
    if dirs:
        argv.append("resume_from='" + ",".join(dirs) + "'")
    for flag, override in (("--quiet", "quiet=true"), ("--force", "force=true")):
        if flag in argv:
            argv.remove(flag)
            argv.append(override)
    if "--retry-noisy" in argv:
        i = argv.index("--retry-noisy")
        if i + 1 >= len(argv) or not argv[i + 1].isdigit():
            raise ConfigError("--retry-noisy K: K, the most reruns of a noisy point, must be a number >= 0")
        k = argv[i + 1]
        argv[i:i + 2] = []
        argv.append(f"retry_noisy={k}")
    return argv


def sweep_exit_status(where: Path | None, expected: int) -> int:
    """0 when every point is ok, 1 when some point failed, is degraded, or left no record."""

    if where is None:
        return 1
    recs = [r for _, r in load_records(where)]
    return 0 if len(recs) >= expected and all(r.status == "ok" for r in recs) else 1


def _done(where: Path | None) -> int:
    """Points a rerun will reuse: clean ok records (not failed, degraded or noisy)."""

    return 0 if where is None or not where.exists() else sum(reusable(r) for _, r in load_records(where))


def main(argv: list[str]) -> int:
    """``kvbench run [--quiet] [--force] [--retry-noisy K] [hydra args and overrides]``.

    Exit status: 0 every point ok; 1 the sweep finished with failed or degraded points; 2 bad input
    found before anything ran (ConfigError and the rest of the KvbenchError family, raised from
    here); 130 interrupted (Ctrl-C), after one line saying how far it got."""
    argv = _take_flags(argv)
    info_only = any(a in ("--help", "-h", "--hydra-help", "--info", "--cfg", "-c") for a in argv)
    _STATE.update(dir=None, points=0, t0=time.monotonic(), finished=0, measured=0)
    try:
        if not info_only:
            _STATE["points"] = prevalidate(argv)
        sys.argv = ["kvbench run"] + argv
        hydra_main()
    except KeyboardInterrupt:
        where = _STATE["dir"]
        hint = f"rerun the same command with --resume-from {where}" if where else "rerun the same command"
        print(f"interrupted: {_done(where)} of {_STATE['points'] or '?'} points done; {hint} to resume",
              file=sys.stderr)
        return 130
    if info_only:
        return 0
    return sweep_exit_status(_STATE["dir"], _STATE["points"])
