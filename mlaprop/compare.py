"""Comparing runs: ``mlaprop compare`` (two runs, paired on the same questions) and ``mlaprop table`` (many
runs, one platform x SGLang version table). Pure: works on the parsed ``summary.json`` and ``items.jsonl``
of each run (:class:`RunRecord`); reading the files is :mod:`mlaprop.compare_cli`'s job.

Tolerant of what a report holds: ``summary.json`` as written before ``schema_version`` and ``provenance``
existed is read, and any field may be missing (shown as ``-``). Items are matched by ``qid``; an item
counts when it has an answer (no ``error``) and a right/wrong mark by the gating parser.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mlaprop.stats import (
    DEFAULT_ALPHA,
    DEFAULT_POWER,
    PairedCounts,
    mcnemar_exact_p,
    minimum_detectable_drop,
    paired_difference_interval,
    wilson_interval,
)

__all__ = [
    "Comparison",
    "Difference",
    "Flip",
    "InvalidRun",
    "RunItem",
    "RunRecord",
    "RunScore",
    "TableCell",
    "compare_runs",
    "comparison_json",
    "describe_score",
    "determinism_status",
    "format_comparison",
    "gating_parser",
    "lookup",
    "parse_items",
    "platform_label",
    "run_facts",
    "run_score",
    "sglang_version",
    "table_cells",
    "table_html",
    "table_markdown",
]


class InvalidRun(ValueError):
    """A report that cannot be compared: the message names the file (and line) and what is wrong."""


@dataclass(frozen=True)
class RunItem:
    """One question's outcome in one run.

    Attributes:
        qid: the question id (``mgsm_en_001``).
        index: 0-based row in the dataset, when recorded.
        correct: right (``True``) / wrong (``False``) by the parser compared; ``None``: no answer (error).
        target: the reference answer.
        extracted: the answer read from the response by the parser compared.
        question: the question text, when the report has it.
        error: why there is no answer.
    """

    qid: str
    index: int | None
    correct: bool | None
    target: str | None = None
    extracted: str | None = None
    question: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class RunRecord:
    """One run's report: its ``summary.json`` and its items.

    Attributes:
        name: how the run is named in output (its summary path, usually).
        summary: the parsed ``summary.json``.
        items: one per question, in question order.
    """

    name: str
    summary: Mapping[str, Any]
    items: tuple[RunItem, ...]


def lookup(data: Any, *path: str) -> Any:
    """``data[path[0]][path[1]]...`` through nested mappings; ``None`` where a step is missing or not a mapping."""
    for key in path:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


def gating_parser(summary: Mapping[str, Any]) -> str:
    """The parser whose score gates the run (``simple-evals`` when the report does not say)."""
    return str(lookup(summary, "mgsm", "gating_parser") or summary.get("gating_parser") or "simple-evals")


def parse_items(lines: Iterable[str], parser: str, source: str = "items.jsonl") -> tuple[RunItem, ...]:
    """Parse ``items.jsonl`` lines into items marked by ``parser``, sorted by question (``index``, then qid).

    Marks come from ``correct_by[parser]`` when present, else ``correct``; an item with an ``error`` has no
    mark. Blank lines are skipped.

    Raises:
        InvalidRun: a line that is not a JSON object with a ``qid``, or a qid seen twice with different
            outcomes (two runs written into one report folder); the message names ``source`` and the line.
    """
    by_qid: dict[str, RunItem] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except RecursionError:
            raise InvalidRun(f"{source}:{number}: not an item (JSON nested too deeply)") from None
        except ValueError as exc:
            raise InvalidRun(
                f"{source}:{number}: not JSON ({exc.args[0] if exc.args else exc}); the file is damaged, "
                "re-run into an empty --report-dir"
            ) from None
        if not isinstance(row, dict) or not isinstance(row.get("qid"), str):
            raise InvalidRun(f"{source}:{number}: not an item (a JSON object with a qid)")
        error = row.get("error")
        mark = lookup(row, "correct_by", parser)
        if mark is None and not isinstance(row.get("correct_by"), Mapping):
            mark = row.get("correct")
        extracted = lookup(row, "extracted_by", parser)
        if extracted is None:
            extracted = row.get("extracted")
        index = row.get("index")
        item = RunItem(
            qid=row["qid"],
            index=index if isinstance(index, int) and not isinstance(index, bool) else None,
            correct=None if error is not None or not isinstance(mark, bool) else mark,
            target=None if row.get("target") is None else str(row.get("target")),
            extracted=None if extracted is None else str(extracted),
            question=row.get("question") if isinstance(row.get("question"), str) else None,
            error=None if error is None else str(error),
        )
        seen = by_qid.get(item.qid)
        if seen is not None and (seen.correct, seen.extracted) != (item.correct, item.extracted):
            raise InvalidRun(
                f"{source}:{number}: question {item.qid} appears twice with different outcomes; two runs "
                "wrote into one report folder. Re-run into an empty --report-dir"
            )
        by_qid[item.qid] = item
    return tuple(sorted(by_qid.values(), key=lambda i: (i.index is None, i.index or 0, i.qid)))


# --------------------------------------------------------------------------------------------- facts


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(data, Mapping):
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
    elif isinstance(data, list) and data and all(isinstance(v, Mapping) for v in data):
        for i, value in enumerate(data):
            out.update(_flatten(value, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = data
    return out


def _find(flat: Mapping[str, Any], *words: str) -> Any:
    """The first flattened value whose key has every word (a provenance field, whatever its exact name)."""
    for key, value in flat.items():
        low = key.lower()
        if all(w in low for w in words) and value not in (None, "", []):
            return value
    return None


def _option(argv: Any, *names: str) -> str | None:
    if not isinstance(argv, list):
        return None
    for i, tok in enumerate(argv):
        if not isinstance(tok, str):
            continue
        for name in names:
            if tok == name and i + 1 < len(argv):
                return str(argv[i + 1])
            if tok.startswith(name + "="):
                return tok.split("=", 1)[1]
    return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or None
    return str(value)


def determinism_status(summary: Mapping[str, Any]) -> str:
    """``pass`` / ``fail`` / ``error`` / ``not run`` for the run's determinism check."""
    det = summary.get("determinism")
    if not isinstance(det, Mapping):
        return "not run"
    status = det.get("status")
    if isinstance(status, str) and status:
        return status.lower()
    return "pass" if det.get("passed") else "fail"


def run_facts(summary: Mapping[str, Any]) -> dict[str, str | None]:
    """What a run ran on and with, as display strings, in a fixed order (``None``: not recorded).

    Keys: GPU, vendor, arch, GPUs, driver, CUDA, ROCm, torch, SGLang installed, SGLang rules, attention
    backend, deterministic, KV cache, tp, model, dataset, parser, gate, determinism check, mlaprop, host.
    """
    prov = _flatten(summary.get("provenance") or {})
    env = summary.get("environment") if isinstance(summary.get("environment"), Mapping) else {}
    plan = summary.get("plan") if isinstance(summary.get("plan"), Mapping) else {}
    assert isinstance(env, Mapping) and isinstance(plan, Mapping)
    argv = plan.get("argv")
    server_args = plan.get("server_args") if isinstance(plan.get("server_args"), Mapping) else {}
    assert isinstance(server_args, Mapping)
    tp = server_args.get("tp_size") or _option(argv, "--tp-size", "--tp", "--tensor-parallel-size")
    if tp is None and isinstance(argv, list):
        tp = 1  # a plan without the flag: SGLang's default (no plan: not recorded)
    kv = server_args.get("kv_cache_dtype") or _option(argv, "--kv-cache-dtype")
    gpu = _find(prov, "gpu", "name") or _find(prov, "gpu", "model") or _find(prov, "gpu")
    if isinstance(gpu, Mapping):
        gpu = None
    sha = lookup(summary, "dataset", "sha256")
    return {
        "GPU": _text(gpu),
        "vendor": _text(env.get("vendor")),
        "arch": _text(env.get("arch")),
        "GPUs": _text(env.get("gpu_count")),
        "driver": _text(_find(prov, "driver")),
        "CUDA": _text(_find(prov, "cuda") or env.get("cuda_version")),
        "ROCm": _text(_find(prov, "rocm") or _find(prov, "hip")),
        "torch": _text(_find(prov, "torch")),
        # exact key first: the fuzzy match would take sglang_rules when SGLang is not installed
        "SGLang installed": _text(
            prov["sglang_installed"] if "sglang_installed" in prov else _find(prov, "sglang")
        ),
        "SGLang rules": _text(plan.get("sglang_version") or env.get("sglang_version")),
        "attention backend": _text(plan.get("resolved_attention_backend") or plan.get("attention_backend")),
        "deterministic": _text(plan.get("deterministic")),
        "KV cache": _text(kv),
        "tp": _text(tp),
        "model": _text(plan.get("model") or lookup(summary, "mgsm", "model")),
        "dataset": None
        if sha is None
        else f"{lookup(summary, 'dataset', 'lang') or '?'} sha256:{str(sha)[:12]}",
        "parser": gating_parser(summary),
        "gate": _text(lookup(summary, "mgsm", "gate") or summary.get("gate")),
        "determinism check": determinism_status(summary),
        "mlaprop": _text(summary.get("mlaprop_version")),
        "host": _text(_find(prov, "host")),
    }


def sglang_version(summary: Mapping[str, Any]) -> str:
    """The installed SGLang version when recorded, else the version whose rules were applied, else ``?``."""
    facts = run_facts(summary)
    return facts["SGLang installed"] or facts["SGLang rules"] or "?"


def platform_label(summary: Mapping[str, Any]) -> str:
    """``NVIDIA H200 (nvidia sm90) x1`` or ``nvidia sm90 x1``: the platform a run ran on."""
    facts = run_facts(summary)
    base = " ".join(v for v in (facts["vendor"], facts["arch"]) if v) or "unknown platform"
    label = f"{facts['GPU']} ({base})" if facts["GPU"] else base
    return f"{label} x{facts['GPUs'] or '?'}"


# --------------------------------------------------------------------------------------------- scores


@dataclass(frozen=True)
class RunScore:
    """A run's gating score and the drop a second run of its size could detect.

    Attributes:
        correct: right answers.
        n: answered questions.
        score: ``correct / n``.
        ci95: Wilson 95% interval.
        mdd: minimum detectable drop (two-sided ``alpha``, ``power``), ``None`` when no drop is detectable.
    """

    correct: int
    n: int
    score: float
    ci95: tuple[float, float]
    mdd: float | None


def run_score(run: RunRecord, alpha: float = DEFAULT_ALPHA, power: float = DEFAULT_POWER) -> RunScore | None:
    """The gating score of ``run`` from its items (or its summary when it has no items); ``None`` when no
    question was answered."""
    marks = [i.correct for i in run.items if i.correct is not None]
    if marks:
        correct, n = sum(marks), len(marks)
    else:
        scored = lookup(run.summary, "mgsm", "scores", gating_parser(run.summary))
        if not isinstance(scored, Mapping) or not scored.get("n"):
            return None
        correct, n = int(scored["correct"]), int(scored["n"])
    p = correct / n
    return RunScore(correct, n, p, wilson_interval(correct, n), minimum_detectable_drop(p, n, alpha, power))


def describe_score(s: RunScore | None) -> str:
    """``0.852 (213/250, 95% CI 0.803-0.891; MDD 0.100)`` or ``-``."""
    if s is None:
        return "-"
    mdd = "none detectable" if s.mdd is None else f"{s.mdd:.3f}"
    return f"{s.score:.3f} ({s.correct}/{s.n}, 95% CI {s.ci95[0]:.3f}-{s.ci95[1]:.3f}; MDD {mdd})"


# --------------------------------------------------------------------------------------------- compare


@dataclass(frozen=True)
class Flip:
    """A question right in one run and wrong in the other.

    Attributes:
        qid, index, target, question: the question.
        a, b: the answer each run gave (by the parser compared).
        right_in: ``"A"`` or ``"B"``.
    """

    qid: str
    index: int | None
    target: str | None
    question: str | None
    a: str | None
    b: str | None
    right_in: str


@dataclass(frozen=True)
class Difference:
    """A fact that differs between the runs (``None``: not recorded in that run)."""

    field: str
    a: str | None
    b: str | None


@dataclass(frozen=True)
class Comparison:
    """Two runs on the same questions.

    Attributes:
        a, b: the runs' names.
        parser: the parser whose marks are compared.
        counts: the paired 2x2 table over questions answered in both runs.
        score_a, score_b: each run's score on the paired questions.
        difference: ``score_b - score_a``; ``None`` when no question is paired.
        interval: 95% interval of ``difference`` (Newcombe, paired); ``None`` when no question is paired.
        p_value: exact McNemar p-value (two-sided).
        flips: the questions that flipped, in question order.
        only_in_a, only_in_b: questions answered in one run only (errors, missing, another --limit).
        differences: plan, platform and provenance facts that differ.
        determinism: each run's determinism check status.
        warnings: reasons the pairing may not mean what it seems (different datasets, parsers).
        alpha: significance level for ``significant``.
        mdd_a, mdd_b: each run's minimum detectable drop at its own n.
    """

    a: str
    b: str
    parser: str
    counts: PairedCounts
    score_a: float | None
    score_b: float | None
    difference: float | None
    interval: tuple[float, float] | None
    p_value: float
    flips: tuple[Flip, ...]
    only_in_a: tuple[str, ...]
    only_in_b: tuple[str, ...]
    differences: tuple[Difference, ...]
    determinism: tuple[str, str]
    warnings: tuple[str, ...]
    alpha: float
    mdd_a: float | None
    mdd_b: float | None

    @property
    def significant(self) -> bool:
        """The McNemar p-value is below ``alpha``."""
        return self.p_value < self.alpha

    @property
    def b_worse(self) -> bool:
        """B scores significantly lower than A on the paired questions."""
        return self.significant and self.difference is not None and self.difference < 0

    def verdict(self) -> str:
        """One line: whether the runs differ, by how much, and how sure."""
        if self.difference is None or self.interval is None:
            return "no question was answered in both runs: nothing to compare"
        lo, hi = self.interval
        size = (
            f"B - A = {self.difference:+.3f} (95% CI {lo:+.3f} to {hi:+.3f}), "
            f"{self.counts.discordant} of {self.counts.n} questions flipped "
            f"({self.counts.only_a} lost, {self.counts.only_b} gained), exact McNemar p = {self.p_value:.4g}"
        )
        if not self.significant:
            return f"no significant difference at alpha {self.alpha:g}: {size}"
        return f"B is {'lower' if self.difference < 0 else 'higher'} than A at alpha {self.alpha:g}: {size}"


#: Facts not worth listing as a difference (they always differ).
_VOLATILE = ("started_at", "finished_at", "time", "duration", "wall", "pid", "elapsed", "report", "log")


def _provenance_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[Difference]:
    fa, fb = _flatten(a.get("provenance") or {}), _flatten(b.get("provenance") or {})
    out = []
    for key in sorted(set(fa) | set(fb)):
        if any(v in key.lower() for v in _VOLATILE):
            continue
        va, vb = _text(fa.get(key)), _text(fb.get(key))
        if va != vb:
            out.append(Difference(f"provenance.{key}", va, vb))
    return out


def compare_runs(
    a: RunRecord,
    b: RunRecord,
    *,
    parser: str | None = None,
    alpha: float = DEFAULT_ALPHA,
    power: float = DEFAULT_POWER,
) -> Comparison:
    """Pair ``a`` and ``b`` on the questions both answered and compare them.

    Args:
        parser: the parser the items were marked by (:func:`parse_items` was given it for both runs);
            ``None``: A's gating parser. Only reported.
        alpha: significance level of :attr:`Comparison.significant`.
        power: power of the minimum detectable drop.
    """
    items_a = {i.qid: i for i in a.items}
    items_b = {i.qid: i for i in b.items}
    answered_a = {q for q, i in items_a.items() if i.correct is not None}
    answered_b = {q for q, i in items_b.items() if i.correct is not None}
    paired = [i for i in a.items if i.qid in answered_a & answered_b]
    both = only_a = only_b = neither = 0
    flips: list[Flip] = []
    for ia in paired:
        ib = items_b[ia.qid]
        if ia.correct and ib.correct:
            both += 1
        elif not ia.correct and not ib.correct:
            neither += 1
        else:
            if ia.correct:
                only_a += 1
            else:
                only_b += 1
            flips.append(
                Flip(
                    qid=ia.qid,
                    index=ia.index if ia.index is not None else ib.index,
                    target=ia.target if ia.target is not None else ib.target,
                    question=ia.question or ib.question,
                    a=ia.extracted,
                    b=ib.extracted,
                    right_in="A" if ia.correct else "B",
                )
            )
    counts = PairedCounts(both, only_a, only_b, neither)
    n = counts.n
    facts_a, facts_b = run_facts(a.summary), run_facts(b.summary)
    differences = [Difference(k, facts_a[k], facts_b[k]) for k in facts_a if facts_a[k] != facts_b[k]]
    argv_a, argv_b = lookup(a.summary, "plan", "argv"), lookup(b.summary, "plan", "argv")
    if isinstance(argv_a, list) and isinstance(argv_b, list) and argv_a != argv_b:
        differences.append(
            Difference("server arguments", " ".join(map(str, argv_a)), " ".join(map(str, argv_b)))
        )
    differences += _provenance_differences(a.summary, b.summary)
    warnings: list[str] = []
    for label, r in (("A", a), ("B", b)):
        status = r.summary.get("status")
        if status in ("running", "interrupted", "aborted", "server-failed", "error"):
            warnings.append(
                f"run {label} did not finish (status {status}"
                + (": still running, or its process was killed" if status == "running" else "")
                + "): only the questions it answered are paired"
            )
    same = [(lookup(r.summary, "report", "summary"), r.summary.get("started_at")) for r in (a, b)]
    if None not in same[0] and same[0] == same[1]:
        warnings.append(
            f"A and B are the same run (report {same[0][0]}, started {same[0][1]}), or copies of it: "
            "nothing was compared with another run"
        )
    sha_a, sha_b = lookup(a.summary, "dataset", "sha256"), lookup(b.summary, "dataset", "sha256")
    if sha_a and sha_b and sha_a != sha_b:
        warnings.append(
            "the runs used different dataset files: questions are paired by id, which may not be the same "
            "question"
        )
    texts = [
        (items_a[q].question, items_b[q].question)
        for q in answered_a & answered_b
        if items_a[q].question and items_b[q].question
    ]
    mismatched = sum(1 for x, y in texts if x != y)
    if mismatched:
        warnings.append(f"{mismatched} paired question id(s) have different question text in the two runs")
    if gating_parser(a.summary) != gating_parser(b.summary):
        warnings.append(
            f"the runs gate by different parsers ({gating_parser(a.summary)} and {gating_parser(b.summary)}); "
            "both are compared by one parser"
        )
    sa, sb = run_score(a, alpha, power), run_score(b, alpha, power)
    return Comparison(
        a=a.name,
        b=b.name,
        parser=parser or gating_parser(a.summary),
        counts=counts,
        score_a=(both + only_a) / n if n else None,
        score_b=(both + only_b) / n if n else None,
        difference=counts.difference if n else None,
        interval=paired_difference_interval(counts) if n else None,
        p_value=mcnemar_exact_p(only_a, only_b),
        flips=tuple(flips),
        only_in_a=tuple(sorted(answered_a - answered_b)),
        only_in_b=tuple(sorted(answered_b - answered_a)),
        differences=tuple(differences),
        determinism=(determinism_status(a.summary), determinism_status(b.summary)),
        warnings=tuple(warnings),
        alpha=alpha,
        mdd_a=None if sa is None else sa.mdd,
        mdd_b=None if sb is None else sb.mdd,
    )


def _show(v: str | None) -> str:
    return "-" if v is None else v


def format_comparison(c: Comparison, max_flips: int = 50) -> str:
    """The comparison as text for a terminal or a CI log: verdict first, then scores, flips and differences."""
    lines = [f"A: {c.a}", f"B: {c.b}", c.verdict()]
    if c.score_a is not None and c.score_b is not None:
        n = c.counts.n
        mdd = ", ".join(
            f"{name} {'none detectable' if m is None else f'{m:.3f}'}"
            for name, m in (("A", c.mdd_a), ("B", c.mdd_b))
        )
        lines.append(
            f"paired questions: {n} (parser {c.parser}); A {c.score_a:.3f}, B {c.score_b:.3f}; "
            f"both right {c.counts.both}, both wrong {c.counts.neither}"
        )
        lines.append(
            f"minimum detectable drop between independent runs of each size (two-sided alpha "
            f"{DEFAULT_ALPHA:g}, power {DEFAULT_POWER:g}): {mdd}"
        )
    if c.only_in_a or c.only_in_b:
        lines.append(
            f"not paired: {len(c.only_in_a)} answered in A only, {len(c.only_in_b)} in B only "
            "(errors, missing answers or another --limit)"
        )
    lines.append(f"determinism check: A {c.determinism[0]}, B {c.determinism[1]}")
    for w in c.warnings:
        lines.append(f"warning: {w}")
    if c.flips:
        lines.append(f"flipped questions ({len(c.flips)}):")
        for f in c.flips[:max_flips]:
            q = f" {f.question[:80]!r}" if f.question else ""
            lines.append(
                f"  {f.qid}: right in {f.right_in}; target {_show(f.target)}, A {_show(f.a)}, B {_show(f.b)}{q}"
            )
        if len(c.flips) > max_flips:
            lines.append(f"  ... and {len(c.flips) - max_flips} more (--json lists all)")
    if c.differences:
        lines.append("differences (A -> B):")
        lines += [f"  {d.field}: {_show(d.a)} -> {_show(d.b)}" for d in c.differences]
    else:
        lines.append("no plan, platform or provenance difference recorded")
    return "\n".join(lines)


def comparison_json(c: Comparison) -> dict[str, Any]:
    """The comparison as a JSON-ready dict (every flip, every difference)."""
    return {
        "a": c.a,
        "b": c.b,
        "parser": c.parser,
        "paired": c.counts.n,
        "counts": {
            "both_right": c.counts.both,
            "only_a_right": c.counts.only_a,
            "only_b_right": c.counts.only_b,
            "both_wrong": c.counts.neither,
        },
        "score_a": c.score_a,
        "score_b": c.score_b,
        "difference": c.difference,
        "difference_ci95": None if c.interval is None else list(c.interval),
        "mcnemar_exact_p": c.p_value,
        "alpha": c.alpha,
        "significant": c.significant,
        "b_worse": c.b_worse,
        "minimum_detectable_drop": {
            "a": c.mdd_a,
            "b": c.mdd_b,
            "alpha": DEFAULT_ALPHA,
            "power": DEFAULT_POWER,
        },
        "verdict": c.verdict(),
        "flips": [
            {
                "qid": f.qid,
                "index": f.index,
                "target": f.target,
                "question": f.question,
                "a": f.a,
                "b": f.b,
                "right_in": f.right_in,
            }
            for f in c.flips
        ],
        "only_in_a": list(c.only_in_a),
        "only_in_b": list(c.only_in_b),
        "determinism": {"a": c.determinism[0], "b": c.determinism[1]},
        "differences": [{"field": d.field, "a": d.a, "b": d.b} for d in c.differences],
        "warnings": list(c.warnings),
    }


# --------------------------------------------------------------------------------------------- table


@dataclass(frozen=True)
class TableCell:
    """One run in the platform x version table.

    Attributes:
        platform: row label (:func:`platform_label`).
        version: column label (:func:`sglang_version`).
        run: the run's name.
        score: the gating score, ``None`` when nothing was answered.
        backend: attention backend.
        deterministic: ``yes`` / ``no`` / ``None``.
        determinism: the determinism check status.
        status: the run's status (``pass``, ``fail``, ``error`` ...).
    """

    platform: str
    version: str
    run: str
    score: RunScore | None
    backend: str | None
    deterministic: str | None
    determinism: str
    status: str


def _version_key(v: str) -> tuple[int, tuple[Any, ...]]:
    try:
        from packaging.version import Version

        return (0, (Version(v),))
    except Exception:
        return (1, (v,))


def table_cells(
    runs: Sequence[RunRecord], alpha: float = DEFAULT_ALPHA, power: float = DEFAULT_POWER
) -> tuple[TableCell, ...]:
    """One cell per run, sorted by platform, then version, then run name."""
    cells = []
    for run in runs:
        facts = run_facts(run.summary)
        cells.append(
            TableCell(
                platform=platform_label(run.summary),
                version=sglang_version(run.summary),
                run=run.name,
                score=run_score(run, alpha, power),
                backend=facts["attention backend"],
                deterministic=facts["deterministic"],
                determinism=facts["determinism check"] or "not run",
                status=str(run.summary.get("status") or "?"),
            )
        )
    return tuple(sorted(cells, key=lambda c: (c.platform, _version_key(c.version), c.run)))


def _cell_text(c: TableCell) -> tuple[str, str]:
    """(score line, detail line) for one run."""
    if c.score is None:
        head = f"{c.status}: no answer"
    else:
        s = c.score
        mdd = "-" if s.mdd is None else f"{s.mdd:.3f}"
        head = f"{s.score:.3f} [{s.ci95[0]:.3f}, {s.ci95[1]:.3f}] n={s.n} MDD {mdd}"
    det = {"yes": "det", "no": "non-det"}.get(c.deterministic or "", "det ?")
    detail = f"{c.status}; {c.backend or '?'}, {det}, determinism {c.determinism}"
    return head, detail


def _grid(cells: Sequence[TableCell]) -> tuple[list[str], list[str], dict[tuple[str, str], list[TableCell]]]:
    platforms = list(dict.fromkeys(c.platform for c in cells))
    versions = sorted(dict.fromkeys(c.version for c in cells), key=_version_key)
    grid: dict[tuple[str, str], list[TableCell]] = {}
    for c in cells:
        grid.setdefault((c.platform, c.version), []).append(c)
    return platforms, versions, grid


def _legend(alpha: float, power: float) -> str:
    return (
        "Score: the gating parser's MGSM score [95% Wilson interval], n answered questions. MDD: the minimum "
        f"detectable drop, the smallest drop a second independent run of the same n detects with power {power:g} "
        f"at two-sided alpha {alpha:g} (Cohen's arcsine effect size); `mlaprop compare` pairs two runs on the "
        "same questions and detects less."
    )


def table_markdown(
    cells: Sequence[TableCell], alpha: float = DEFAULT_ALPHA, power: float = DEFAULT_POWER
) -> str:
    """A Markdown table: one row per platform, one column per SGLang version, each run in its cell."""
    platforms, versions, grid = _grid(cells)

    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| platform | " + " | ".join(f"SGLang {esc(v)}" for v in versions) + " |"]
    lines.append("|---" * (len(versions) + 1) + "|")
    for p in platforms:
        row = []
        for v in versions:
            runs = grid.get((p, v), [])
            row.append("<br>".join(f"**{esc(h)}**<br>{esc(d)}" for h, d in map(_cell_text, runs)) or "-")
        lines.append(f"| {esc(p)} | " + " | ".join(row) + " |")
    lines += ["", _legend(alpha, power), ""]
    lines.append(
        "Runs: " + "; ".join(f"{esc(c.platform)} / SGLang {esc(c.version)}: `{esc(c.run)}`" for c in cells)
    )
    return "\n".join(lines) + "\n"


def table_html(cells: Sequence[TableCell], alpha: float = DEFAULT_ALPHA, power: float = DEFAULT_POWER) -> str:
    """The same table as a standalone HTML page (every value escaped)."""
    platforms, versions, grid = _grid(cells)
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>mlaprop runs</title>',
        "<style>table{border-collapse:collapse}td,th{border:1px solid #999;padding:4px 8px;"
        "vertical-align:top}td small{color:#555}</style></head><body>",
        "<table>",
        "<tr><th>platform</th>" + "".join(f"<th>SGLang {e(v)}</th>" for v in versions) + "</tr>",
    ]
    for p in platforms:
        tds = []
        for v in versions:
            runs = grid.get((p, v), [])
            parts = [
                f'<div title="{e(c.run)}"><b>{e(h)}</b><br><small>{e(d)}</small></div>'
                for c, (h, d) in zip(runs, map(_cell_text, runs), strict=True)
            ]
            tds.append("<td>" + ("".join(parts) or "-") + "</td>")
        out.append(f"<tr><th>{e(p)}</th>" + "".join(tds) + "</tr>")
    out += ["</table>", f"<p>{e(_legend(alpha, power))}</p>", "</body></html>"]
    return "\n".join(out) + "\n"
