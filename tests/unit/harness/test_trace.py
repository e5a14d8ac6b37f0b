"""workload=trace: the three trace formats read, replayed with their counts, lengths and times, clipped to the
model's context, and Mooncake's shared blocks turned into shared prompt prefixes. Fixtures are written here."""

import json

import pytest

from engine.errors import ConfigError
from harness.workload import TraceWorkload, read_trace

AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:47.1805900,396,109
2023-11-16 18:15:48.9305900,879,1
"""
BURSTGPT = """Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type
5,ChatGPT,472,18,490,Conversation log
5.75,GPT-4,1087,0,1087,API log
9.5,ChatGPT,30,212,242,Conversation log
"""
MOONCAKE = [{"timestamp": 0, "input_length": 1100, "output_length": 12, "hash_ids": [0, 1, 2]},
            {"timestamp": 250, "input_length": 1030, "output_length": 8, "hash_ids": [0, 1, 3]},
            {"timestamp": 3000, "input_length": 600, "output_length": 20, "hash_ids": [7, 8]}]


@pytest.fixture
def traces(tmp_path):
    (tmp_path / "azure.csv").write_text(AZURE)
    (tmp_path / "burst.csv").write_text(BURSTGPT)
    (tmp_path / "mooncake.jsonl").write_text("\n".join(json.dumps(r) for r in MOONCAKE) + "\n")
    return tmp_path


@pytest.mark.parametrize("name, fmt, times, prompts, outputs", [
    ("azure.csv", "azure", [0.0, 0.5, 2.25], [374, 396, 879], [44, 109, 1]),
    ("burst.csv", "burstgpt", [0.0, 0.75, 4.5], [472, 1087, 30], [18, 0, 212]),
    ("mooncake.jsonl", "mooncake", [0.0, 0.25, 3.0], [1100, 1030, 600], [12, 8, 20]),
])
def test_formats_are_told_apart_and_read(traces, name, fmt, times, prompts, outputs):
    got, rows = read_trace(traces / name)
    assert got == fmt
    assert [r.arrival_s for r in rows] == pytest.approx(times, abs=1e-6)
    assert [r.prompt_len for r in rows] == prompts and [r.output_len for r in rows] == outputs


def test_replay_keeps_counts_lengths_and_scaled_times(traces):
    timed = TraceWorkload(path=str(traces / "azure.csv"), time_scale=0.1).generate(1000, seed=0, n_ctx=4096)
    assert len(timed) == 3 and not any(t.clipped for t in timed)
    assert [len(t.request.prompt) for t in timed] == [374, 396, 879]
    assert [t.request.n_predict for t in timed] == [44, 109, 1]
    assert [t.arrival_s for t in timed] == pytest.approx([0.0, 0.05, 0.225], abs=1e-6)
    assert len(TraceWorkload(path=str(traces / "azure.csv"), n_requests=2).generate(1000, 0, 4096)) == 2


def test_a_failed_request_with_no_output_generates_one_token(traces):
    timed = TraceWorkload(path=str(traces / "burst.csv")).generate(1000, seed=0, n_ctx=4096)
    assert [t.request.n_predict for t in timed] == [18, 1, 212]


def test_requests_beyond_the_context_are_clipped_and_counted(traces):
    timed = TraceWorkload(path=str(traces / "burst.csv")).generate(1000, seed=0, n_ctx=512)
    assert [t.clipped for t in timed] == [False, True, False]
    assert len(timed[1].request.prompt) + timed[1].request.n_predict == 512
    # an output longer than the whole context: half the context each
    timed = TraceWorkload(path=str(traces / "burst.csv")).generate(1000, seed=0, n_ctx=200)
    assert (len(timed[2].request.prompt), timed[2].request.n_predict) == (100, 100)


def test_mooncake_hash_ids_become_shared_prefixes(traces):
    a, b, c = (t.request.prompt for t in TraceWorkload(path=str(traces / "mooncake.jsonl"),
                                                       block_tokens=512).generate(1000, seed=3, n_ctx=4096))
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert shared == 1 + 2 * 512  # BOS and the two common blocks
    assert a[:2] != c[:2] or a[1:5] != c[1:5]  # different first block, different tokens
    assert (len(a), len(b), len(c)) == (1100, 1030, 600)


@pytest.mark.parametrize("text, words", [
    ("a,b,c\n1,2,3\n", "is not a known trace"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,12,x\n", "line 2 is not a azure request"),
    ('{"timestamp": 0, "input_length": 10, "output_length": 2}\n{"timestamp": 5}\n', "line 2 is not a mooncake"),
    ("Timestamp,Model,Request tokens,Response tokens\n1,m,0,5\n", "line 2 has a prompt of 0"),
    ("", "is empty"),
])
def test_bad_traces_name_the_file_and_line(tmp_path, text, words):
    p = tmp_path / "t.csv"
    p.write_text(text)
    with pytest.raises(ConfigError, match=words) as e:
        read_trace(p)
    assert str(p) in str(e.value)
