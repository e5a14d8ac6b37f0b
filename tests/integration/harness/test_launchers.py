"""Scale-out: the same sweep through hydra-submitit-launcher (local) and hydra-joblib-launcher."""

import json

import pandas as pd
import pytest

from tests.integration.harness.test_sweep import SMALL, kvbench


@pytest.mark.parametrize("launcher, extra", [("submitit_local", ["hydra.launcher.timeout_min=10"]),
                                             ("joblib", ["hydra.launcher.n_jobs=2"])])
def test_launcher_sweep_lands_in_the_same_layout(tmp_path, launcher, extra):
    d = tmp_path / "s"
    r = kvbench(tmp_path, "run", "-m", f"hydra/launcher={launcher}", *extra, "allocator=naive,paged",
                f"hydra.sweep.dir={d}", *SMALL, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = {p.parent.name: json.loads(p.read_text()) for p in d.glob("*/record.json")}
    assert sorted(recs) == ["0", "1"] and all(v["status"] == "ok" for v in recs.values())
    assert {v["config"]["allocator"] for v in recs.values()} == {"naive", "paged"}
    assert len(pd.read_csv(d / "report.csv")) == 2
