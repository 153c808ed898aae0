"""Scores against a gate: binomial standard error, 95% Wilson interval, margin, and the verdict; and the
statistics of comparing runs: the exact McNemar test, the paired difference interval, the minimum detectable
drop for a run's size.

Pure functions of counts; no I/O. The gate is compared exactly (as a fraction), so 200/250 against 0.8 passes
without floating-point doubt.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from fractions import Fraction
from statistics import NormalDist

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_GATE",
    "DEFAULT_POWER",
    "Z_95",
    "PairedCounts",
    "Score",
    "Verdict",
    "binomial_stderr",
    "gate_verdict",
    "mcnemar_exact_p",
    "minimum_detectable_drop",
    "paired_difference_interval",
    "score",
    "wilson_interval",
]

#: SGLang's ``test_mla_fp8.py`` asserts ``metrics["score"] >= 0.8`` on MGSM-en.
DEFAULT_GATE = 0.8

#: Two-sided 95% normal quantile (``scipy.stats.norm.ppf(0.975)``).
Z_95 = 1.959963984540054


class Verdict(str, enum.Enum):
    """Outcome of an eval against its gate."""

    PASS = "pass"  # the score meets the gate even if every failed request had been a wrong answer
    FAIL = "fail"  # the score misses the gate even if every failed request had been a right answer
    INCONCLUSIVE = "inconclusive"  # failed requests could flip the verdict either way

    def __str__(self) -> str:
        return str(self.value)


def _check_counts(k: int, n: int) -> None:
    if n <= 0:
        raise ValueError(f"need at least one scored item, got n={n}")
    if not 0 <= k <= n:
        raise ValueError(f"successes must be between 0 and n={n}, got {k}")


def binomial_stderr(k: int, n: int) -> float:
    """Standard error of a proportion ``k/n``: ``sqrt(p (1 - p) / n)``.

    Raises:
        ValueError: ``n <= 0`` or ``k`` outside ``[0, n]``.
    """
    _check_counts(k, n)
    p = k / n
    return math.sqrt(p * (1.0 - p) / n)


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (95% for the default ``z``).

    Unlike the normal interval it stays inside [0, 1] and is not degenerate at 0/n or n/n
    (Wilson 1927; as in ``statsmodels.stats.proportion.proportion_confint(method="wilson")``).

    Raises:
        ValueError: ``n <= 0`` or ``k`` outside ``[0, n]``.
    """
    _check_counts(k, n)
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denom
    # clamp rounding: the interval always holds p, and is exactly 0 / 1 at k = 0 / k = n
    low = 0.0 if k == 0 else min(p, max(0.0, centre - half))
    high = 1.0 if k == n else max(p, min(1.0, centre + half))
    return low, high


def _gate_fraction(gate: float) -> Fraction:
    if not 0.0 <= gate <= 1.0:
        raise ValueError(f"gate must be between 0 and 1, got {gate}")
    return Fraction(str(gate))


@dataclass(frozen=True)
class Score:
    """A proportion against a gate.

    Attributes:
        correct: right answers.
        n: items scored (answered; failed requests are not in ``n``).
        score: ``correct / n``.
        stderr: binomial standard error of ``score``.
        ci_low: lower end of the 95% Wilson interval.
        ci_high: upper end of the 95% Wilson interval.
        gate: the threshold ``score`` must reach.
        margin: ``score - gate`` (negative when short).
        questions_to_gate: ``correct`` minus the fewest right answers out of ``n`` that meet the gate
            (negative: that many questions short; 0: the gate is met with no question to spare, one right
            answer fewer would miss it; the score may still lie above the gate, as 3/3 does for 0.8).
    """

    correct: int
    n: int
    score: float
    stderr: float
    ci_low: float
    ci_high: float
    gate: float
    margin: float
    questions_to_gate: int

    @property
    def meets_gate(self) -> bool:
        """``correct / n >= gate``, compared exactly."""
        return Fraction(self.correct, self.n) >= _gate_fraction(self.gate)

    @property
    def gate_in_interval(self) -> bool:
        """The gate lies inside the 95% interval: the verdict is within sampling noise."""
        return self.ci_low <= self.gate <= self.ci_high

    def describe(self) -> str:
        """One line: ``0.784 (196/250, ±0.026 s.e., 95% CI 0.729-0.831), 4 questions short of the 0.8 gate``.

        Where the score stands: ``N questions short of``, ``exactly at`` (the score equals the gate),
        ``meets ... with no question to spare`` (above the gate, but one right answer fewer would miss it,
        e.g. 3/3 against 0.8) or ``N questions above``. Ends with a note when the gate lies inside the interval.
        """
        gate = f"the {self.gate:g} gate"
        if self.questions_to_gate < 0:
            short = -self.questions_to_gate
            where = f"{short} question{'s' if short != 1 else ''} short of {gate}"
        elif self.questions_to_gate == 0 and Fraction(self.correct, self.n) == _gate_fraction(self.gate):
            where = f"exactly at {gate}"
        elif self.questions_to_gate == 0:
            where = f"meets {gate} with no question to spare"
        else:
            where = (
                f"{self.questions_to_gate} question{'s' if self.questions_to_gate != 1 else ''} above {gate}"
            )
        noise = "; the gate is inside the interval (within noise)" if self.gate_in_interval else ""
        return (
            f"{self.score:.3f} ({self.correct}/{self.n}, ±{self.stderr:.3f} s.e., "
            f"95% CI {self.ci_low:.3f}-{self.ci_high:.3f}), {where}{noise}"
        )


def score(correct: int, n: int, gate: float = DEFAULT_GATE) -> Score:
    """Score ``correct`` out of ``n`` against ``gate``.

    Raises:
        ValueError: ``n <= 0``, ``correct`` outside ``[0, n]``, or ``gate`` outside ``[0, 1]``.
    """
    _check_counts(correct, n)
    g = _gate_fraction(gate)
    low, high = wilson_interval(correct, n)
    needed = math.ceil(g * n)
    return Score(
        correct=correct,
        n=n,
        score=correct / n,
        stderr=binomial_stderr(correct, n),
        ci_low=low,
        ci_high=high,
        gate=gate,
        margin=correct / n - gate,
        questions_to_gate=correct - needed,
    )


def gate_verdict(correct: int, answered: int, total: int, gate: float = DEFAULT_GATE) -> Verdict:
    """Verdict of ``correct`` right answers among ``answered`` of ``total`` items.

    The ``total - answered`` items without an answer (failed requests, or never sent) are bounded both ways:
    PASS when the gate is met even counting them all wrong, FAIL when it is missed even counting them all
    right, INCONCLUSIVE otherwise. With every item answered this is simply ``correct / total >= gate``.

    Raises:
        ValueError: counts out of order (``0 <= correct <= answered <= total``, ``total >= 1``) or a gate
            outside ``[0, 1]``.
    """
    if total <= 0 or not 0 <= correct <= answered <= total:
        raise ValueError(
            f"need 0 <= correct <= answered <= total and total >= 1, got {correct}/{answered}/{total}"
        )
    g = _gate_fraction(gate)
    if Fraction(correct, total) >= g:
        return Verdict.PASS
    if Fraction(correct + total - answered, total) < g:
        return Verdict.FAIL
    return Verdict.INCONCLUSIVE


# --------------------------------------------------------------------------------------------- comparing runs

#: Significance level for comparisons and the minimum detectable drop (two-sided).
DEFAULT_ALPHA = 0.05
#: Power for the minimum detectable drop.
DEFAULT_POWER = 0.8


@dataclass(frozen=True)
class PairedCounts:
    """A 2x2 table of two runs scored on the same questions.

    Attributes:
        both: right in both runs.
        only_a: right in run A only (A -> B lost it).
        only_b: right in run B only (A -> B gained it).
        neither: wrong in both runs.
    """

    both: int
    only_a: int
    only_b: int
    neither: int

    def __post_init__(self) -> None:
        if min(self.both, self.only_a, self.only_b, self.neither) < 0:
            raise ValueError(f"paired counts must be >= 0, got {self}")

    @property
    def n(self) -> int:
        """Questions scored in both runs."""
        return self.both + self.only_a + self.only_b + self.neither

    @property
    def discordant(self) -> int:
        """Questions that flipped between the runs."""
        return self.only_a + self.only_b

    @property
    def difference(self) -> float:
        """Score of B minus score of A on the paired questions (``(only_b - only_a) / n``).

        Raises:
            ValueError: no paired question.
        """
        if self.n == 0:
            raise ValueError("no question was scored in both runs")
        return (self.only_b - self.only_a) / self.n


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the exact binomial test of ``only_a`` successes in
    ``only_a + only_b`` discordant pairs against 1/2, ``min(1, 2 * P(X <= min(only_a, only_b)))`` with
    ``X ~ Binomial(only_a + only_b, 1/2)``; 1.0 when no pair is discordant.

    Computed in exact integer arithmetic, then rounded once to a float. Equals
    ``scipy.stats.binomtest(only_a, only_a + only_b, 0.5).pvalue`` (McNemar 1947; the exact form as in
    ``statsmodels.stats.contingency_tables.mcnemar(exact=True)``).

    Raises:
        ValueError: a negative count.
    """
    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be >= 0, got {only_a} and {only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def paired_difference_interval(counts: PairedCounts, z: float = Z_95) -> tuple[float, float]:
    """Interval for the paired score difference B - A (95% for the default ``z``): Newcombe's hybrid score
    interval for paired proportions (Newcombe 1998, Statistics in Medicine 17:2635, method 10; no continuity
    correction). Combines the Wilson intervals of the two scores with their phi correlation, so it stays in
    [-1, 1] and is not degenerate when no question flipped.

    Raises:
        ValueError: no paired question.
    """
    n = counts.n
    if n == 0:
        raise ValueError("no question was scored in both runs")
    a_right = counts.both + counts.only_a
    b_right = counts.both + counts.only_b
    p1, p2 = a_right / n, b_right / n
    l1, u1 = wilson_interval(a_right, n, z)
    l2, u2 = wilson_interval(b_right, n, z)
    # phi of the 2x2 table; 0 when a margin is empty (Newcombe's convention)
    a_wrong, b_wrong = n - a_right, n - b_right
    denom = a_right * a_wrong * b_right * b_wrong
    det = counts.both * counts.neither - counts.only_a * counts.only_b
    phi = det / math.sqrt(denom) if denom > 0 else 0.0
    d = p2 - p1
    # B - A: the lower end moves B down (p2 - l2) and A up (u1 - p1), and the other way round
    lower = d - math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    upper = d + math.sqrt(max(0.0, (u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1) + (p1 - l1) ** 2))
    return max(-1.0, min(d, lower)), min(1.0, max(d, upper))


def minimum_detectable_drop(
    p: float, n: int, alpha: float = DEFAULT_ALPHA, power: float = DEFAULT_POWER
) -> float | None:
    """The smallest drop from score ``p`` that a second, independent run of ``n`` questions detects with
    probability ``power`` in a two-sided test at level ``alpha``.

    Uses Cohen's arcsine effect size ``h = 2 asin(sqrt(p)) - 2 asin(sqrt(p'))`` (Cohen 1988, section 6.2):
    two samples of ``n`` reach ``power`` when ``h = (z(1 - alpha/2) + z(power)) * sqrt(2 / n)``, so the
    detectable score is ``p' = sin^2(asin(sqrt(p)) - h/2)``. A paired comparison on the same questions
    (``mlaprop compare``) usually detects less.

    Returns:
        ``p - p'`` in score units (0.1 = ten points), or ``None`` when even a drop to 0 would not be detected.

    Raises:
        ValueError: ``p`` outside [0, 1], ``n < 1``, or ``alpha`` / ``power`` outside (0, 1).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"score must be between 0 and 1, got {p}")
    if n < 1:
        raise ValueError(f"need at least one question, got n={n}")
    if not (0.0 < alpha < 1.0 and 0.0 < power < 1.0):
        raise ValueError(f"alpha and power must be between 0 and 1, got {alpha} and {power}")
    normal = NormalDist()
    h = (normal.inv_cdf(1 - alpha / 2) + normal.inv_cdf(power)) * math.sqrt(2 / n)
    angle = math.asin(math.sqrt(p)) - h / 2
    if angle < 0:
        return None
    return p - math.sin(angle) ** 2
