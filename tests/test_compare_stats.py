"""Tests for the comparison statistics in :mod:`mlaprop.stats`: the exact McNemar p-value against reference
values computed independently, the paired difference interval's coverage, and the minimum detectable drop
against the power it promises."""

from __future__ import annotations

import math
import random
from statistics import NormalDist

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from mlaprop.stats import (
    PairedCounts,
    mcnemar_exact_p,
    minimum_detectable_drop,
    paired_difference_interval,
)

#: (only_a, only_b, p): reference values from ``scipy.stats.binomtest(only_a, only_a + only_b, 0.5).pvalue``
#: (scipy 1.17.1, computed outside this suite) and checked by hand where short: 3 vs 10 is
#: 2 * (1 + 13 + 78 + 286) / 2**13 = 756/8192; 1 vs 9 is 2 * (1 + 10) / 2**10 = 22/1024.
REFERENCE = [
    (0, 0, 1.0),
    (1, 0, 1.0),
    (3, 1, 0.625),
    (3, 10, 0.09228515625),
    (9, 1, 0.021484375),
    (1, 9, 0.021484375),
    (5, 5, 1.0),
    (0, 6, 0.03125),
    (12, 30, 0.007915897334896727),
    (40, 60, 0.05688793364098089),
]


@pytest.mark.parametrize(("only_a", "only_b", "expected"), REFERENCE)
def test_mcnemar_matches_reference_values(only_a: int, only_b: int, expected: float) -> None:
    """The exact McNemar p-value equals the independently computed exact binomial test, to float precision."""
    assert mcnemar_exact_p(only_a, only_b) == pytest.approx(expected, rel=1e-12, abs=0)


@given(st.integers(0, 300), st.integers(0, 300))
def test_mcnemar_is_symmetric_and_a_probability(only_a: int, only_b: int) -> None:
    """Swapping the runs gives the same p-value; it lies in (0, 1]; it is 1 when the flips balance."""
    p = mcnemar_exact_p(only_a, only_b)
    assert p == mcnemar_exact_p(only_b, only_a)
    assert 0.0 < p <= 1.0
    if only_a == only_b:
        event("balanced")
        assert p == 1.0


def test_mcnemar_refuses_negative_counts() -> None:
    """A negative count is a programming error, named in the message."""
    with pytest.raises(ValueError, match="must be >= 0"):
        mcnemar_exact_p(-1, 3)


@given(st.integers(0, 60), st.integers(0, 20), st.integers(0, 20), st.integers(0, 60))
def test_interval_holds_the_difference_and_stays_in_range(both: int, a: int, b: int, neither: int) -> None:
    """The paired interval contains B - A, lies in [-1, 1], and mirrors when the runs are swapped."""
    counts = PairedCounts(both, a, b, neither)
    if counts.n == 0:
        event("empty")
        with pytest.raises(ValueError, match="no question"):
            paired_difference_interval(counts)
        return
    lo, hi = paired_difference_interval(counts)
    d = counts.difference
    assert -1.0 <= lo <= d <= hi <= 1.0
    lo2, hi2 = paired_difference_interval(PairedCounts(both, b, a, neither))
    assert lo2 == pytest.approx(-hi, abs=1e-12) and hi2 == pytest.approx(-lo, abs=1e-12)


def test_interval_is_not_degenerate_without_flips() -> None:
    """No question flipped: the difference is 0 but the interval still has width (n is finite)."""
    lo, hi = paired_difference_interval(PairedCounts(200, 0, 0, 50))
    assert lo < 0.0 < hi
    assert hi - lo > 0.01


@pytest.mark.parametrize(("p_a", "p_flip_ab", "p_flip_ba"), [(0.85, 0.04, 0.02), (0.6, 0.1, 0.1)])
def test_interval_covers_the_true_difference(p_a: float, p_flip_ab: float, p_flip_ba: float) -> None:
    """Simulated paired runs of 250 questions: the 95% interval covers the true B - A in at least 93% of
    2000 trials (Newcombe's method keeps close to nominal coverage)."""
    rng = random.Random(13)
    n, trials = 250, 2000
    # cell probabilities: both, only A, only B, neither
    p_only_a = p_flip_ab
    p_only_b = p_flip_ba
    p_both = p_a - p_only_a
    true_d = p_only_b - p_only_a
    covered = 0
    for _ in range(trials):
        cells = [0, 0, 0, 0]
        for _ in range(n):
            u = rng.random()
            if u < p_both:
                cells[0] += 1
            elif u < p_both + p_only_a:
                cells[1] += 1
            elif u < p_both + p_only_a + p_only_b:
                cells[2] += 1
            else:
                cells[3] += 1
        lo, hi = paired_difference_interval(PairedCounts(*cells))
        covered += lo <= true_d <= hi
    assert covered / trials >= 0.93, covered / trials


@pytest.mark.parametrize("n", [16, 50, 250, 1000])
@pytest.mark.parametrize("p", [0.5, 0.8, 0.85, 0.95, 1.0])
def test_minimum_detectable_drop_has_the_promised_power(p: float, n: int) -> None:
    """At the returned drop, a two-sided 5% test between two runs of n (arcsine scale) has power 0.8,
    computed independently from the normal distribution."""
    drop = minimum_detectable_drop(p, n)
    if drop is None:
        event("not detectable")
        return
    p2 = p - drop
    h = 2 * math.asin(math.sqrt(p)) - 2 * math.asin(math.sqrt(p2))
    z = NormalDist().inv_cdf(0.975)
    power = NormalDist().cdf(h * math.sqrt(n / 2) - z)
    assert power == pytest.approx(0.8, abs=1e-9)
    assert 0.0 < drop <= p


def test_minimum_detectable_drop_known_values() -> None:
    """250 questions at 0.85 can only detect a drop of about 10 points; 16 questions at 0.5 none at all."""
    assert minimum_detectable_drop(0.85, 250) == pytest.approx(0.0995, abs=5e-4)
    assert minimum_detectable_drop(0.5, 5) is None
    bigger = minimum_detectable_drop(0.85, 1000)
    assert bigger is not None and bigger < 0.06
    with pytest.raises(ValueError, match="at least one question"):
        minimum_detectable_drop(0.5, 0)
