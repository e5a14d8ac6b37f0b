"""Trackers: context managers that observe a run (latency, memory, fragmentation, noise).

Each one is entered with the run's ``ExitStack``, sees every scheduler step through
``on_step`` (kept cheap: a time check, and a sample only every ``sample_interval_ms``), and
yields flat ``metrics()`` (names as in docs/metrics.md) and an optional ``timeline()``.
"""

from harness.trackers.base import Tracker, summarize
from harness.trackers.fragmentation import FragmentationTracker
from harness.trackers.latency import LatencyTracker
from harness.trackers.memory import MemoryTracker
from harness.trackers.noise import NoiseTracker

__all__ = ["Tracker", "summarize", "LatencyTracker", "MemoryTracker", "FragmentationTracker", "NoiseTracker"]
