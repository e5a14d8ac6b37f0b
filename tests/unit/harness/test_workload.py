import numpy as np
import pytest
from omegaconf import OmegaConf

from harness.workload import (
    ArrivalConf,
    ArrivalProcess,
    ChurnWorkload,
    FixedWorkload,
    SharedPrefixWorkload,
    ShareGPTWorkload,
    arrival_times,
)


def test_seeded_and_reproducible():
    w = ShareGPTWorkload(n_requests=50, arrival=ArrivalConf())
    a, b = w.generate(1000, seed=3), w.generate(1000, seed=3)
    assert [(t.arrival_s, t.request.prompt, t.request.n_predict) for t in a] == \
           [(t.arrival_s, t.request.prompt, t.request.n_predict) for t in b]
    c = w.generate(1000, seed=4)
    assert [t.request.prompt for t in a] != [t.request.prompt for t in c]


def test_sharegpt_means_follow_the_paper_scaled():
    w = ShareGPTWorkload(n_requests=20000, arrival=ArrivalConf(), scale=0.5, max_len=100000, min_len=1)
    lens = np.asarray(w.lengths(np.random.default_rng(0)))
    assert lens[:, 0].mean() == pytest.approx(161 * 0.5, rel=0.03)
    assert lens[:, 1].mean() == pytest.approx(338 * 0.5, rel=0.03)


def test_fixed_shared_prefix_churn():
    f = FixedWorkload(n_requests=3, prompt_len=5, output_len=7, arrival=ArrivalConf()).generate(100, 0)
    assert [len(t.request.prompt) for t in f] == [5] * 3 and [t.request.n_predict for t in f] == [7] * 3
    s = SharedPrefixWorkload(n_requests=4, n_prefixes=2, prefix_len=10, suffix_len=3, arrival=ArrivalConf())
    reqs = [t.request.prompt for t in s.generate(100, 0)]
    assert reqs[0][:10] == reqs[2][:10] != reqs[1][:10] == reqs[3][:10] and reqs[0][10:] != reqs[2][10:]
    c = ChurnWorkload(n_requests=200, prompt_min=4, prompt_max=9, output_min=2, output_max=30, arrival=ArrivalConf())
    lens = np.asarray(c.lengths(np.random.default_rng(1)))
    assert lens[:, 0].min() >= 4 and lens[:, 0].max() <= 9 and len(set(lens[:, 1])) > 10


@pytest.mark.parametrize("process, cv", [("poisson", 1.0), ("gamma", 3.0), ("gamma", 0.5)])
def test_arrivals_have_the_rate_and_spread_asked(process, cv):
    a = OmegaConf.structured(ArrivalConf(process=ArrivalProcess(process), rate=20.0, cv=cv))
    t = arrival_times(a, 20001, np.random.default_rng(0))
    gaps = np.diff(t)
    assert t[0] == 0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / 20, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)


def test_no_arrival_process_means_everything_at_zero():
    assert (arrival_times(ArrivalConf(), 5, np.random.default_rng(0)) == 0).all()


def test_fit_cache_holds_parallel_longest_requests_in_whole_blocks():
    from harness.workload import fit_cache_size

    timed = ChurnWorkload(n_requests=8, prompt_min=10, prompt_max=60, output_min=5, output_max=40,
                          arrival=ArrivalConf()).generate(1000, 3)
    longest = max(len(t.request.prompt) + t.request.n_predict for t in timed)
    assert fit_cache_size(timed, 4, 1) == 4 * longest
    assert fit_cache_size(timed, 4, 16) == -(-4 * longest // 16) * 16
    assert fit_cache_size(timed[:2], 4, 1) == 2 * max(len(t.request.prompt) + t.request.n_predict for t in timed[:2])
    single = FixedWorkload(n_requests=3, prompt_len=448, output_len=64, arrival=ArrivalConf()).generate(1000, 0)
    assert fit_cache_size(single, 1, 16) == 512  # claims_single_sized: llama.cpp's -c for one 512-token slot
