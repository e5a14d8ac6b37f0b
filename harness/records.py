"""One record per sweep point: config + metrics + timeline + environment, as JSON, written atomically.

A record is complete or absent: ``write_record`` goes through a temp file and a rename, so a
crash never leaves half a record. ``load_records`` reads every ``record.json`` under a
directory and skips (with a warning) files that are unreadable, truncated or of another schema.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from engine.atomic import atomic_open

RECORD_NAME = "record.json"
SCHEMA = "kvbench-record/1"


@dataclass
class Record:
    status: str  # "ok" | "degraded" (some requests failed) | "failed" (all failed, or the point crashed)
    config: dict[str, Any]  # the resolved sweep point config
    metrics: dict[str, Any] = field(default_factory=dict)  # flat names, docs/metrics.md
    error: str = ""  # why it failed: one line
    overrides: list[str] = field(default_factory=list)  # what this point changed from the defaults
    choices: dict[str, str] = field(default_factory=dict)  # Hydra group options, e.g. {"workload": "churn"}
    timeline: dict[str, dict[str, list]] = field(default_factory=dict)  # tracker -> series
    env: dict[str, Any] = field(default_factory=dict)
    started_at: str = ""
    duration_s: float = 0.0
    config_hash: str = ""  # config_hash(): what identifies the measurement
    resumed_from: str = ""  # set when a rerun reused this point's record from an earlier sweep
    noisy_attempts: list[str] = field(default_factory=list)  # noise.reason of earlier attempts (--retry-noisy)
    schema: str = SCHEMA


# labels and switches, not measurements (how many rounds a sweep has does not change round 0's run)
_NOT_SEMANTIC = ("quiet", "force", "isolate", "name", "timeout_s", "repeats", "retry_noisy", "noise", "memory_check",
                 "resume_from")


def _hash(conf: dict, drop: tuple[str, ...], version: str = "") -> str:
    conf = {k: v for k, v in conf.items() if k not in drop}
    blob = json.dumps([version, conf], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_hash(cfg: DictConfig) -> str:
    """What identifies a measurement: the resolved config without labels and switches, plus the kvbench version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("kvbench")
    except PackageNotFoundError:
        v = "unknown"
    return _hash(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), _NOT_SEMANTIC, v)


def point_id(conf: dict) -> str:
    """What identifies a sweep point across its rounds: a record's config without ``repeat``."""
    return _hash(conf, _NOT_SEMANTIC + ("repeat",))


def _jsonable(x):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None  # strict JSON: NaN becomes null
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_record(path: Path, rec: Record) -> Path:
    with atomic_open(path, "w") as f:
        json.dump(_jsonable(asdict(rec)), f, indent=1, allow_nan=False)
    return path


STATUSES = ("ok", "degraded", "failed")
_SCALAR = (str, int, float, bool, type(None))
# field -> (type, check of its contents); a record that fails any of them is skipped like a torn one
_FIELDS = {
    "status": (str, lambda v: v in STATUSES),
    "config": (dict, lambda v: all(isinstance(k, str) for k in v)),
    "metrics": (dict, lambda v: all(isinstance(k, str) and isinstance(x, _SCALAR) for k, x in v.items())),
    "error": (str, None),
    "overrides": (list, lambda v: all(isinstance(x, str) for x in v)),
    "choices": (dict, lambda v: all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())),
    "timeline": (dict, lambda v: all(isinstance(t, dict) and all(isinstance(s, list) for s in t.values())
                                     for t in v.values())),
    "env": (dict, None),
    "started_at": (str, None),
    "duration_s": ((int, float), lambda v: not isinstance(v, bool)),
    "config_hash": (str, None),
    "resumed_from": (str, None),
    "noisy_attempts": (list, lambda v: all(isinstance(x, str) for x in v)),
}


def read_record(path: Path) -> Record:
    """A record, validated field by field: ValueError says what is wrong (load_records skips it)."""
    with open(path) as f:
        d = json.load(f)
    if not isinstance(d, dict) or d.get("schema") != SCHEMA:
        raise ValueError(f"not a {SCHEMA} record (schema {d.get('schema') if isinstance(d, dict) else None!r})")
    missing = {"status", "config"} - d.keys()
    if missing:
        raise ValueError(f"missing fields {sorted(missing)}")
    for key, (kind, ok) in _FIELDS.items():
        if key not in d:
            continue
        v = d[key]
        if not isinstance(v, kind) or (ok is not None and not ok(v)):
            raise ValueError(f"field {key!r} is {type(v).__name__} {str(v)[:60]!r}, not a valid {key}")
    return Record(**{k: v for k, v in d.items() if k in Record.__dataclass_fields__})


def load_records(root: Path) -> list[tuple[Path, Record]]:
    """Every readable record under root (sorted by path); bad ones are skipped with a warning."""
    out = []
    for p in sorted(Path(root).rglob(RECORD_NAME)):
        try:
            out.append((p, read_record(p)))
        except (OSError, ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            warnings.warn(f"skipping {p}: {e}", stacklevel=2)
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"cache": {"size": 1}} -> {"cache.size": 1}"""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, key + ".")
        else:
            out[key] = v
    return out
