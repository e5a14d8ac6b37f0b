"""`kvbench run -m ...` end to end: records per point, a report and plots at the end, failures recorded."""

import json
import os
import signal
import subprocess
import sys
import time
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
def sweep(tmp_path_factory):
    """4 points; at cache.size 16 every 18-token request fails, so those points fail and the sweep goes on."""
    d = tmp_path_factory.mktemp("sweep")
    r = kvbench(d, "run", "-m", "allocator=naive,paged", "cache.size=64,16", "cache.block_size=8",
                f"hydra.sweep.dir={d / 'multirun'}", *[a for a in SMALL if not a.startswith("cache.size")])
    return r, d / "multirun"


@pytest.fixture(scope="module")
def sweep_dir(sweep):
    return sweep[1]


def test_every_point_has_a_record_and_the_failed_one_says_why(sweep):
    r, sweep_dir = sweep
    assert r.returncode == 1, r.stderr  # the sweep finished, with failed points
    assert "Traceback" not in r.stderr
    recs = {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/record.json")}
    assert sorted(recs) == ["0", "1", "2", "3"]
    failed = [r for r in recs.values() if r["status"] == "failed"]
    assert len(failed) == 2 and all(r["config"]["cache"]["size"] == 16 for r in failed)
    assert all(r["error"].startswith("4 of 4 requests failed") for r in failed)
    ok = [r for r in recs.values() if r["status"] == "ok"]
    for r in ok:
        m = r["metrics"]
        assert m["requests.done"] == 4 and m["tokens.generated"] == 24
        assert m["latency.tpot_ms.p50"] > 0 and m["memory.peak_rss_bytes"] > m["memory.weights_bytes"]
        assert 0 <= m["fragmentation.kv_waste.time_weighted"] <= 1
        assert r["env"]["versions"]["torch"] and r["config"]["cache"]["size"] == 64
        assert set(r["timeline"]) == {"memory", "fragmentation"}
        assert isinstance(m["noise.flagged"], bool) and m["noise.unit_us"] > 0 and m["norm.decode_step.min"] > 0
    by_alloc = {r["config"]["allocator"]: r["metrics"] for r in ok}
    assert by_alloc["paged"]["alloc.calls_per_decode_step"] == 0
    assert by_alloc["naive"]["alloc.calls_per_decode_step"] > 0


def test_report_and_plots_written_at_the_end(sweep_dir):
    df = pd.read_csv(sweep_dir / "report.csv")
    assert len(df) == 4 and sorted(df["status"]) == ["failed", "failed", "ok", "ok"]
    md = (sweep_dir / "report.md").read_text()
    assert "## Failed runs" in md and "requests failed" in md
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


def test_report_of_a_directory_without_records_is_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    r = kvbench(tmp_path, "report", str(tmp_path / "empty"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("kvbench report: error:") and "no readable record.json" in r.stderr


def test_repeats_run_in_rounds_and_the_report_gives_intervals(tmp_path):
    d = tmp_path / "rounds"
    r = kvbench(tmp_path, "run", "-m", "allocator=naive,pooled", "repeats=3", f"hydra.sweep.dir={d}", *SMALL)
    assert r.returncode == 0, r.stderr
    order = [(json.loads((d / str(i) / "record.json").read_text())["config"]["repeat"],
              json.loads((d / str(i) / "record.json").read_text())["config"]["allocator"]) for i in range(6)]
    assert order == [(0, "naive"), (0, "pooled"), (1, "naive"), (1, "pooled"), (2, "naive"), (2, "pooled")]
    points, runs = pd.read_csv(d / "report.csv"), pd.read_csv(d / "runs.csv")
    assert len(points) == 2 and len(runs) == 6 and (points["runs"] == 3).all()
    lo, mid, hi = (points[f"latency.tpot_ms.p50{s}"] for s in (".ci95_low", "", ".ci95_high"))
    assert ((lo <= mid) & (mid <= hi) & (lo < hi)).all()
    bpt = points["memory.kv_bytes_per_token"]  # exact: a zero-width interval
    assert (points["memory.kv_bytes_per_token.ci95_low"] == bpt).all()
    comp = pd.read_csv(d / "comparisons.csv")
    tpot = comp[comp["metric"] == "latency.tpot_ms.p50"].iloc[0]
    assert tpot["variant"] == "pooled" and tpot["baseline"] == "naive" and tpot["rounds"] == 3
    assert tpot["ci95_low"] <= tpot["estimate"] <= tpot["ci95_high"]
    md = (d / "report.md").read_text()
    assert "## Comparisons (paired by round)" in md and "pooled vs naive" in md


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


@pytest.mark.parametrize("args, says", [
    (["model.name=/nonexistent/model.gguf"], "model.name = '/nonexistent/model.gguf': no such file"),
    (["-m", "model.name=llama-tiny,/nonexistent/model.gguf"], "no such file"),
    (["-m", "allocator=naive,pooled", "repeats=1,3"], "repeats cannot be swept"),
    (["repeats=3"], "add -m"),
])
def test_bad_sweeps_exit_2_before_anything_runs(tmp_path, args, says):
    r = kvbench(tmp_path, "run", *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and says in r.stderr
    assert not (tmp_path / "results").exists()


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    d = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", "-m", "allocator=naive,pooled,paged",
                             "workload.n_requests=40", f"hydra.sweep.dir={d}", *SMALL[:1], *SMALL[2:]],
                            cwd=tmp_path, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.time() + 120
    while not (d / "0" / "record.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # the second point is running now
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines()[-1] == (f"interrupted: 1 of 3 points done; rerun the same command with "
                                            f"--resume-from {d} to resume")


def test_recurrent_models_in_a_sweep_separate_kv_from_state(tmp_path):
    """Every kind of sequence memory in one sweep; the report's measured bytes per sequence equal the projection
    from per-token and per-sequence bytes where the allocator holds exactly what the model reads."""
    d = tmp_path / "rec"
    models = "mamba-tiny,hybrid-tiny,granite-hybrid-tiny,rwkv7-tiny,mistral-swa-tiny"
    r = kvbench(tmp_path, "run", "-m", f"model={models}", "allocator=pooled", f"hydra.sweep.dir={d}", *SMALL)
    assert r.returncode == 0, r.stderr
    recs = {json.loads(p.read_text())["config"]["model"]["name"]: json.loads(p.read_text())["metrics"]
            for p in d.glob("*/record.json")}
    assert recs["mamba-tiny"]["memory.kv_bytes_per_token"] == 0 and recs["mamba-tiny"]["memory.kv_live_peak_bytes"] == 0
    assert recs["mamba-tiny"]["memory.state_live_peak_bytes"] > 0
    assert "memory.breakdown.s.device" in recs["hybrid-tiny"] and "memory.breakdown.k.device" in recs["hybrid-tiny"]
    assert [recs[m]["memory.state_kind"] for m in models.split(",")] == ["mamba1", "mamba1", "mamba2", "rwkv7", ""]
    assert recs["mistral-swa-tiny"]["memory.kv_window_tokens"] == 64
    assert recs["mistral-swa-tiny"]["memory.kv_swa_share"] == 1.0
    md = (d / "report.md").read_text()
    assert "## Recurrent state vs KV cache" in md and (d / "plots" / "memory_vs_context.png").exists()
    for m, what in [("mamba-tiny", "Mamba-1 state"), ("hybrid-tiny", "Mamba-1 state + KV"),
                    ("granite-hybrid-tiny", "Mamba-2 state + KV"), ("rwkv7-tiny", "RWKV-7 state"),
                    ("mistral-swa-tiny", "SWA KV (window 64)")]:
        assert f"| {m} " in md and f"| {what} " in md
    # measured = projected for the recurrent and hybrid models: 2 sequences at 12 + 6 - 1 = 17 tokens each
    for m in ("mamba-tiny", "granite-hybrid-tiny", "rwkv7-tiny"):
        row = next(line for line in md.splitlines() if line.startswith(f"| {m} ") and "| pooled " in line)
        measured, projected = row.split("|")[3].strip().rstrip(")").split(" (")
        assert measured == projected, row
    html = (d / "report.html").read_text()  # one page from the same sections as report.md
    assert "<h2>Recurrent state vs KV cache</h2>" in html and "data:image/png;base64," in html


def test_a_run_that_cannot_fit_is_refused_before_it_starts(tmp_path):
    r = kvbench(tmp_path, "run", "-m", "cache.size=1024,1000000000000")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "cache.size = 1000000000000: this run needs about" in r.stderr and "memory_check=false" in r.stderr
    assert not (tmp_path / "results").exists()


def test_traces_in_each_format_replay_with_their_counts_and_tokens(tmp_path):
    """workload=trace on the three formats: every request runs, with the trace's prompt and output tokens;
    Mooncake's shared blocks reach the scheduler's prefix sharing; a request beyond the context is counted."""
    from tests.unit.harness.test_trace import AZURE, BURSTGPT, MOONCAKE

    (tmp_path / "azure.csv").write_text(AZURE)
    (tmp_path / "burst.csv").write_text(BURSTGPT)
    mooncake = MOONCAKE + [{"timestamp": 3100, "input_length": 3000, "output_length": 4, "hash_ids": [9]}]
    (tmp_path / "mooncake.jsonl").write_text("\n".join(json.dumps(r) for r in mooncake))
    want = {"azure.csv": (3, 374 + 396 + 879, 44 + 109 + 1, 0),
            "burst.csv": (3, 472 + 1087 + 30, 18 + 1 + 212, 0),
            # llama-tiny's context is 2048: the 3000-token prompt is clipped to 2044 (its 4 outputs kept)
            "mooncake.jsonl": (4, 1100 + 1030 + 600 + 2044, 12 + 8 + 20 + 4, 1)}
    for name, (n, prompt, generated, clipped) in want.items():
        d = tmp_path / name.split(".")[0]
        r = kvbench(tmp_path, "run", "workload=trace", f"workload.path={tmp_path / name}", "workload.time_scale=0.01",
                    "cache.size=4096", "parallel=2", "probe_logit_error=false", f"hydra.run.dir={d}", "--quiet")
        assert r.returncode == 0, r.stderr
        m = json.loads((d / "record.json").read_text())["metrics"]
        assert (m["requests.total"], m["requests.done"]) == (n, n), name
        assert (m["tokens.prompt"], m["tokens.generated"], m["requests.clipped"]) == (prompt, generated, clipped), name
        if name == "mooncake.jsonl":  # the second request shares BOS and two blocks with the first, while it runs
            assert m["requests.shared_prefix_tokens"] >= 1 + 2 * 512


def test_a_bad_trace_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "t.csv").write_text("a,b\n1,2\n")
    r = kvbench(tmp_path, "run", "workload=trace", f"workload.path={tmp_path / 't.csv'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "is not a known trace" in r.stderr
    r = kvbench(tmp_path, "run", "workload=trace")
    assert r.returncode == 2 and "workload.path is not set" in r.stderr
