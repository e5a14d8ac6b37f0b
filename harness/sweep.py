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
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from engine.errors import ConfigError
from harness.config import register_configs, validate

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

register_configs()


class ReportCallback(Callback):
    """When a multirun ends, collect its records into the report and plots in the sweep dir."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from harness.report import write_report

        sweep_dir = Path(config.hydra.sweep.dir)
        out = write_report(sweep_dir)
        print(f"kvbench: report written to {out}", file=sys.stderr)


@hydra.main(version_base="1.3", config_path=str(EXPERIMENTS), config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    import dataclasses

    from hydra.types import RunMode

    from harness.point import config_hash, find_done, run_isolated
    from harness.records import RECORD_NAME, write_record
    from harness.run import run_point

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    choices = {k: str(v) for k, v in hc.runtime.choices.items() if not k.startswith("hydra")}
    sweep_dir = Path(hc.sweep.dir if hc.mode == RunMode.MULTIRUN else hc.run.dir)
    done = None if cfg.force else find_done(sweep_dir.parent, config_hash(cfg), exclude=out)
    if done is not None:
        from harness.records import read_record

        rec = dataclasses.replace(read_record(done), resumed_from=str(done), overrides=overrides, choices=choices)
        write_record(out / RECORD_NAME, rec)
        print(f"kvbench: {out}: done before in {done.parent}, skipped (--force reruns it)", file=sys.stderr)
        return
    rec = run_isolated(cfg, out, overrides, choices) if cfg.isolate else run_point(cfg, out, overrides, choices)
    m = rec.metrics
    if rec.status == "ok" and m.get("run.memory_only"):
        line = (f"{rec.config['allocator']:<7} memory-only: weights {m['memory.weights_bytes'] / 2**30:.2f} GiB "
                f"+ KV peak {m['memory.kv_reserved_transient_peak_bytes'] / 2**20:.0f} MiB")
    elif rec.status == "ok":
        line = (f"{rec.config['allocator']:<7} TPOT p50 {m.get('latency.tpot_ms.p50', float('nan')):.2f} ms, "
                f"peak RSS {m.get('memory.peak_rss_bytes', 0) / 2**20:.0f} MiB, "
                f"kv_waste {m.get('fragmentation.kv_waste.time_weighted', float('nan')):.3f}")
    else:
        line = f"FAILED: {rec.error}"
    print(f"kvbench: {out}: {line}", file=sys.stderr)


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
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parser = OverridesParser.create()
    overrides = _split_argv(argv)
    try:
        parsed = parser.parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(f"bad override: {_message(e)}") from None
    swept = [o.input_line for o in parsed if o.is_sweep_override()]
    if swept and not ({"-m", "--multirun"} & set(argv)):
        raise ConfigError(f"'{swept[0]}' is a sweep; add -m (--multirun) to run every point")
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    with initialize_config_dir(config_dir=str(EXPERIMENTS), version_base="1.3"):
        try:
            base = compose("config", overrides=fixed, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(_message(e)) from None
    params = OmegaConf.select(base, "hydra.sweeper.params") or {}
    if not ({"-m", "--multirun"} & set(argv)):
        params = {}  # a single run ignores the experiment's sweep, as Hydra does
    lines = [f"{k}={v}" for k, v in params.items()] + overrides
    batches = BasicSweeper.split_arguments(parser.parse_overrides(lines), None)
    return [list(p) for batch in batches for p in batch] or [[]]


def prevalidate(argv: list[str]) -> int:
    """Compose and validate every sweep point; returns how many points there are."""
    from hydra import compose, initialize_config_dir

    points = sweep_points(argv)
    with initialize_config_dir(config_dir=str(EXPERIMENTS), version_base="1.3"):
        for ov in points:
            try:
                cfg = compose("config", overrides=ov)
            except (HydraException, OmegaConfBaseException) as e:
                raise ConfigError(_message(e)) from None
            try:
                validate(cfg)
            except ConfigError as e:
                raise ConfigError(f"{e} (point: {' '.join(ov) or 'defaults'})") from None
    return len(points)


def main(argv: list[str]) -> int:
    """``kvbench run [--quiet] [--force] [hydra args and overrides]``."""
    argv = list(argv)
    for flag, override in (("--quiet", "quiet=true"), ("--force", "force=true")):
        if flag in argv:
            argv.remove(flag)
            argv.append(override)
    if not any(a in ("--help", "-h", "--hydra-help", "--info", "--cfg", "-c") for a in argv):
        prevalidate(argv)
    sys.argv = ["kvbench run"] + argv
    hydra_main()
    return 0
