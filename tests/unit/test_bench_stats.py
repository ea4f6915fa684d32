"""The benches' paired comparison (bench/common.py): median per-round ratio, its exact
order-statistic interval (the sign test inverted), the sign test, the verdict and the
order of variants per round. Pure computation, so property-tested."""
from __future__ import annotations

import itertools
import math
import os
import statistics
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
from common import (MIN_ROUNDS, NULL_MODELS, PairedRatio, min_rounds, null_met_rate, order_rank,  # noqa: E402
                    paired_ratio, round_orders, sign_test, verdict)

times = st.floats(0.5, 20.0)
levels = st.sampled_from([0.8, 0.9, 0.95, 0.99])


@given(st.lists(times, min_size=1, max_size=25), st.floats(0.25, 4.0))
@settings(max_examples=60, deadline=None)
def test_a_constant_factor_is_the_ratio_and_the_whole_interval(base, factor):
    pr = paired_ratio(base, [t * factor for t in base])
    assert pr.ratio == pytest.approx(factor)
    if len(base) >= MIN_ROUNDS:
        assert pr.low == pytest.approx(factor) and pr.high == pytest.approx(factor)
    else:
        assert not pr.has_interval and (pr.low, pr.high, pr.level) == (0.0, math.inf, 0.0)


@given(st.lists(st.tuples(times, times), min_size=1, max_size=25), st.floats(0.25, 4.0))
@settings(max_examples=60, deadline=None)
def test_interval_is_ordered_holds_the_median_and_scales_with_the_other_variant(pairs, k):
    base, other = [a for a, _ in pairs], [b for _, b in pairs]
    pr = paired_ratio(base, other)
    ratios = [o / b for b, o in pairs]
    assert pr.ratio == pytest.approx(statistics.median(ratios))
    assert pr.lower + pr.higher + sum(a == b for a, b in pairs) == pr.rounds == len(pairs)
    if not pr.has_interval:
        assert len(pairs) < MIN_ROUNDS
        return
    assert min(ratios) <= pr.low <= pr.ratio <= pr.high <= max(ratios)
    scaled = paired_ratio(base, [t * k for t in other])
    assert scaled.low == pytest.approx(pr.low * k) and scaled.high == pytest.approx(pr.high * k)


@given(st.lists(st.tuples(times, times), min_size=1, max_size=40), st.floats(0.2, 5.0), levels)
@settings(max_examples=100, deadline=None)
def test_a_value_lies_outside_the_interval_exactly_when_the_sign_test_rejects_it(pairs, target, level):
    """The interval is the sign test inverted: the values of the median per-round ratio that a
    two-sided sign test at 1 - level does not reject."""
    ratios = [o / b for b, o in pairs]
    if target in ratios:
        return
    pr = paired_ratio([b for b, _ in pairs], [o for _, o in pairs], level)
    below, above = sum(r < target for r in ratios), sum(r > target for r in ratios)
    outside = pr.has_interval and (target < pr.low or target > pr.high)
    assert outside == (sign_test(below, above) <= 1 - level)


@given(st.integers(1, 300), levels)
@settings(max_examples=100, deadline=None)
def test_order_rank_is_the_widest_rank_with_the_coverage_asked_for(n, level):
    k, coverage = order_rank(n, level)

    def cover(j):  # P(X(j) <= median <= X(n+1-j)) for n independent draws
        return 1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2 ** n

    if k:
        assert coverage == pytest.approx(cover(k)) and coverage >= level
        assert (1 - coverage) / 2 <= (1 - level) / 2  # a false "met" at the edge of a target
    else:
        assert coverage == 0.0 and cover(1) < level and n < min_rounds(level)
    assert k == n or cover(k + 1) < level  # no narrower interval would do


def test_min_rounds():
    assert MIN_ROUNDS == min_rounds(0.95) == 6  # 2 / 2**6 = 3.1% <= 5% < 2 / 2**5
    assert min_rounds(0.99) == 8 and min_rounds(0.9) == 5


def test_a_clear_difference_is_told_apart_and_noise_is_not():
    base = [6.1, 6.9, 5.8, 7.2, 6.5, 6.0, 7.0, 6.6, 6.3, 6.8]
    faster = [t - 0.6 for t in base]
    assert "lower than the baseline (better)" in paired_ratio(base, faster).describe("lower")
    assert "higher than the baseline (worse)" in paired_ratio(faster, base).describe("lower")
    noise = base[5:] + base[:5]  # the same values, paired with other rounds
    assert "not told apart" in paired_ratio(base, noise).describe("lower")
    assert "no interval from 5 rounds" in paired_ratio(base[:5], faster[:5]).describe("lower")


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


def test_interval_known_values():
    # 9 rounds: the 2nd smallest to the 2nd largest per-round ratio, 96.1% (1 - 2 * 10 / 512)
    base = [1.0] * 9
    pr = paired_ratio(base, [0.90, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 1.10])
    assert (pr.ratio, pr.low, pr.high) == (0.94, 0.91, 0.97)
    assert pr.level == pytest.approx(1 - 20 / 512)
    # 17 rounds: ranks 5 and 13, 95.1% (the textbook table's)
    pr = paired_ratio([1.0] * 17, [1 + i / 100 for i in range(17)])
    assert (pr.low, pr.high) == (1.04, 1.12) and pr.level == pytest.approx(0.951, abs=5e-4)


def test_a_target_is_met_only_with_enough_rounds_and_the_interval_clearing_it():
    inside = PairedRatio(0.97, 0.95, 0.99, 0.96, 12, 3, 15, 0.04)
    straddling = inside._replace(high=1.01)
    assert verdict(0.97, 1.0, inside) == "met"
    assert verdict(0.97, 1.0, straddling).startswith("not shown (interval [0.950, 1.010])")
    assert verdict(1.02, 1.0, inside) == "NOT met"
    assert verdict(0.97, 1.0) == "not shown (no paired rounds)"  # medians alone show nothing
    few = paired_ratio([1.0, 1.1, 0.9], [0.5, 0.55, 0.45])  # halved in all 3 rounds: still too few
    assert verdict(0.5, 1.0, few) == f"not shown (too few rounds: 3 < {MIN_ROUNDS})"
    assert verdict(1.5, 1.0, few) == "NOT met"
    rate = PairedRatio(0.95, 0.91, 0.99, 0.96, 1, 8, 9, 0.04)
    assert verdict(0.95, 0.9, rate, "higher") == "met"
    assert verdict(0.95, 0.9, rate._replace(low=0.85), "higher").startswith("not shown")
    assert verdict(0.85, 0.9, rate, "higher") == "NOT met"
    assert verdict(0.95, 0.9, rate._replace(rounds=5), "higher").startswith("not shown (too few rounds")


TRIALS = 2000


@given(st.integers(2, 12), st.sampled_from(NULL_MODELS), st.integers(0, 2 ** 16))
@settings(max_examples=12, deadline=None, derandomize=True)
def test_noise_is_rarely_called_met_at_small_numbers_of_rounds(n, model, seed):
    """Both variants drawn alike (the true ratio is 1, the target 1): verdict() may call that
    "met" in at most 2.5% of runs (one side of a 95% interval), here allowing the simulation's
    own error of 3 standard deviations; and never below MIN_ROUNDS. The previous percentile
    bootstrap did so in 12% of runs at 3 rounds and 3-4% at 6-7 (bench/README.md)."""
    rate = null_met_rate(n, model, TRIALS, seed)
    if n < MIN_ROUNDS:
        assert rate == 0
    else:
        assert rate <= 0.025 + 3 * math.sqrt(0.025 * 0.975 / TRIALS)


def test_null_simulation_is_deterministic():
    assert null_met_rate(9, "round effect", 200, seed=3) == null_met_rate(9, "round effect", 200, seed=3)
    with pytest.raises(ValueError):
        null_met_rate(9, "no such model", 10)


@given(st.lists(st.text(min_size=1, max_size=3), min_size=1, max_size=7, unique=True), st.integers(0, 30),
       st.integers(0, 2 ** 32 - 1))
@settings(max_examples=60, deadline=None)
def test_round_orders_balance_each_pair_of_variants_over_every_two_rounds(names, rounds, seed):
    orders = round_orders(names, rounds, seed)
    assert orders == round_orders(names, rounds, seed)  # the recorded seed tells the order
    assert len(orders) == rounds and all(sorted(o) == sorted(names) for o in orders)
    for first, second in zip(orders[::2], orders[1::2]):
        assert second == first[::-1]
        for a, b in itertools.permutations(names, 2):  # a before b in exactly one of the two
            assert (first.index(a) < first.index(b)) + (second.index(a) < second.index(b)) == 1
