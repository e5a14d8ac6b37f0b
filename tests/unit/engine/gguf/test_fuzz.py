"""Hostile GGUF files (tests/fuzz/gguf_fuzz.py, bounded): only the KvbenchError family, no hang, bounded RSS.

Mutated micro models (byte flips, truncations, boundary values in every integer of the header,
moved regions, invalid UTF-8, a huge block_count, one huge token) go through the loader, the
tokenizer and one prefill. The long campaign is the same module with more cases (docs/robustness.md).
"""

from tests.fuzz.run import run_campaign


def test_mutated_gguf_files_load_or_fail_cleanly(tmp_path):
    rep = run_campaign("tests.fuzz.gguf_fuzz", tmp_path / "gguf.json", cases=1500, deadline_s=25, timeout_s=150)
    assert rep["cases"] >= 200, rep  # the run did the work it claims
    assert rep["counts"].get("clean", 0) > 0 and rep["counts"].get("loaded", 0) > 0  # both kinds were drawn
    assert rep["findings"] == [], rep["findings"][:5]
