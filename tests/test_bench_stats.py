"""Rounds, intervals and calls of repeated benchmark measurements (no engine)."""

from __future__ import annotations

import random

import pytest

from coral_vllm.bench.stats import (MIN_ROUNDS, differ, median_interval, meets,
                                    ratio_summary, rotated, summarize)


def test_rounds_rotate_every_variant_through_every_position():
    orders = [rotated("ABCD", r) for r in range(4)]
    assert orders[0] == list("ABCD") and orders[1] == list("BCDA")
    for pos in range(4):
        assert sorted(o[pos] for o in orders) == list("ABCD")


def test_median_interval_has_the_stated_exact_coverage():
    assert median_interval([3, 1, 2, 5, 4])[:2] == (1, 5)  # 5 rounds: [min, max]
    low, high, cov = median_interval(list(range(1, 11)))
    assert (low, high) == (2, 9) and cov == pytest.approx(1 - 2 * 11 / 1024)
    assert median_interval([7.0])[:2] == (7.0, 7.0)
    assert median_interval([1, 2, 3, 4])[2] < 0.9 <= median_interval([1, 2, 3, 4, 5])[2]
    assert MIN_ROUNDS == 5
    # simulated: the interval holds the true median at least as often as stated
    rng = random.Random(0)
    for n in (5, 7, 10):
        hits = 0
        for _ in range(4000):
            low, high, cov = median_interval([rng.expovariate(1.0) for _ in range(n)])
            hits += low <= 0.6931471805599453 <= high  # ln 2, the median of Exp(1)
        assert hits / 4000 > cov - 0.02


def test_ratios_pair_rounds_and_call_only_what_the_interval_excludes():
    fast, slow = [110, 112, 109, 111, 113], [100, 101, 99, 100, 102]
    up = ratio_summary(fast, slow)
    assert up["call"] == "higher" and up["rounds"] == 5 and up["interval"][0] > 1
    assert ratio_summary(slow, fast)["call"] == "lower"
    noisy = ratio_summary([100, 130, 90, 120, 95], [110, 100, 105, 100, 110])
    assert noisy["call"] == "same"
    assert meets(up, 1.05) == "met" and meets(up, 1.2) == "missed"
    assert meets(noisy, 1.0) == "undecided"
    a, b = summarize(fast), summarize(slow)
    assert differ(a, b) and not differ(a, summarize([108, 111, 115, 109, 112]))
    with pytest.raises(ValueError, match="pair rounds"):
        ratio_summary([1, 2], [1])
