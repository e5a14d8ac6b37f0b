"""`kvbench run -m ...` end to end: records per point, a report and plots at the end, failures recorded."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

SMALL = ["workload=fixed", "workload.n_requests=4", "workload.prompt_len=12", "workload.output_len=6",
         "probe_logit_error=false", "parallel=2", "cache.size=64", "--quiet"]


def kvbench(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    r = kvbench(d, "run", "-m", "allocator=naive,paged", "model.name=llama-tiny,/nonexistent/model.gguf",
                f"hydra.sweep.dir={d / 'multirun'}", *SMALL)
    assert r.returncode == 0, r.stderr
    return d / "multirun"


def test_every_point_has_a_record_and_the_failed_one_says_why(sweep_dir):
    recs = {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/record.json")}
    assert sorted(recs) == ["0", "1", "2", "3"]
    failed = [r for r in recs.values() if r["status"] == "failed"]
    assert len(failed) == 2 and all("/nonexistent/model.gguf" in r["error"] for r in failed)
    ok = [r for r in recs.values() if r["status"] == "ok"]
    for r in ok:
        m = r["metrics"]
        assert m["requests.done"] == 4 and m["tokens.generated"] == 24
        assert m["latency.tpot_ms.p50"] > 0 and m["memory.peak_rss_bytes"] > m["memory.weights_bytes"]
        assert 0 <= m["fragmentation.kv_waste.time_weighted"] <= 1
        assert r["env"]["versions"]["torch"] and r["config"]["cache"]["size"] == 64
        assert set(r["timeline"]) == {"memory", "fragmentation"}
    by_alloc = {r["config"]["allocator"]: r["metrics"] for r in ok}
    assert by_alloc["paged"]["alloc.calls_per_decode_step"] == 0
    assert by_alloc["naive"]["alloc.calls_per_decode_step"] > 0


def test_report_and_plots_written_at_the_end(sweep_dir):
    df = pd.read_csv(sweep_dir / "report.csv")
    assert len(df) == 4 and sorted(df["status"]) == ["failed", "failed", "ok", "ok"]
    md = (sweep_dir / "report.md").read_text()
    assert "## Failed runs" in md and "nonexistent" in md
    html = (sweep_dir / "report.html").read_text()
    assert "data:image/png;base64," in html  # self-contained
    pngs = {p.stem for p in (sweep_dir / "plots").glob("*.png")}
    assert {"peak_memory", "memory_breakdown", "fragmentation_over_time"} <= pngs
    assert {p.stem for p in (sweep_dir / "plots").glob("*.svg")} == pngs


def test_report_command_skips_a_corrupt_record(sweep_dir, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(sweep_dir, d)
    (d / "1" / "record.json").write_text((d / "1" / "record.json").read_text()[:100])  # torn
    r = kvbench(tmp_path, "report", str(d), "--json")
    assert r.returncode == 0, r.stderr
    assert "skipping" in r.stderr
    assert len(pd.read_csv(d / "report.csv")) == 3


def test_single_point_run(tmp_path):
    r = kvbench(tmp_path, "run", "allocator=pooled", f"hydra.run.dir={tmp_path / 'one'}", *SMALL)
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "one" / "record.json").read_text())
    assert rec["status"] == "ok" and rec["config"]["allocator"] == "pooled"


def test_bad_input_stops_before_anything_runs(tmp_path):
    r = kvbench(tmp_path, "run", "-m", "allocator=naive,pooled", "cache.size=100", "allocator=paged",
                "cache.block_size=48")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "cache.block_size = 48" in r.stderr
    assert not (tmp_path / "results").exists()


def test_recurrent_models_in_a_sweep_separate_kv_from_state(tmp_path):
    d = tmp_path / "rec"
    r = kvbench(tmp_path, "run", "-m", "model=mamba-tiny,hybrid-tiny", "allocator=pooled", f"hydra.sweep.dir={d}",
                *SMALL)
    assert r.returncode == 0, r.stderr
    recs = {json.loads(p.read_text())["config"]["model"]["name"]: json.loads(p.read_text())["metrics"]
            for p in d.glob("*/record.json")}
    assert recs["mamba-tiny"]["memory.kv_bytes_per_token"] == 0 and recs["mamba-tiny"]["memory.kv_live_peak_bytes"] == 0
    assert recs["mamba-tiny"]["memory.state_live_peak_bytes"] > 0
    assert "memory.breakdown.s.device" in recs["hybrid-tiny"] and "memory.breakdown.k.device" in recs["hybrid-tiny"]
    md = (d / "report.md").read_text()
    assert "## Recurrent state vs KV cache" in md and (d / "plots" / "memory_vs_context.png").exists()
