"""Fault injection, to test that a sweep survives a point dying the way the OS kills processes.

``KVBENCH_FAULT_INJECT=<signal>[@<key>=<value>]``, e.g. ``SIGKILL@allocator=naive``: a point's
child process (harness.point) whose resolved config has key == value sends itself the signal
before it runs. Without ``@`` every point does. Never set outside tests.
"""

from __future__ import annotations

import os
import signal

from omegaconf import DictConfig, OmegaConf


def matches(spec: str, cfg: DictConfig) -> bool:
    if "@" not in spec:
        return True
    key, _, value = spec.split("@", 1)[1].partition("=")
    got = OmegaConf.select(cfg, key)
    return str(getattr(got, "value", got)) == value


def inject(spec: str, cfg: DictConfig) -> None:
    if matches(spec, cfg):
        os.kill(os.getpid(), signal.Signals[spec.split("@", 1)[0]])
