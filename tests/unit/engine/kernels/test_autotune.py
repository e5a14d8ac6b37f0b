"""kernels.Autotune: real calls explore the candidates in turn, then the lowest median serves."""

import time

from engine.kernels import Autotune


def test_explores_in_turn_then_keeps_the_faster():
    calls = []

    def slow(x):
        calls.append("slow")
        time.sleep(0.003)  # a sleep only ever adds time: the slower candidate stays slower under any load
        return x + 1

    def fast(x):
        calls.append("fast")
        return x + 1

    tune = Autotune()
    results = [tune(("shape", 1), (slow, fast), 1) for _ in range(2 * Autotune.TRIALS + 5)]
    assert all(y == 2 for y, _ in results)  # every call computes the product, exploring or not
    assert calls[:2 * Autotune.TRIALS] == ["slow", "fast"] * Autotune.TRIALS
    assert calls[2 * Autotune.TRIALS:] == ["fast"] * 5
    assert results[-1][1] is fast and tune.choices() == {("shape", 1): 1}
    assert all(f is None for _, f in results[:2 * Autotune.TRIALS - 1])  # undecided while exploring


def test_shapes_are_tuned_apart():
    tune = Autotune()
    for _ in range(Autotune.TRIALS):
        tune(("a",), (lambda: 1,), )
    assert tune.choices() == {("a",): 0} and ("b",) not in tune.state
