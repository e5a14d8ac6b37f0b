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
