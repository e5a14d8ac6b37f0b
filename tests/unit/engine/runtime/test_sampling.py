import pytest
import torch

from engine.errors import ConfigError
from engine.runtime.sampling import Sampler, SamplingParams

LOGITS = torch.tensor([1.0, 3.0, 2.0, -1.0, 2.9])


def test_greedy_is_argmax():
    assert Sampler(SamplingParams())(LOGITS, []) == 1


def test_repetition_penalty_changes_greedy_pick():
    # token 1 was seen: 3.0 / 2 = 1.5 < 2.9
    assert Sampler(SamplingParams(repeat_penalty=2.0))(LOGITS, [1]) == 4


def test_top_k_1_and_tiny_top_p_and_min_p_1_are_greedy():
    for p in (SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6),
              SamplingParams(temperature=1.0, min_p=1.0)):
        s = Sampler(p)
        assert all(s(LOGITS, []) == 1 for _ in range(20))


def test_seeded_and_distinct_per_sequence():
    p = SamplingParams(temperature=1.5, seed=7)

    def draws(seed_offset):
        s = Sampler(p, seed_offset)
        return [s(LOGITS, []) for _ in range(50)]

    assert draws(0) == draws(0)
    assert draws(0) != draws(1)


def test_top_k_restricts_support():
    s = Sampler(SamplingParams(temperature=5.0, top_k=2, seed=1))
    assert {s(LOGITS, []) for _ in range(200)} == {1, 4}


def test_top_p_restricts_support():
    # softmax(LOGITS): p1 and p4 together hold well over 0.5; top_p=0.5 keeps {1, 4}
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=2))
    assert {s(LOGITS, []) for _ in range(200)} <= {1, 4}


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=2),
                                dict(top_k=-1), dict(repeat_penalty=0)])
def test_bad_params(kw):
    with pytest.raises(ConfigError):
        SamplingParams(**kw)
