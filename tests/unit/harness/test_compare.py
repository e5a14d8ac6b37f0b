"""kvbench compare: rules, noise bands, inputs, exit codes."""

import json

import pytest

from harness import compare as C
from harness.cli import main
from harness.records import Record, write_record


def bench_json(path, **medians_and_info):
    benches = []
    for name, (median, iqr, info) in medians_and_info.items():
        benches.append({"name": name, "stats": {"median": median, "iqr": iqr}, "extra_info": info})
    path.write_text(json.dumps({"benchmarks": benches}))
    return path


def test_exact_rule_fails_on_any_increase():
    r = C.Rule("*alloc*", kind="exact")
    assert C.judge("alloc.x", C.Value(0), C.Value(0), r).status == "ok"
    assert C.judge("alloc.x", C.Value(0), C.Value(0.5), r).status == "regressed"
    assert C.judge("alloc.x", C.Value(2), C.Value(1), r).status == "improved"


def test_relative_rule_needs_tolerance_and_noise_band():
    r = C.Rule("*", kind="relative", tolerance=0.2)
    assert C.judge("m", C.Value(1.0), C.Value(1.1), r).status == "ok"  # within tolerance
    assert C.judge("m", C.Value(1.0), C.Value(1.3), r).status == "regressed"
    assert C.judge("m", C.Value(1.0, iqr=0.5), C.Value(1.3, iqr=0.1), r).status == "ok"  # inside the IQR
    hi = C.Rule("*", kind="relative", direction="higher", tolerance=0.2)
    assert C.judge("tps", C.Value(100), C.Value(70), hi).status == "regressed"
    assert C.judge("tps", C.Value(100), C.Value(130), hi).status == "improved"
    off = C.Rule("*", tolerance=0.2, gate=False)
    assert C.judge("t", C.Value(1.0), C.Value(3.0), off).status == "moved"


def test_new_and_missing_metrics_are_listed_not_failed():
    rows = C.compare({"a": C.Value(1)}, {"b": C.Value(1)}, C.DEFAULT_RULES)
    assert {r.metric: r.status for r in rows} == {"a": "missing", "b": "new"}


def test_cli_exit_codes_and_table(tmp_path, capsys):
    base = bench_json(tmp_path / "b.json", t1=(1.0, 0.01, {"ratio.paged_over_pooled.decode_step": 1.0,
                                                             "alloc.pooled.per_decode_step": 0}))
    same = bench_json(tmp_path / "s.json", t1=(3.0, 0.01, {"ratio.paged_over_pooled.decode_step": 1.05,
                                                             "alloc.pooled.per_decode_step": 0}))
    worse = bench_json(tmp_path / "w.json", t1=(1.0, 0.01, {"ratio.paged_over_pooled.decode_step": 1.6,
                                                              "alloc.pooled.per_decode_step": 2}))
    assert main(["compare", str(base), str(same)]) == 0  # absolute time tripled: reported, not gated
    out = capsys.readouterr().out
    assert "moved" in out and "time.t1" in out
    assert main(["compare", str(base), str(worse)]) == 1
    out = capsys.readouterr().out
    assert out.count("REGRESSED") == 2 and "alloc.pooled.per_decode_step" in out
    assert main(["compare", str(base), str(tmp_path / "nope.json")]) == 2


def test_rules_file(tmp_path):
    rules = tmp_path / "r.yaml"
    rules.write_text("rules:\n  - match: 't1.ratio*'\n    kind: relative\n    tolerance: 0.9\n")
    loaded = C.load_rules(rules)
    assert C.rule_for("t1.ratio.x", loaded).tolerance == 0.9
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - match: x\n    kind: sometimes\n")
    with pytest.raises(Exception, match="bad rule"):
        C.load_rules(bad)


def test_sweep_directories_match_points_by_overrides(tmp_path, capsys):
    def sweep(d, tpot, allocs):
        for i, a in enumerate(("naive", "pooled")):
            write_record(d / str(i) / "record.json", Record(
                "ok", {"allocator": a}, metrics={"latency.tpot_ms.p50": tpot, "alloc.calls_per_decode_step": allocs[i]},
                overrides=[f"allocator={a}", "quiet=true"]))
        return d

    b = sweep(tmp_path / "b", 1.0, [8, 0])
    c = sweep(tmp_path / "c", 1.05, [8, 1])
    m = C.load_metrics(b)
    assert "allocator=naive/latency.tpot_ms.p50" in m  # quiet=true is not part of the point
    assert main(["compare", str(b), str(c)]) == 1
    assert "allocator=pooled/alloc.calls_per_decode_step" in capsys.readouterr().out


def _sweep(d, rounds, noisy_round=None, scale=1.0):
    """A sweep dir with naive/pooled points over rounds, as `kvbench run repeats=N` writes it."""
    n = 0
    for r in range(rounds):
        for a in ("naive", "pooled"):
            m = {"latency.tpot_ms.p50": scale * (2.0 + 0.1 * r), "latency.decode_step_ms.min": scale * 1.7,
                 "noise.unit_us": 1000.0, "alloc.calls_per_decode_step": 8 if a == "naive" else 0,
                 "noise.flagged": r == noisy_round}
            write_record(d / str(n) / "record.json", Record("ok", {"allocator": a, "repeat": r}, metrics=m,
                                                            overrides=[f"repeat={r}", f"allocator={a}", "repeats=3"]))
            n += 1
    return d


def test_sweep_points_are_medians_over_rounds_without_noisy_runs(tmp_path):
    d = _sweep(tmp_path / "s", 3, noisy_round=2)
    m = C.load_metrics(d)
    assert m["allocator=naive/latency.tpot_ms.p50"].value == pytest.approx(2.05)  # rounds 0, 1 (2 was noisy)
    assert not any("repeat" in k for k in m)


def test_a_uniform_slowdown_fails_through_normalised_times(tmp_path, capsys):
    base = _sweep(tmp_path / "b", 3)
    slow = _sweep(tmp_path / "w", 3, scale=2.0)  # every latency doubled, probe unchanged: the engine got slower
    assert main(["compare", str(base), str(slow)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSED" in out and "norm.decode_step.min" in out
    assert "metrics compared" in out and "gated" in out


@pytest.mark.parametrize("case", ["empty_dir", "no_common", "mostly_missing", "nothing_gated", "bad_entries",
                                  "bad_stats", "no_benchmarks"])
def test_a_gate_that_would_pass_vacuously_is_bad_input(tmp_path, capsys, case):
    base = bench_json(tmp_path / "b.json", t1=(1.0, 0.01, {"ratio.paged_over_pooled.decode_step": 1.0,
                                                             "alloc.pooled.per_decode_step": 0,
                                                             "norm.decode_step.pooled.min": 50.0}))
    cur = tmp_path / "c.json"
    if case == "empty_dir":
        (tmp_path / "empty").mkdir()
        args = [str(tmp_path / "empty"), str(base)]
    elif case == "no_common":
        args = [str(base), str(bench_json(cur, other=(1.0, 0.01, {"x.ratio": 1.0})))]
    elif case == "mostly_missing":
        cur.write_text(json.dumps({"benchmarks": [{"name": "t1", "stats": {}, "extra_info": {
            "alloc.pooled.per_decode_step": 0}}]}))  # 1 of the baseline's 4 metrics
        args = [str(base), str(cur)]
    elif case == "nothing_gated":
        only_time = bench_json(tmp_path / "t.json", t1=(1.0, 0.01, {}))
        args = [str(only_time), str(only_time)]
    elif case == "bad_entries":
        cur.write_text(json.dumps({"benchmarks": [1, 2]}))
        args = [str(base), str(cur)]
    elif case == "bad_stats":
        cur.write_text(json.dumps({"benchmarks": [{"name": "t1", "stats": "fast"}]}))
        args = [str(base), str(cur)]
    else:
        cur.write_text(json.dumps({"benchmarks": []}))
        args = [str(base), str(cur)]
    assert main(["compare", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvbench compare: error:") and err.count("\n") == 1


def test_a_timing_metric_worse_under_contention_is_inconclusive_not_regressed():
    t = C.Rule("*norm*", tolerance=0.5, timing=True)
    busy = "other processes used 0.72 CPUs"
    assert C.judge("norm.x", C.Value(1.0), C.Value(1.6, noisy=busy), t).status == "noisy"
    assert C.judge("norm.x", C.Value(1.0), C.Value(1.6), t).status == "regressed"  # quiet: a regression
    assert C.judge("norm.x", C.Value(1.0), C.Value(1.3, noisy=busy), t).status == "ok"  # within, despite noise
    # not a timing rule (a same-run ratio, a count): contention does not excuse it
    r = C.Rule("*ratio*", tolerance=0.35)
    assert C.judge("ratio.x", C.Value(1.0), C.Value(1.6, noisy=busy), r).status == "regressed"


_QUIET = {"noise.other_cpu": 0.01, "noise.steal": 0.0, "noise.probe_slowdown": 1.1}
_BUSY = {"noise.other_cpu": 0.72, "noise.steal": 0.0, "noise.probe_slowdown": 2.8}


def test_cli_exits_3_when_only_timings_got_worse_under_contention(tmp_path, capsys):
    def info(norm, allocs, noise):
        return {"norm.decode_step.pooled.min": norm, "alloc.pooled.per_decode_step": allocs,
                "ratio.paged_over_pooled.decode_step": 1.0} | noise

    base = bench_json(tmp_path / "b.json", t1=(1.0, 0.01, info(1.7, 0, _QUIET)))
    busy = bench_json(tmp_path / "n.json", t1=(3.0, 0.01, info(2.6, 0, _BUSY)))
    m = C.load_metrics(busy)
    assert all("0.72 CPUs" in v.noisy for v in m.values()) and not any(v.noisy for v in C.load_metrics(base).values())
    assert main(["compare", str(base), str(busy)]) == 3
    out = capsys.readouterr().out
    assert "NOISY" in out and "t1.norm.decode_step.pooled.min" in out and "REGRESSED" not in out
    assert "1 inconclusive" in out and "0.72 CPUs" in out and "quiet machine" in out

    both = bench_json(tmp_path / "r.json", t1=(3.0, 0.01, info(2.6, 2, _BUSY)))  # and an exact count regressed
    assert main(["compare", str(base), str(both)]) == 1
    quiet_slow = bench_json(tmp_path / "q.json", t1=(2.0, 0.01, info(2.6, 0, _QUIET)))
    assert main(["compare", str(base), str(quiet_slow)]) == 1
    capsys.readouterr()

    assert main(["compare", str(busy), str(base)]) == 0  # a noisy baseline: the verdict stands, with a warning
    assert "WARNING: the baseline was measured under contention" in capsys.readouterr().out
    r = main(["compare", str(base), str(busy), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert r == 3 and doc["inconclusive"] == ["t1.norm.decode_step.pooled.min"] and doc["regressed"] == []


def test_a_sweep_point_with_every_round_noisy_is_inconclusive(tmp_path, capsys):
    base = _sweep(tmp_path / "b", 3)
    slow_some = _sweep(tmp_path / "s", 3, noisy_round=0, scale=2.0)  # clean rounds remain: judged from them
    assert main(["compare", str(base), str(slow_some)]) == 1
    capsys.readouterr()
    slow_all = _sweep(tmp_path / "a", 1, noisy_round=0, scale=2.0)
    assert all(v.noisy for v in C.load_metrics(slow_all).values())
    assert main(["compare", str(_sweep(tmp_path / "b1", 1)), str(slow_all)]) == 3
    assert "NOISY" in capsys.readouterr().out
