"""The benches' paired comparison (bench/common.py): ratio of medians, round-resampling
bootstrap interval and sign test. Pure computation, so property-tested."""
from __future__ import annotations

import math
import os
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
from common import PairedRatio, paired_ratio, sign_test, verdict  # noqa: E402

times = st.lists(st.floats(0.5, 20.0), min_size=1, max_size=25)


@given(times, st.floats(0.25, 4.0))
@settings(max_examples=60, deadline=None)
def test_a_constant_factor_is_the_ratio_and_the_whole_interval(base, factor):
    pr = paired_ratio(base, [t * factor for t in base], resamples=500)
    assert pr.ratio == pytest.approx(factor)
    assert pr.low == pytest.approx(factor) and pr.high == pytest.approx(factor)


@given(st.lists(st.tuples(st.floats(0.5, 20.0), st.floats(0.5, 20.0)), min_size=2, max_size=25),
       st.floats(0.25, 4.0))
@settings(max_examples=60, deadline=None)
def test_interval_is_ordered_and_scales_with_the_other_variant(pairs, k):
    base, other = [a for a, _ in pairs], [b for _, b in pairs]
    pr = paired_ratio(base, other, resamples=500)
    assert pr.low <= pr.high
    assert min(other) / max(base) <= pr.low and pr.high <= max(other) / min(base)
    scaled = paired_ratio(base, [t * k for t in other], resamples=500)
    assert scaled.low == pytest.approx(pr.low * k) and scaled.high == pytest.approx(pr.high * k)
    assert pr.lower + pr.higher + sum(a == b for a, b in pairs) == pr.rounds == len(pairs)


def test_a_clear_difference_is_told_apart_and_noise_is_not():
    base = [6.1, 6.9, 5.8, 7.2, 6.5, 6.0, 7.0, 6.6, 6.3, 6.8]
    faster = [t - 0.6 for t in base]
    assert "lower than the baseline (better)" in paired_ratio(base, faster).describe("lower")
    assert "higher than the baseline (worse)" in paired_ratio(faster, base).describe("lower")
    noise = base[5:] + base[:5]  # the same values, paired with other rounds
    assert "not told apart" in paired_ratio(base, noise).describe("lower")


def test_rounds_must_pair():
    with pytest.raises(ValueError):
        paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        paired_ratio([], [])


@given(st.integers(0, 40), st.integers(0, 40))
def test_sign_test_is_a_symmetric_two_sided_binomial_p_value(wins, losses):
    p = sign_test(wins, losses)
    assert p == sign_test(losses, wins)
    assert 0 < p <= 1
    n, k = wins + losses, min(wins, losses)
    if n:
        exact = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
        assert p == pytest.approx(min(1.0, 2 * exact))


def test_sign_test_known_values():
    assert sign_test(7, 0) == pytest.approx(2 / 128)
    assert sign_test(3, 4) == 1.0
    assert sign_test(0, 0) == 1.0


def test_a_target_is_met_only_when_the_interval_clears_it_too():
    inside = PairedRatio(0.97, 0.95, 0.99, 0.95, 12, 3, 15, 0.04)
    straddling = inside._replace(high=1.01)
    assert verdict(0.97, 1.0, inside) == "met"
    assert verdict(0.97, 1.0, straddling).startswith("not shown (interval [0.950, 1.010])")
    assert verdict(1.02, 1.0, inside) == "NOT met"
    assert verdict(0.97, 1.0) == "met"  # no rounds to pair: the medians decide
    rate = PairedRatio(0.95, 0.91, 0.99, 0.95, 1, 8, 9, 0.04)
    assert verdict(0.95, 0.9, rate, "higher") == "met"
    assert verdict(0.95, 0.9, rate._replace(low=0.85), "higher").startswith("not shown")
    assert verdict(0.85, 0.9, rate, "higher") == "NOT met"
