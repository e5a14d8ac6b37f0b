"""A new allocator is one file and one registry line (tests/helpers/padded_alloc.py): with nothing else
edited it gives the same tokens as the others and shows up in sweeps, reports, comparisons and plots."""

import json
import os
import subprocess
import sys

import pandas as pd

from tests.integration.harness.test_sweep import SMALL

PLUGIN = "tests.helpers.padded_alloc"


def test_a_plugin_allocator_runs_everywhere(tmp_path):
    env = dict(os.environ, KVBENCH_PLUGINS=PLUGIN, PYTHONPATH=os.getcwd())
    d = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-m", "harness.cli", "run", "-m", "allocator=naive,padded", "repeats=2",
                        f"hydra.sweep.dir={d}", *SMALL], capture_output=True, text=True, timeout=600, env=env,
                       cwd=os.getcwd())
    assert r.returncode == 0, r.stderr
    recs = [json.loads(p.read_text()) for p in sorted(d.glob("*/record.json"))]
    padded = [x for x in recs if x["config"]["allocator"] == "padded"]
    assert len(padded) == 2 and all(x["status"] == "ok" for x in padded)
    assert padded[0]["metrics"]["alloc.calls_per_decode_step"] == 0  # a pool: nothing allocated per step
    assert set(pd.read_csv(d / "report.csv")["allocator"]) == {"naive", "padded"}
    comp = pd.read_csv(d / "comparisons.csv")
    assert (comp["variant"] == "padded").all() and (comp["baseline"] == "naive").all()
    assert "padded vs naive" in (d / "report.md").read_text()
    assert (d / "plots" / "peak_memory.png").exists()

    gen = subprocess.run([sys.executable, "-m", "harness.cli", "generate", "--allocator", "padded", "--tokens",
                          "1,15,99,7", "-n", "8", "--json"], capture_output=True, text=True, timeout=300, env=env)
    ref = subprocess.run([sys.executable, "-m", "harness.cli", "generate", "--allocator", "pooled", "--tokens",
                          "1,15,99,7", "-n", "8", "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert gen.returncode == 0 and ref.returncode == 0, gen.stderr + ref.stderr
    out = json.loads(gen.stdout)
    assert out["allocator"] == "padded" and out["tokens"] == json.loads(ref.stdout)["tokens"]


def test_a_plugin_that_does_not_import_is_one_line(tmp_path):
    env = dict(os.environ, KVBENCH_PLUGINS="no.such.module")
    r = subprocess.run([sys.executable, "-m", "harness.cli", "info"], capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "KVBENCH_PLUGINS" in r.stderr and "no.such.module" in r.stderr
