"""Noise detection: the accounting of /proc/stat and getrusage, the probe, the verdict."""

import pytest

from harness.config import NoiseConf
from harness.noise import CpuSnapshot, activity, calibrate, judge


def _snap(wall, busy, steal=0.0, own=0.0, invol=0, n=2):
    return CpuSnapshot(wall, busy, steal, own, invol, n)


def test_activity_subtracts_this_process_from_the_machine():
    a, b = _snap(0, 100.0, 1.0, 5.0, 10), _snap(10, 125.0, 2.0, 20.0, 510)
    act = activity(a, b)
    assert act["other_cpu"] == pytest.approx(1.0)  # 25 busy CPU-seconds, 15 of them ours, over 10 s
    assert act["own_cpu"] == pytest.approx(1.5)
    assert act["steal"] == pytest.approx(0.05)  # 1 s stolen of 2 CPUs x 10 s
    assert act["involuntary_switches_per_s"] == pytest.approx(50)
    assert act["other_cpu_resolution"] == pytest.approx(2 * 2 / 100 / 10, rel=0.5)  # 2 jiffies per CPU


def test_quiet_metrics_pass_and_each_kind_of_contention_is_flagged_with_its_reason():
    th = NoiseConf()
    quiet = {"noise.other_cpu": 0.03, "noise.other_cpu_resolution": 0.01, "noise.steal": 0.0,
             "noise.probe_slowdown": 1.05}
    assert judge(quiet, th) == (False, "")
    for key, value, word in [("noise.other_cpu", 0.9, "other processes"), ("noise.steal", 0.2, "hypervisor"),
                             ("noise.probe_slowdown", 2.5, "calibration probe")]:
        flagged, reason = judge(quiet | {key: value}, th)
        assert flagged and word in reason


def test_jiffy_rounding_alone_does_not_flag_a_short_window():
    m = {"noise.other_cpu": 0.35, "noise.other_cpu_resolution": 0.4, "noise.probe_slowdown": 1.0}
    assert not judge(m, NoiseConf())[0]


def test_missing_figures_are_not_judged():
    assert judge({}, NoiseConf()) == (False, "")


def test_the_probe_measures_three_positive_speeds():
    c = calibrate(reps=2)
    assert c.step_us_best <= c.step_us and c.matmul_gflops <= c.matmul_gflops_best
    assert c.bandwidth_gbps > 0 and c.seconds > 0
    assert set(c.as_metrics("p")) == {f"p.{k}" for k in ("step_us", "step_us_best", "dispatch_us",
                                                          "dispatch_us_best", "matmul_gflops",
                                                          "matmul_gflops_best", "bandwidth_gbps",
                                                          "bandwidth_gbps_best", "seconds")}
