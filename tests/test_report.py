"""Tests for `mlaprop.report`: incremental JSONL, atomic redacted summary, summary contents."""

from __future__ import annotations

import io
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

import mlaprop
from mlaprop.determinism import DeterminismResult, PromptOutcome, Variant
from mlaprop.evalclient import EvalResult, ItemRecord
from mlaprop.mgsm import Parser
from mlaprop.report import (
    SCHEMA_VERSION,
    Reporter,
    ReportFolderBusy,
    ReportWriter,
    Status,
    Summary,
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
                "max_logprob_diff": None,
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


# ------------------------------------------------------------------------------ typed report, console sink


def _schema() -> dict[str, Any]:
    path = Path(mlaprop.__file__).parent / "summary.schema.json"
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def schema_problems(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """The places ``value`` breaks ``schema`` (the JSON Schema subset the summary schema uses)."""
    problems: list[str] = []
    types = schema.get("type")
    if types is not None:
        allowed = {types} if isinstance(types, str) else set(types)
        actual = _json_type(value)
        if actual not in allowed and not (actual == "integer" and "number" in allowed):
            return [f"{where}: {actual} is not {sorted(allowed)}"]
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} not in enum")
    if "const" in schema and value != schema["const"]:
        problems.append(f"{where}: {value!r} != {schema['const']!r}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        problems += [f"{where}: {k} missing" for k in schema.get("required", []) if k not in value]
        for key, item in value.items():
            if key in props:
                problems += schema_problems(item, props[key], f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                problems.append(f"{where}.{key}: not documented in the schema")
            elif isinstance(schema.get("additionalProperties"), dict):
                problems += schema_problems(item, schema["additionalProperties"], f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            problems += schema_problems(item, schema["items"], f"{where}[{i}]")
    return problems


class TestSummarySchema:
    """``summary.json`` is documented field by field in ``mlaprop/summary.schema.json`` (shipped in the
    package); the typed :class:`Summary` and the schema agree."""

    def test_every_field_is_documented_with_a_description(self) -> None:
        """Each top-level property of the schema has a description, and the schema names every key of
        ``Summary.to_json()`` (a new field without documentation fails here)."""
        schema = _schema()
        props = schema["properties"]
        assert all(p.get("description") for p in props.values())
        summary = Summary(
            "run", "t", 0.8, "simple-evals", {"summary": "s", "items": "i"}, mlaprop_version="x"
        )
        assert schema_problems(summary.to_json(), schema) == []
        assert set(summary.to_json()) <= set(props)
        assert summary.to_json()["schema_version"] == SCHEMA_VERSION == props["schema_version"]["const"]

    def test_statuses_match_the_enum(self) -> None:
        """The schema's status enum is exactly :class:`Status`."""
        assert _schema()["properties"]["status"]["enum"] == [s.value for s in Status]

    def test_a_wrong_type_is_caught(self) -> None:
        """The checker used on real runs (tests/test_run.py) can fail."""
        summary = Summary("run", "t", 0.8, "simple-evals", {"summary": "s", "items": "i"}).to_json()
        summary["exit_code"] = "zero"
        summary["surprise"] = 1
        assert schema_problems(summary, _schema()) == [
            "$.exit_code: string is not ['integer', 'null']",
            "$.surprise: not documented in the schema",
        ]


class TestFiles:
    """Files the report writes."""

    def test_summary_mode_follows_the_umask(self, tmp_path: Path) -> None:
        """summary.json is 0644 under umask 022 (regression: mkstemp's 0600 hid it from CI artifact readers)."""
        old = os.umask(0o022)
        try:
            with ReportWriter(tmp_path) as w:
                w.write_summary({"status": "running"})
        finally:
            os.umask(old)
        assert stat.S_IMODE((tmp_path / "summary.json").stat().st_mode) == 0o644

    def test_second_writer_into_one_folder_is_refused(self, tmp_path: Path) -> None:
        """Two runs into one report folder: the second is refused and the first one's items stay intact
        (regression: interleaved items.jsonl)."""
        with ReportWriter(tmp_path) as first:
            first.record(_rec(0, se=True, rb=True))
            with pytest.raises(ReportFolderBusy, match="another mlaprop run is writing into"):
                ReportWriter(tmp_path)
            first.record(_rec(1, se=True, rb=True))
        lines = (tmp_path / "items.jsonl").read_text().splitlines()
        assert [json.loads(x)["index"] for x in lines] == [0, 1]
        ReportWriter(tmp_path).close()  # released when the first closed

    def test_items_rewritten_in_question_order_with_the_question(self, tmp_path: Path) -> None:
        """Items finish in any order; ``rewrite_items`` puts them in question order with the question."""
        with ReportWriter(tmp_path) as w:
            for i in (2, 0, 1):
                w.record(_rec(i, se=True, rb=True), f"q{i}")
            w.rewrite_items([(_rec(i, se=True, rb=True), f"q{i}") for i in (0, 1, 2)])
            w.record(_rec(3, se=True, rb=True), "q3")
        items = [json.loads(x) for x in (tmp_path / "items.jsonl").read_text().splitlines()]
        assert [(i["index"], i["question"]) for i in items] == [(0, "q0"), (1, "q1"), (2, "q2"), (3, "q3")]
        assert list(items[0])[:3] == ["qid", "index", "question"]


class _Ascii(io.StringIO):
    encoding = "ascii"

    def write(self, s: str) -> int:
        s.encode("ascii")  # what a real ascii stream does: UnicodeEncodeError
        return super().write(s)


class TestReporter:
    """The console: one redactor for every line, streams that cannot encode '±', heartbeats."""

    def test_every_line_passes_the_injected_redactor(self) -> None:
        """say, error and the server-log stream all go through the redactor given (a by-value one here)."""
        out, err = io.StringIO(), io.StringIO()
        reporter = Reporter(out, err, lambda s: s.replace("hunter2", "***"))
        reporter.say("key hunter2")
        reporter.error("err hunter2")
        stream = reporter.stream()
        stream.write("log hunter2 part")
        stream.write("ial\nnext hunter2\n")
        assert out.getvalue() == "key ***\n"
        assert err.getvalue() == "err ***\nlog *** partial\nnext ***\n"

    def test_ascii_console_does_not_crash_on_plus_minus(self) -> None:
        """PYTHONIOENCODING=ascii: '±' prints as '+/-' (regression: UnicodeEncodeError after a passing eval)."""
        out = _Ascii()
        Reporter(out, out).say("0.900 (225/250, ±0.019 s.e.) — done")
        assert out.getvalue() == "0.900 (225/250, +/-0.019 s.e.) ? done\n"

    def test_reader_gone_does_not_end_the_job(self) -> None:
        """Regression: ``mlaprop run ... | head -1`` ended the run with a BrokenPipeError (status error, exit
        1) at the second line; printing stops, the job (and the report) goes on."""
        r, w = os.pipe()
        os.close(r)
        out = os.fdopen(w, "w")
        try:
            reporter = Reporter(out, io.StringIO())
            reporter.say("plan: ...")
            reporter.say("verdict: PASS")  # no exception: the descriptor now points at /dev/null
        finally:
            out.close()

    def test_heartbeat_outside_a_terminal(self) -> None:
        """Not a terminal: one line per period naming the stage, the elapsed time and the progress."""
        out = io.StringIO()
        with Reporter(out, out).heartbeat("MGSM-en", 0.05, lambda: "3/10 questions answered"):
            time.sleep(0.18)
        lines = out.getvalue().splitlines()
        assert 2 <= len(lines) <= 4
        assert all(
            x.startswith("heartbeat: MGSM-en, ") and x.endswith(", 3/10 questions answered") for x in lines
        )

    def test_no_heartbeat_on_a_terminal_or_when_off(self) -> None:
        """A terminal has the progress bar; 0 turns heartbeats off."""

        class Tty(io.StringIO):
            def isatty(self) -> bool:
                return True

        for out, every in ((Tty(), 0.01), (io.StringIO(), 0.0)):
            with Reporter(out, out).heartbeat("x", every, lambda: ""):
                time.sleep(0.05)
            assert out.getvalue() == ""

    def test_step_summary_is_appended(self, tmp_path: Path) -> None:
        """With a step-summary path, finishing appends a Markdown table naming status, exit code and score."""
        path = tmp_path / "step.md"
        path.write_text("earlier step\n")
        summary = Summary("run", "t", 0.8, "simple-evals", {"summary": "s.json", "items": "i"})
        summary.status, summary.exit_code, summary.message = (
            Status.FAIL,
            1,
            "verdict: FAIL - token hf_abcdefghijkl",
        )
        Reporter(io.StringIO(), io.StringIO(), step_summary_path=path).step_summary(summary)
        text = path.read_text()
        assert text.startswith("earlier step\n### mlaprop: FAIL - no MGSM score")
        assert "| verdict | **fail** (exit code 1) |" in text
        assert "hf_abcdefghijkl" not in text and "| report | `s.json` |" in text
