"""Hostile state files (tests/fuzz/state_fuzz.py, bounded): restored, or refused with the memory unchanged.

Raw corruptions (the CRC's job) and edits with the CRC recomputed (validation's job: header fields,
positions, owner counts and ids) of KV and recurrent states, restored into live memories of every
allocator. Only the KvbenchError family, no hang, bounded RSS, and a refused state changes nothing.
"""

from tests.fuzz.run import run_campaign


def test_mutated_states_restore_or_leave_the_memory_as_it_was(tmp_path):
    rep = run_campaign("tests.fuzz.state_fuzz", tmp_path / "state.json", cases=1500, deadline_s=20, timeout_s=120)
    assert rep["cases"] >= 200, rep
    assert rep["counts"].get("clean", 0) > 0 and rep["counts"].get("restored", 0) > 0
    assert rep["findings"] == [], rep["findings"][:5]
