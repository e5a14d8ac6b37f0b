"""Fault injection for tests: points that die the way the OS kills processes, and an engine made slower.

``KVBENCH_FAULT_INJECT`` holds comma-separated faults. Never set outside tests.

- ``<signal>[@<key>=<value>]``, e.g. ``SIGKILL@allocator=naive``: a point's child process
  (harness.point) whose resolved config has key == value sends itself the signal before it runs.
  Without ``@`` every point does.
- ``slow:<k>``: every forward pass of the model busy-waits (k - 1) times as long as it took, so the
  engine does the same work k times slower in wall time and CPU, as a real regression would. Used
  to show that the CI gate catches a uniform slowdown (tests/integration/harness/test_gate.py).
"""

from __future__ import annotations

import os
import signal
import time

from omegaconf import DictConfig, OmegaConf

ENV = "KVBENCH_FAULT_INJECT"


def faults() -> list[str]:
    return [f for f in os.environ.get(ENV, "").split(",") if f]


def matches(spec: str, cfg: DictConfig) -> bool:
    if "@" not in spec:
        return True
    key, _, value = spec.split("@", 1)[1].partition("=")
    got = OmegaConf.select(cfg, key)
    return str(getattr(got, "value", got)) == value


def inject(spec: str, cfg: DictConfig) -> None:
    if matches(spec, cfg):
        os.kill(os.getpid(), signal.Signals[spec.split("@", 1)[0]])


def inject_signals(cfg: DictConfig) -> None:
    for spec in faults():
        if spec.startswith("SIG"):
            inject(spec, cfg)


def slowdown() -> float:
    """The ``slow:<k>`` factor, 1.0 when not set."""
    for spec in faults():
        if spec.startswith("slow:"):
            return float(spec.split(":", 1)[1])
    return 1.0


def slow_down(model, factor: float) -> None:
    """Make ``model``'s forward pass ``factor`` times slower by spinning after it (no effect on results)."""
    if factor <= 1.0:
        return
    inner = model.forward

    def forward(*args, **kwargs):
        t = time.perf_counter()
        out = inner(*args, **kwargs)
        until = time.perf_counter() + (factor - 1.0) * (time.perf_counter() - t)
        while time.perf_counter() < until:
            pass
        return out

    model.forward = forward
