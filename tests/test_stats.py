"""Tests for `mlaprop.stats`: standard error, Wilson interval, gate margin and verdict."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlaprop.stats import Verdict, binomial_stderr, gate_verdict, score, wilson_interval


class TestScore:
    """Tests for `score`."""

    def test_peers_example(self) -> None:
        """196/250 against 0.8: 4 questions short, s.e. ~0.026, gate inside the 95% interval."""
        s = score(196, 250, 0.8)
        assert s.score == pytest.approx(0.784)
        assert s.stderr == pytest.approx(math.sqrt(0.784 * 0.216 / 250))
        assert s.stderr == pytest.approx(0.02603, abs=1e-5)
        assert (s.ci_low, s.ci_high) == (pytest.approx(0.7289, abs=1e-4), pytest.approx(0.8305, abs=1e-4))
        assert s.margin == pytest.approx(-0.016)
        assert s.questions_to_gate == -4
        assert s.meets_gate is False
        assert s.gate_in_interval is True
        assert s.describe() == (
            "0.784 (196/250, ±0.026 s.e., 95% CI 0.729-0.831), 4 questions short of the 0.8 gate; "
            "the gate is inside the interval (within noise)"
        )

    def test_exactly_at_gate(self) -> None:
        """200/250 meets 0.8 exactly (compared as fractions)."""
        s = score(200, 250, 0.8)
        assert (s.meets_gate, s.questions_to_gate) == (True, 0)
        assert "exactly at the 0.8 gate" in s.describe()

    @pytest.mark.parametrize(("k", "n"), [(3, 3), (9, 11), (201, 251)])
    def test_no_question_to_spare_is_not_exactly_at(self, k: int, n: int) -> None:
        """3/3 against 0.8 needs all 3 right but scores 1.000: it meets the gate with no question to spare,
        it is not "exactly at" it (regression)."""
        s = score(k, n, 0.8)
        assert (s.meets_gate, s.questions_to_gate) == (True, 0)
        assert s.score > 0.8
        assert "exactly at" not in s.describe()
        assert ", meets the 0.8 gate with no question to spare" in s.describe()

    def test_describe_3_of_3(self) -> None:
        """The whole line for 3/3."""
        assert score(3, 3).describe() == (
            "1.000 (3/3, ±0.000 s.e., 95% CI 0.439-1.000), meets the 0.8 gate with no question to spare; "
            "the gate is inside the interval (within noise)"
        )

    def test_one_question(self) -> None:
        """Singular and plural: 1 question short / above."""
        assert score(199, 250).describe().split("), ")[1].startswith("1 question short of the 0.8 gate")
        assert score(201, 250).describe().split("), ")[1].startswith("1 question above the 0.8 gate")

    def test_well_above(self) -> None:
        """240/250: 40 above, gate outside the interval."""
        s = score(240, 250)
        assert (s.questions_to_gate, s.gate_in_interval) == (40, False)
        assert s.describe().endswith("40 questions above the 0.8 gate")

    def test_bounds(self) -> None:
        """0/n and n/n have non-degenerate Wilson intervals inside [0, 1]."""
        assert wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
        assert wilson_interval(10, 10) == (pytest.approx(0.7225, abs=1e-4), 1.0)
        assert binomial_stderr(10, 10) == 0.0

    @pytest.mark.parametrize(("k", "n"), [(0, 0), (-1, 5), (6, 5)])
    def test_bad_counts(self, k: int, n: int) -> None:
        """Impossible counts are refused."""
        with pytest.raises(ValueError):
            score(k, n)

    def test_bad_gate(self) -> None:
        """A gate outside [0, 1] is refused."""
        with pytest.raises(ValueError, match="gate must be between 0 and 1"):
            score(1, 2, 1.5)


@given(n=st.integers(1, 2000), data=st.data())
def test_interval_contains_estimate(n: int, data: st.DataObject) -> None:
    """The Wilson interval lies in [0, 1] and contains k/n."""
    k = data.draw(st.integers(0, n))
    low, high = wilson_interval(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0


class TestVerdict:
    """Tests for `gate_verdict`: failed items are bounded both ways."""

    @pytest.mark.parametrize(
        ("correct", "answered", "total", "verdict"),
        [
            (200, 250, 250, Verdict.PASS),
            (199, 250, 250, Verdict.FAIL),
            (200, 245, 250, Verdict.PASS),  # even with 5 errors wrong, 200/250 meets the gate
            (196, 246, 250, Verdict.INCONCLUSIVE),  # 4 errors could lift it to 200
            (195, 246, 250, Verdict.FAIL),  # even all 4 right gives 199
            (0, 0, 250, Verdict.INCONCLUSIVE),
        ],
    )
    def test_table(self, correct: int, answered: int, total: int, verdict: Verdict) -> None:
        """Verdicts at and around the gate."""
        assert gate_verdict(correct, answered, total, 0.8) is verdict

    def test_bad(self) -> None:
        """Counts out of order are refused."""
        with pytest.raises(ValueError):
            gate_verdict(5, 4, 10)
