"""Reports: a JSON summary and per-item JSONL, written so partial results are never lost.

:class:`ReportWriter` appends each MGSM item to ``items.jsonl`` (flushed) as it finishes and writes
``summary.json`` atomically (temp file + rename), so a crash or an abort leaves a readable report.
Every string in the summary goes through :func:`mlaprop.redact.redact`; plan arguments through
:func:`mlaprop.redact.redact_argv`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from mlaprop.determinism import DeterminismResult
from mlaprop.evalclient import EvalResult, ItemRecord, percentile
from mlaprop.mgsm import MgsmDataset, Parser
from mlaprop.redact import redact, redact_argv
from mlaprop.stats import DEFAULT_GATE, Score

__all__ = [
    "ITEMS_FILE",
    "SUMMARY_FILE",
    "ReportWriter",
    "dataset_summary",
    "determinism_summary",
    "item_json",
    "mgsm_summary",
    "redact_file",
    "redact_tree",
    "score_json",
]

SUMMARY_FILE = "summary.json"
ITEMS_FILE = "items.jsonl"


def redact_tree(value: Any) -> Any:
    """``value`` (JSON-like: dicts, lists, strings, numbers) with every string passed through ``redact``."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {str(k): redact_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_tree(v) for v in value]
    return value


def item_json(record: ItemRecord, parser: Parser) -> dict[str, Any]:
    """One JSONL line's content: ids, target, response, both extractions, correctness (by ``parser``)."""
    return {
        "qid": record.qid,
        "index": record.index,
        "target": record.target,
        "response": record.response,
        "extracted": record.extracted(parser) if record.error is None else None,
        "correct": record.correct(parser) if record.error is None else None,
        "extracted_by": {
            Parser.SIMPLE_EVALS.value: record.extracted_simple_evals,
            Parser.ROBUST.value: record.extracted_robust,
        },
        "correct_by": {
            Parser.SIMPLE_EVALS.value: record.correct_simple_evals,
            Parser.ROBUST.value: record.correct_robust,
        },
        "error": None if record.error is None else redact(record.error),
        "latency_s": record.latency_s,
        "completion_tokens": record.completion_tokens,
        "finish_reason": record.finish_reason,
        "attempts": record.attempts,
    }


def score_json(score: Score | None) -> dict[str, Any] | None:
    """A :class:`~mlaprop.stats.Score` as JSON (``None`` stays ``None``)."""
    if score is None:
        return None
    return {
        "correct": score.correct,
        "n": score.n,
        "score": score.score,
        "stderr": score.stderr,
        "ci95": [score.ci_low, score.ci_high],
        "gate": score.gate,
        "margin": score.margin,
        "questions_to_gate": score.questions_to_gate,
        "meets_gate": score.meets_gate,
        "gate_in_ci95": score.gate_in_interval,
        "text": score.describe(),
    }


def dataset_summary(dataset: MgsmDataset) -> dict[str, Any]:
    """Where the questions came from, and whether they are the published file."""
    return {
        "lang": dataset.lang,
        "path": dataset.path,
        "sha256": dataset.sha256,
        "canonical": dataset.canonical,
        "rows": len(dataset),
    }


def mgsm_summary(result: EvalResult, parser: Parser, gate: float = DEFAULT_GATE) -> dict[str, Any]:
    """The MGSM part of the summary: counts, both parsers' scores, disagreements, latency, throughput."""
    lat = result.latencies
    tps = result.output_tokens_per_s
    return {
        "n_total": result.n_total,
        "answered": result.answered,
        "errors": result.errors,
        "missing": result.missing,
        "gate": gate,
        "gating_parser": Parser(parser).value,
        "verdict": result.verdict(parser, gate).value,
        "aborted": result.aborted,
        "scores": {p.value: score_json(result.score(p, gate)) for p in Parser},
        "score_errors_as_wrong": (result.correct(parser) / result.n_total) if result.n_total else None,
        "disagreements": [
            {
                "qid": r.qid,
                "target": r.target,
                Parser.SIMPLE_EVALS.value: r.extracted_simple_evals,
                Parser.ROBUST.value: r.extracted_robust,
                "right_by": Parser.SIMPLE_EVALS.value if r.correct_simple_evals else Parser.ROBUST.value,
            }
            for r in result.disagreements
        ],
        "first_errors": [{"qid": r.qid, "error": r.error} for r in result.records if r.error is not None][
            :10
        ],
        "latency_s": {"p50": percentile(lat, 50), "p95": percentile(lat, 95), "max": max(lat, default=None)},
        "completion_tokens": result.completion_tokens,
        "output_tokens_per_s": tps,
        "truncated_at_max_tokens": sum(1 for r in result.records if r.finish_reason == "length"),
        "wall_s": result.wall_s,
        "model": result.model,
    }


def determinism_summary(result: DeterminismResult) -> dict[str, Any]:
    """The determinism part of the summary: verdict, and distinct outputs per prompt."""
    return {
        "passed": result.passed,
        "reason": result.reason,
        "requests": result.requests,
        "compared_output_ids": result.compared_output_ids,
        "batch_sizes": list(result.batch_sizes),
        "prefix_lengths": list(result.prefix_lengths),
        "seed": result.seed,
        "max_new_tokens": result.max_new_tokens,
        "wall_s": result.wall_s,
        "errors": list(result.errors[:20]),
        "prompts": [
            {
                "label": o.label,
                "prompt_chars": o.prompt_chars,
                "samples": o.samples,
                "distinct": o.distinct,
                "variants": [
                    {"count": v.count, "batch_sizes": list(v.batch_sizes), "text": v.text}
                    for v in o.variants[:5]
                ],
            }
            for o in result.outcomes
        ],
    }


def plan_summary(plan_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A plan's JSON view (``mlaprop.cli.plan_to_dict``) with secret arguments hidden."""
    out = dict(plan_dict)
    if "argv" in out:
        out["argv"] = redact_argv(out["argv"])
    return out


def redact_file(path: str | os.PathLike[str]) -> bool:
    """Rewrite a text file (a server log copied into the report) with :func:`mlaprop.redact.redact` applied
    to each line, atomically. Returns ``False`` when the file does not exist.

    Raises:
        OSError: the file cannot be read or replaced.
    """
    src = Path(path)
    if not src.is_file():
        return False
    fd, tmp = tempfile.mkstemp(prefix=f".{src.name}.", suffix=".part", dir=src.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out, src.open(encoding="utf-8", errors="replace") as inp:
            for line in inp:
                out.write(redact(line))
        os.replace(tmp, src)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


class ReportWriter:
    """Writes ``items.jsonl`` as items finish and ``summary.json`` whenever asked, in ``directory``.

    ``items.jsonl`` is truncated when the writer is created and each line flushed as it is written.
    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, directory: str | os.PathLike[str], parser: Parser = Parser.SIMPLE_EVALS) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.parser = Parser(parser)
        self.items_path = self.directory / ITEMS_FILE
        self.summary_path = self.directory / SUMMARY_FILE
        self._items: TextIO | None = self.items_path.open("w", encoding="utf-8")
        self.items_written = 0

    def __enter__(self) -> ReportWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record(self, record: ItemRecord) -> None:
        """Append one item as a JSON line and flush it to the OS."""
        if self._items is None:
            raise ValueError("report writer is closed")
        self._items.write(json.dumps(item_json(record, self.parser), ensure_ascii=False) + "\n")
        self._items.flush()
        self.items_written += 1

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        """Write ``summary`` (redacted) to ``summary.json`` atomically; returns its path."""
        text = json.dumps(redact_tree(summary), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=".summary.", suffix=".json", dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, self.summary_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.summary_path

    def close(self) -> None:
        """Close ``items.jsonl``."""
        if self._items is not None:
            self._items.close()
            self._items = None
