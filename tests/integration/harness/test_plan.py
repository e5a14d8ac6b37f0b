"""kvbench plan against measurement: the number of sequences it says fit is where real runs stop fitting."""

import json

from tests.integration.harness.test_sweep import kvbench

MIB = 2**20


def _peak_rss(tmp_path, n: int, context: int) -> int:
    """Peak RSS of a real run of n sequences of ``context`` tokens on llama-small, the pool sized to them."""
    d = tmp_path / f"n{n}"
    out = 8
    r = kvbench(tmp_path, "run", "model=llama-small", f"parallel={n}", f"cache.size={n * context}",
                "cache.kv=f32/f32", "workload=fixed", f"workload.n_requests={n}",
                f"workload.prompt_len={context - out + 1}", f"workload.output_len={out}", "probe_logit_error=false",
                f"hydra.run.dir={d}", "--quiet", timeout=600)
    assert r.returncode == 0, r.stderr
    rec = json.loads((d / "record.json").read_text())
    assert rec["status"] == "ok" and rec["metrics"]["memory.peak_rss_source"] == "vmhwm"
    return rec["metrics"]["memory.peak_rss_bytes"]


def test_plan_agrees_with_the_measured_failure_point(tmp_path):
    """A memory budget, the plan's answer for it, and real runs with parallel going up: a run fails under the
    cap when its measured peak RSS (the kernel's high-water mark) exceeds the budget, which is what a
    container's memory limit would kill. The last run that fits is within one sequence of the plan's answer.

    Runs start at the plan's answer and go up (while they fit) or down (while they do not), at most to one
    sequence past it in either direction: a run beyond that would only confirm a failure.
    llama-small, f32 K/V, 2048 tokens: 32 MiB of KV per sequence, ~37 MiB with its transient buffers; the
    plan was 2-15 MiB below the measured peaks here (f16 and f32 K/V, 1 to 6 sequences)."""
    context, budget = 2048, 840 * MIB  # the plan's answer is 2 here: two runs of at most 3 sequences
    r = kvbench(tmp_path, "plan", "--model", "llama-small", "--memory", str(budget), "--context", str(context),
                "--type-k", "f32", "--type-v", "f32", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    want = plan["max_sequences"]["pooled"]
    assert set(plan["max_sequences"]) == {"pooled", "paged", "naive"} and want >= 2
    peaks: dict[int, int] = {}

    def fits(n: int) -> bool:
        peaks[n] = _peak_rss(tmp_path, n, context)
        return peaks[n] <= budget

    # from the plan's answer, up while runs fit and down while they do not, never past one sequence off the
    # plan (a run there already decides the test): usually two runs
    n = want
    if fits(n):
        while n < want + 2 and fits(n + 1):
            n += 1
    else:
        n -= 1
        while n >= want - 1 and n > 0 and not fits(n):
            n -= 1
    assert abs(n - want) <= 1, (want, {k: round(v / MIB) for k, v in sorted(peaks.items())})
