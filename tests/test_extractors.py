"""Tests for the two MGSM answer extractors.

The ``simple-evals`` expectations were derived by reading simple-evals' ``mgsm_eval.py`` (``parse_answer``:
exact prefix, text after the last one, commas removed, last ``\\d+\\.?\\d*`` with a trailing dot stripped;
``score_mgsm``: trailing decimal zeros and commas dropped, then string equality).
"""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from mlaprop.mgsm import (
    LANG_TO_ANSWER_PREFIX,
    Parser,
    extract,
    is_correct,
    parse_answer_robust,
    parse_answer_simple_evals,
    score_robust,
    score_simple_evals,
)

# (response, target, simple-evals extracts, simple-evals right?, robust extracts)
REQUIRED = [
    ("answer: 18", "18", "", False, "18"),
    ("Answer: -5", "-5", "5", False, "-5"),
    ("Answer: 18 (from 2 x 9)", "18", "9", False, "18"),
    ("Answer: 18\n\nNote: she keeps 3 eggs.", "18", "3", False, "18"),
    ("The answer is 72.", "72", "", False, "72"),
    ("Answer: $1,234.00", "1234", "1234.00", True, "1234"),
]


class TestRequiredCases:
    """Tests for the cases the issue names, for both parsers."""

    @pytest.mark.parametrize(("response", "target", "se", "se_right", "robust"), REQUIRED)
    def test_simple_evals_matches_upstream(
        self, response: str, target: str, se: str, se_right: bool, robust: str
    ) -> None:
        """The simple-evals parser returns what simple-evals returns, misses included."""
        assert parse_answer_simple_evals(response, "Answer") == se
        assert score_simple_evals(target, se) is se_right
        assert extract(Parser.SIMPLE_EVALS, response, "en") == se
        assert is_correct(Parser.SIMPLE_EVALS, target, se) is se_right

    @pytest.mark.parametrize(("response", "target", "se", "se_right", "robust"), REQUIRED)
    def test_robust_gets_it_right(
        self, response: str, target: str, se: str, se_right: bool, robust: str
    ) -> None:
        """The robust parser reads the intended number and scores it right."""
        assert parse_answer_robust(response, "en") == robust
        assert score_robust(target, robust) is True
        assert is_correct(Parser.ROBUST, target, extract(Parser.ROBUST, response, "en")) is True


class TestSimpleEvals:
    """Tests for other simple-evals behaviours kept on purpose."""

    @pytest.mark.parametrize(
        ("response", "expected"),
        [
            ("Answer: 2,125", "2125"),
            ("Answer: 7.", "7"),
            ("Answer: 0.50", "0.50"),
            ("First Answer: 3\nAnswer: 4", "4"),  # text after the last prefix
            ("Answer: 3 apples and 4 pears", "4"),  # last number wins
            ("Answer:", ""),
            ("", ""),
        ],
    )
    def test_parse(self, response: str, expected: str) -> None:
        """``parse_answer`` semantics."""
        assert parse_answer_simple_evals(response) == expected

    @pytest.mark.parametrize(
        ("target", "prediction", "right"),
        [
            ("2,125", "2125", True),
            ("18", "18.00", True),
            ("18", "18.5", False),
            ("18", "", False),
            ("10", "1", False),
        ],
    )
    def test_score(self, target: str, prediction: str, right: bool) -> None:
        """``score_mgsm`` semantics (note ``"10"`` vs ``"1"``: rstrip only runs when there is a dot)."""
        assert score_simple_evals(target, prediction) is right

    def test_other_language_prefix(self) -> None:
        """Each language uses its own prefix, case-sensitively."""
        assert extract(Parser.SIMPLE_EVALS, "Antwort: 12", "de") == "12"
        assert extract(Parser.SIMPLE_EVALS, "Answer: 12", "de") == ""
        assert LANG_TO_ANSWER_PREFIX["zh"] == "答案"


class TestRobust:
    """Tests for the robust parser beyond the required cases."""

    @pytest.mark.parametrize(
        ("response", "expected"),
        [
            ("**Answer:** 2,125", "2125"),
            ("Answer:\n\n42", "42"),
            ("Answer: 3 + 4 = 7", "7"),
            ("Answer: −7", "-7"),
            ("Answer: 0.50", "0.5"),
            ("Final answer: 12 dollars", "12"),
            ("answer: 18. This answer is final.", "18"),  # a later "answer" without a number is skipped
            ("To answer this we need 5 apples.\nTotal: 18", "18"),  # "answer this" is not a marker
            ("So the total is \\boxed{15}.", "15"),
            ("She makes 9 + 9 = 18 dollars", "18"),  # last number on the last line
            ("2-3 weeks later: 5", "5"),
            ("答案：18", "18"),
            ("I don't know.", ""),
            ("", ""),
        ],
    )
    def test_parse(self, response: str, expected: str) -> None:
        """Markers, separators, signs, fallbacks."""
        lang = "zh" if "答案" in response else "en"
        assert parse_answer_robust(response, lang) == expected

    @pytest.mark.parametrize(
        ("target", "prediction", "right"),
        [
            ("2,125", "2125", True),
            ("-5", "-5", True),
            ("5", "-5", False),
            ("18", "", False),
            ("18", "18.0", True),
        ],
    )
    def test_score(self, target: str, prediction: str, right: bool) -> None:
        """Numeric equality."""
        assert score_robust(target, prediction) is right


@given(n=st.integers(min_value=-(10**9), max_value=10**9), commas=st.booleans())
@example(n=0, commas=False)
@example(n=-5, commas=False)
def test_final_answer_line_is_read(n: int, commas: bool) -> None:
    """A reply ending in ``Answer: <n>`` is right for the robust parser, and for simple-evals when n >= 0."""
    shown = f"{n:,}" if commas else str(n)
    response = f"Step 1: think about 12 things.\nStep 2: 3 more.\nAnswer: {shown}"
    target = str(n)
    assert score_robust(target, parse_answer_robust(response)) is True
    assert score_simple_evals(target, parse_answer_simple_evals(response)) is (n >= 0)
