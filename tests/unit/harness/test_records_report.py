"""Records are written atomically; the report skips what it cannot read and keeps failed runs."""

import json
import warnings

import pandas as pd
import pytest

from harness import records as R
from harness.report import write_report


def _rec(status="ok", alloc="pooled", size=512, **metrics):
    conf = {"allocator": alloc, "cache": {"size": size, "type_k": "f32", "type_v": "f32"}, "parallel": 4,
            "model": {"name": "llama-tiny"}, "workload": {"_target_": "harness.workload.FixedWorkload", "n_requests": 4}}
    return R.Record(status=status, config=conf, metrics={"latency.tpot_ms.p50": 1.5, **metrics},
                    error="" if status == "ok" else "ModelFileError: broken")


def test_write_is_atomic(tmp_path, monkeypatch):
    p = tmp_path / "0" / R.RECORD_NAME
    R.write_record(p, _rec())
    before = p.read_text()

    def half_then_fail(obj, f, **kw):
        f.write('{"schema": "kvbench-rec')
        raise RuntimeError("disk full")

    monkeypatch.setattr(R.json, "dump", half_then_fail)
    with pytest.raises(RuntimeError):
        R.write_record(p, _rec(alloc="naive"))
    assert p.read_text() == before and sorted(x.name for x in p.parent.iterdir()) == [R.RECORD_NAME]


def test_nan_is_written_as_null(tmp_path):
    p = R.write_record(tmp_path / R.RECORD_NAME, _rec(**{"latency.ttft_ms.p50": float("nan")}))
    assert json.loads(p.read_text())["metrics"]["latency.ttft_ms.p50"] is None


def test_report_skips_bad_records_and_lists_failed_runs(tmp_path):
    R.write_record(tmp_path / "0" / R.RECORD_NAME, _rec(alloc="naive"))
    R.write_record(tmp_path / "1" / R.RECORD_NAME, _rec(alloc="pooled", size=1024))
    R.write_record(tmp_path / "2" / R.RECORD_NAME, _rec(status="failed", alloc="paged"))
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / R.RECORD_NAME).write_text('{"schema": "kvbench-record/1", "status": "ok", "con')  # torn
    (tmp_path / "4").mkdir()
    (tmp_path / "4" / R.RECORD_NAME).write_text('{"schema": "something-else"}')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        md = write_report(tmp_path, plots=False)
    assert sum("skipping" in str(x.message) for x in w) == 2
    df = pd.read_csv(tmp_path / "report.csv")
    assert list(df["job"].astype(str)) == ["0", "1", "2"] and list(df["status"]) == ["ok", "ok", "failed"]
    text = md.read_text()
    assert "ModelFileError: broken" in text and "2 unreadable records skipped" in text
    assert "cache.size" in text and "allocator" in text  # the varying config columns
    html = (tmp_path / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "ModelFileError" in html


def test_flatten():
    assert R.flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def _round(tmp_path, job, alloc, repeat, tpot, status="ok", resumed="", noisy=False):
    rec = _rec(status=status, alloc=alloc, **{"latency.tpot_ms.p50": tpot, "memory.kv_bytes_per_token": 2048,
                                               "noise.flagged": noisy, "noise.reason": "busy" if noisy else ""})
    rec.config["repeat"] = repeat
    rec.resumed_from = resumed
    if status == "degraded":
        rec.error = "1 of 4 requests failed: too long"
    R.write_record(tmp_path / str(job) / R.RECORD_NAME, rec)


def test_points_aggregate_rounds_with_intervals_and_the_report_says_what_it_reused(tmp_path):
    tpots = {"naive": [2.0, 2.2, 2.1], "pooled": [1.8, 2.0, 1.85]}
    job = 0
    for r in range(3):
        for a in ("naive", "pooled"):
            _round(tmp_path, job, a, r, tpots[a][r], resumed="/old/sweep/4/record.json" if job == 0 else "",
                   noisy=(job == 5))
            job += 1
    md = write_report(tmp_path, plots=False).read_text()
    points = pd.read_csv(tmp_path / "report.csv")
    assert len(points) == 2 and list(points["runs"]) == [3, 3] and list(points["noisy"]) == [0, 1]
    naive = points[points["allocator"] == "naive"].iloc[0]
    assert naive["latency.tpot_ms.p50"] == 2.1  # the median
    assert naive["latency.tpot_ms.p50.ci95_low"] < 2.0 and naive["latency.tpot_ms.p50.ci95_high"] > 2.2
    assert naive["memory.kv_bytes_per_token.ci95_low"] == naive["memory.kv_bytes_per_token.ci95_high"] == 2048
    assert len(pd.read_csv(tmp_path / "runs.csv")) == 6
    comp = pd.read_csv(tmp_path / "comparisons.csv")
    tpot = comp[comp["metric"] == "latency.tpot_ms.p50"].iloc[0]
    assert (tpot["baseline"], tpot["variant"], tpot["rounds"], tpot["noisy_runs"]) == ("naive", "pooled", 3, 1)
    assert tpot["verdict"].startswith("inconclusive")  # a noisy run in the pairs
    assert "## Reused from earlier sweeps" in md and "`0`: from `/old/sweep/4/record.json`" in md
    assert "## Noise" in md and "`5`: busy" in md and "1 measured under contention" in md


def test_degraded_runs_are_listed_and_an_empty_directory_is_an_error(tmp_path):
    from engine.errors import ConfigError

    _round(tmp_path / "s", 0, "naive", 0, 2.0, status="degraded")
    md = write_report(tmp_path / "s", plots=False).read_text()
    assert "## Degraded runs (some requests failed)" in md and "1 of 4 requests failed" in md
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no readable record"):
        write_report(tmp_path / "empty")


@pytest.mark.parametrize("field, value", [("metrics", "oops"), ("config", None), ("timeline", "x"),
                                          ("status", "great"), ("overrides", [1, 2]), ("metrics", {"a": [1]}),
                                          ("duration_s", "long"), ("choices", {"workload": 3})])
def test_a_wrong_typed_record_is_skipped_with_a_warning(tmp_path, field, value):
    R.write_record(tmp_path / "0" / R.RECORD_NAME, _rec(alloc="naive"))
    bad = json.loads(R.write_record(tmp_path / "1" / R.RECORD_NAME, _rec(alloc="pooled")).read_text())
    bad[field] = value
    (tmp_path / "1" / R.RECORD_NAME).write_text(json.dumps(bad))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        write_report(tmp_path, plots=False)
    assert any("skipping" in str(x.message) and field in str(x.message) for x in w)
    assert len(pd.read_csv(tmp_path / "runs.csv")) == 1
