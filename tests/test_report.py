"""Tests for `mlaprop.report`: incremental JSONL, atomic redacted summary, summary contents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlaprop.determinism import DeterminismResult, PromptOutcome, Variant
from mlaprop.evalclient import EvalResult, ItemRecord
from mlaprop.mgsm import Parser
from mlaprop.report import (
    ReportWriter,
    determinism_summary,
    item_json,
    mgsm_summary,
    plan_summary,
    redact_file,
    redact_tree,
    score_json,
)
from mlaprop.stats import score


def _rec(i: int, *, se: bool, rb: bool, error: str | None = None, tokens: int = 10) -> ItemRecord:
    return ItemRecord(
        qid=f"mgsm_en_{i:03d}",
        index=i,
        target="18",
        response=None if error else "Answer: 18",
        extracted_simple_evals="18" if se else "",
        extracted_robust="18" if rb else "",
        correct_simple_evals=se,
        correct_robust=rb,
        error=error,
        latency_s=None if error else 0.1 * (i + 1),
        completion_tokens=None if error else tokens,
        finish_reason=None if error else ("length" if i == 0 else "stop"),
        attempts=1,
    )


def _result() -> EvalResult:
    records = (
        _rec(0, se=True, rb=True),
        _rec(1, se=False, rb=True),
        _rec(2, se=True, rb=True),
        _rec(3, se=False, rb=False, error="HTTP 500: Authorization: Bearer sk-abcdefgh12345"),
    )
    return EvalResult("en", 5, records, wall_s=2.0, model="m")


class TestWriter:
    """Tests for `ReportWriter`."""

    def test_items_are_on_disk_as_written(self, tmp_path: Path) -> None:
        """Each record is a flushed JSON line before the writer is closed."""
        with ReportWriter(tmp_path / "r", Parser.ROBUST) as w:
            w.record(_rec(1, se=False, rb=True))
            lines = (tmp_path / "r" / "items.jsonl").read_text().splitlines()
            assert len(lines) == 1
            row = json.loads(lines[0])
            assert row["qid"] == "mgsm_en_001"
            assert (row["extracted"], row["correct"]) == ("18", True)  # the robust parser gates
            assert row["correct_by"] == {"simple-evals": False, "robust": True}
            assert row["extracted_by"] == {"simple-evals": "", "robust": "18"}
            w.record(_rec(3, se=False, rb=False, error="HTTP 503: api_key=topsecret"))
            assert w.items_written == 2
        row = json.loads((tmp_path / "r" / "items.jsonl").read_text().splitlines()[1])
        assert (row["correct"], row["extracted"], row["response"]) == (None, None, None)
        assert row["error"] == "HTTP 503: api_key=***"

    def test_closed_writer_refuses(self, tmp_path: Path) -> None:
        """Writing after close is an error, not a silent loss."""
        w = ReportWriter(tmp_path)
        w.close()
        with pytest.raises(ValueError, match="closed"):
            w.record(_rec(0, se=True, rb=True))

    def test_summary_is_atomic_and_redacted(self, tmp_path: Path) -> None:
        """The summary replaces the old one whole, with secrets masked, and no temp file left behind."""
        w = ReportWriter(tmp_path)
        w.write_summary({"status": "running"})
        path = w.write_summary(
            {"status": "pass", "note": "HF_TOKEN=hf_abcdefghijklmnop", "n": [1, 2.5, None]}
        )
        w.close()
        assert json.loads(path.read_text()) == {"status": "pass", "note": "HF_TOKEN=***", "n": [1, 2.5, None]}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["items.jsonl", "summary.json"]

    def test_redact_tree(self) -> None:
        """Nested strings are redacted; keys and numbers are kept."""
        assert redact_tree({"a": ["--api-key=abc", {"b": 1}], "c": True}) == {
            "a": ["--api-key=***", {"b": 1}],
            "c": True,
        }

    def test_redact_file(self, tmp_path: Path) -> None:
        """A log is rewritten line by line with secrets masked; a missing file is reported, not created."""
        log = tmp_path / "server.log"
        log.write_text("start\nServerArgs(api_key='abc123', port=1)\nready\n")
        assert redact_file(log) is True
        assert log.read_text() == "start\nServerArgs(api_key='***', port=1)\nready\n"
        assert redact_file(tmp_path / "none.log") is False
        assert sorted(p.name for p in tmp_path.iterdir()) == ["server.log"]

    def test_plan_argv(self) -> None:
        """Plan arguments hide the value after ``--api-key``."""
        assert plan_summary({"argv": ["--api-key", "s3cret", "--tp-size", "2"]})["argv"] == [
            "--api-key",
            "***",
            "--tp-size",
            "2",
        ]


class TestSummaries:
    """Tests for the summary builders."""

    def test_mgsm(self) -> None:
        """Counts, both parsers, disagreements, latency, throughput, truncation."""
        m = mgsm_summary(_result(), Parser.SIMPLE_EVALS, 0.8)
        assert (m["n_total"], m["answered"], m["errors"], m["missing"]) == (5, 3, 1, 1)
        assert m["scores"]["simple-evals"]["correct"] == 2
        assert m["scores"]["simple-evals"]["n"] == 3
        assert m["scores"]["robust"]["score"] == 1.0
        assert m["score_errors_as_wrong"] == pytest.approx(2 / 5)
        assert m["verdict"] == "inconclusive"  # 2/5 fails, but (2 + 2 unanswered)/5 would meet 0.8
        assert m["disagreements"] == [
            {"qid": "mgsm_en_001", "target": "18", "simple-evals": "", "robust": "18", "right_by": "robust"}
        ]
        assert m["first_errors"] == [
            {"qid": "mgsm_en_003", "error": "HTTP 500: Authorization: Bearer sk-abcdefgh12345"}
        ]
        assert m["latency_s"] == {
            "p50": pytest.approx(0.2),
            "p95": pytest.approx(0.29),
            "max": pytest.approx(0.3),
        }
        assert (m["completion_tokens"], m["output_tokens_per_s"]) == (30, 15.0)
        assert m["truncated_at_max_tokens"] == 1
        assert m["gating_parser"] == "simple-evals"

    def test_score_json(self) -> None:
        """A score carries its interval, margin and text."""
        j = score_json(score(196, 250))
        assert j is not None
        assert (j["correct"], j["n"], j["questions_to_gate"], j["meets_gate"], j["gate_in_ci95"]) == (
            196,
            250,
            -4,
            False,
            True,
        )
        assert j["ci95"] == [pytest.approx(0.7289, abs=1e-4), pytest.approx(0.8305, abs=1e-4)]
        assert score_json(None) is None

    def test_determinism(self) -> None:
        """Distinct outputs per prompt, with the batch sizes that gave each."""
        outcome = PromptOutcome(
            "single", 31, 3, (Variant("a", None, 2, (1, 2), ""), Variant("b", None, 1, (4,), ""))
        )
        result = DeterminismResult(
            passed=False,
            outcomes=(outcome,),
            errors=(),
            reason="fail: ...",
            requests=3,
            compared_output_ids=False,
            batch_sizes=(1, 2, 4),
            prefix_lengths=(),
            seed=42,
            max_new_tokens=100,
            wall_s=1.0,
        )
        d = determinism_summary(result)
        assert d["passed"] is False
        assert d["prompts"] == [
            {
                "label": "single",
                "prompt_chars": 31,
                "samples": 3,
                "distinct": 2,
                "variants": [
                    {"count": 2, "batch_sizes": [1, 2], "text": "a"},
                    {"count": 1, "batch_sizes": [4], "text": "b"},
                ],
            }
        ]

    def test_item_json_of_error(self) -> None:
        """A failed item has no extraction and no correctness, only its error."""
        row = item_json(_rec(3, se=False, rb=False, error="boom"), Parser.SIMPLE_EVALS)
        assert (row["extracted"], row["correct"], row["error"]) == (None, None, "boom")
