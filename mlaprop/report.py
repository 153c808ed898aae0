"""Reports: the typed summary, the console, and the one redaction point in front of both.

- :class:`Summary` is ``summary.json``: typed, with :data:`SCHEMA_VERSION` (documented field by field in
  ``mlaprop/summary.schema.json``, shipped in the package).
- :class:`ReportWriter` appends each MGSM item to ``items.jsonl`` (flushed) as it finishes and writes
  ``summary.json`` with :func:`atomic_write` (temp file + rename), so a crash or an abort leaves a readable
  report.
- :class:`Reporter` is the console: every line printed, and the mirrored server log
  (:meth:`Reporter.stream`), passes through the same redactor.

The redactor (a ``str -> str`` callable, default :func:`mlaprop.redact.redact`; a by-value
``Redactor(secrets)`` when the secrets are known) is injected once and every byte written or printed by the
job goes through it: console lines, summary strings, item lines, the server log file.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import io
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

from mlaprop import cireport
from mlaprop.determinism import DeterminismResult
from mlaprop.evalclient import EvalResult, ItemRecord, percentile
from mlaprop.mgsm import MgsmDataset, Parser
from mlaprop.provenance import Provenance
from mlaprop.redact import Redactor as ValueRedactor
from mlaprop.redact import redact, redact_argv
from mlaprop.stats import DEFAULT_GATE, Score

__all__ = [
    "ITEMS_FILE",
    "SCHEMA_VERSION",
    "SUMMARY_FILE",
    "ErrorInfo",
    "RedactingStream",
    "Redactor",
    "ReportFolderBusy",
    "ReportWriter",
    "Reporter",
    "ServerInfo",
    "Status",
    "Summary",
    "atomic_write",
    "dataset_summary",
    "determinism_status",
    "determinism_summary",
    "item_json",
    "mgsm_summary",
    "redact_file",
    "redact_tree",
    "score_json",
    "step_summary_markdown",
    "with_secrets",
]

SUMMARY_FILE = "summary.json"
ITEMS_FILE = "items.jsonl"
#: Version of the ``summary.json`` layout; bumped when a field changes meaning or goes away (new fields
#: may be added within a version).
SCHEMA_VERSION = 1

#: A redactor: text in, the same text with every secret masked.
Redactor = Callable[[str], str]


def with_secrets(redactor: Redactor, secrets: Iterable[str | None]) -> Redactor:
    """``redactor`` that first masks each known secret value wherever it appears, in every encoding (bare,
    quoted, repr'd, JSON-escaped, URL-encoded: :class:`mlaprop.redact.Redactor`). Values shorter than 4
    characters are left to ``redactor`` (masking them would mangle ordinary text).
    """
    by_value = ValueRedactor(tuple(v for v in secrets if v))
    if not by_value.secrets:
        return redactor

    def masked(text: str) -> str:
        return redactor(by_value.mask_values(text))

    return masked


def redact_tree(value: Any, redactor: Redactor = redact) -> Any:
    """``value`` (JSON-like: dicts, lists, strings, numbers) with every string passed through ``redactor``."""
    if isinstance(value, str):
        return redactor(value)
    if isinstance(value, Mapping):
        return {str(k): redact_tree(v, redactor) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_tree(v, redactor) for v in value]
    return value


def atomic_write(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: a temp file in the same folder, then a rename, so a
    reader sees the old or the new file, never a part. The file gets the usual mode for new files (0666
    less the umask, e.g. 0644), not ``mkstemp``'s 0600.

    Raises:
        OSError: the folder cannot be written.
    """
    dest = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


class Status(str, enum.Enum):
    """``summary.json``'s ``status``: where the job is, or how it ended."""

    RUNNING = "running"
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"
    DETERMINISM_FAILED = "determinism-failed"
    DETERMINISM_ERROR = "determinism-error"
    ABORTED = "aborted"
    SERVER_FAILED = "server-failed"
    TEARDOWN_FAILED = "teardown-failed"
    ERROR = "error"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class ErrorInfo:
    """What ended the job early: the stage, the exception type, its message, and the server log tail."""

    stage: str
    type: str
    message: str
    log_tail: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"stage": self.stage, "type": self.type, "message": self.message}
        if self.log_tail:
            data["log_tail"] = list(self.log_tail)
        return data


@dataclass(frozen=True)
class ServerInfo:
    """The server evaluated: its URL, and for ``run`` the (redacted) command and the log file."""

    base_url: str
    command: str | None = None
    log: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"base_url": self.base_url}
        if self.command is not None:
            data.update(command=self.command, log=self.log)
        return data


@dataclass
class Summary:
    """``summary.json``, built as the job goes (each section is ``None`` until its stage ran).

    Field by field: ``mlaprop/summary.schema.json``. Mutable on purpose: the job fills it in and writes it
    after every stage.
    """

    command: str
    started_at: str
    gate: float
    gating_parser: str
    report: dict[str, str]
    status: Status = Status.RUNNING
    exit_code: int | None = None
    message: str | None = None
    dataset: dict[str, Any] | None = None
    environment: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None
    server: ServerInfo | None = None
    mgsm: dict[str, Any] | None = None
    determinism: dict[str, Any] | None = None
    smoke: dict[str, Any] | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    finished_at: str | None = None
    ended_by_signal: str | None = None
    error: ErrorInfo | None = None
    teardown_error: str | None = None
    provenance: Provenance | None = None
    mlaprop_version: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``summary.json`` (before redaction)."""
        data: dict[str, Any] = {
            "schema_version": self.schema_version,
            "mlaprop_version": self.mlaprop_version,
            "command": self.command,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "status": self.status.value,
            "exit_code": self.exit_code,
            "ended_by_signal": self.ended_by_signal,
            "message": self.message,
            "gate": self.gate,
            "gating_parser": self.gating_parser,
            "dataset": self.dataset,
            "environment": self.environment,
            "plan": self.plan,
            "server": self.server.to_json() if self.server is not None else None,
            "mgsm": self.mgsm,
            "determinism": self.determinism,
            "smoke": self.smoke,
            "timings_s": dict(self.timings_s),
            "report": dict(self.report),
            "error": self.error.to_json() if self.error is not None else None,
            "provenance": self.provenance.to_json() if self.provenance is not None else None,
        }
        if self.teardown_error is not None:
            data["teardown_error"] = self.teardown_error
        return data


def reference_summary(
    agreement: Any, answers: Mapping[str, tuple[str, str]], reference: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """``summary.json``'s ``smoke.reference``: the server's answers against the canary's reference forward
    (``agreement``: a :class:`mlaprop.canary.ReferenceAgreement`; ``answers``: qid -> (response, extracted);
    ``reference``: :func:`mlaprop.canary.reference_answers`). Every question whose extracted answer differs
    is listed with both answers and the reference's logit margin."""
    return {
        "total": agreement.total,
        "same_answer": agreement.same_answer,
        "same_text": agreement.same_text,
        "rate": round(agreement.rate, 6),
        "differing": [
            {
                "qid": q,
                "server": answers[q][1],
                "reference": str(reference[q].get("extracted", "")),
                "margin": reference[q].get("margin"),
            }
            for q in agreement.differing
        ],
    }


class RedactingStream(io.TextIOBase):
    """A text stream that passes each complete line through a redactor before writing it to ``target``
    (what the live server-log mirror is given, so it shares the job's one redaction point)."""

    def __init__(self, target: TextIO, redactor: Redactor) -> None:
        super().__init__()
        self._target = target
        self._redactor = redactor
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._target.write(self._redactor(line) + "\n")
        self._target.flush()
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self._target.write(self._redactor(self._pending))
            self._pending = ""
        self._target.flush()


def _encodable(line: str, stream: TextIO) -> str:
    """``line`` as ``stream``'s encoding can carry it (``±`` becomes ``+/-`` under ``PYTHONIOENCODING=ascii``;
    anything else unencodable becomes ``?``)."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        line.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        line = line.replace("±", "+/-").encode(encoding, errors="replace").decode(encoding)
    return line


class Reporter:
    """The console: progress and verdict lines on ``out``, errors on ``err``, each through ``redactor``.

    Args:
        out: progress, verdict and report path (default stdout).
        err: errors, each one line naming the cause (default stderr).
        redactor: applied to every line printed.
    """

    def __init__(
        self,
        out: TextIO | None = None,
        err: TextIO | None = None,
        redactor: Redactor = redact,
        *,
        step_summary_path: str | os.PathLike[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.redactor = redactor
        self.step_summary_path = Path(step_summary_path) if step_summary_path else None
        self._clock = clock

    def heartbeat(
        self, what: str, every_s: float, progress: Callable[[], str]
    ) -> contextlib.AbstractContextManager[None]:
        """While the block runs, and only when ``out`` is not a terminal (a CI log), print
        ``heartbeat: WHAT, N s, PROGRESS`` every ``every_s`` seconds (0: never). A terminal has the progress
        bar instead."""
        isatty = getattr(self.out, "isatty", None)
        if every_s <= 0 or (isatty is not None and isatty()):
            return contextlib.nullcontext()
        return _Heartbeat(self, what, every_s, progress)

    def step_summary(self, summary: Summary) -> None:
        """Append the run's Markdown summary to ``$GITHUB_STEP_SUMMARY`` (when set); a failure to write it
        is one line on ``err``, never a failed run."""
        if self.step_summary_path is None:
            return
        try:
            with self.step_summary_path.open("a", encoding="utf-8") as fh:
                fh.write(self.redactor(step_summary_markdown(summary)))
        except OSError as exc:
            self.error(f"mlaprop: could not append to GITHUB_STEP_SUMMARY {self.step_summary_path}: {exc}")

    def say(self, line: str) -> None:
        """One line on ``out``."""
        _print(_encodable(self.redactor(line), self.out), self.out)

    def error(self, line: str) -> None:
        """One line on ``err``."""
        _print(_encodable(self.redactor(line), self.err), self.err)

    def stream(self) -> TextIO:
        """``err`` behind the redactor (a :class:`RedactingStream`), for the live server-log mirror."""
        return cast(TextIO, RedactingStream(self.err, self.redactor))


def _print(line: str, stream: TextIO) -> None:
    """``print(line)``; a reader that went away (``mlaprop run | head -3``) ends the printing, not the job:
    the stream's descriptor is pointed at ``/dev/null`` (as Python's documentation advises for SIGPIPE),
    and the job goes on to its verdict, teardown and report."""
    try:
        print(line, file=stream, flush=True)
    except BrokenPipeError:
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)


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
        "retries": {
            "requests_retried": sum(1 for r in result.records if r.attempts > 1),
            "extra_attempts": sum(max(0, r.attempts - 1) for r in result.records),
        },
        "wall_s": result.wall_s,
        "model": result.model,
    }


def determinism_status(result: DeterminismResult) -> str:
    """``"pass"``, ``"fail"`` (outputs differ: quality) or ``"error"`` (the check could not finish:
    infrastructure). Reads ``result.status`` where the result has one, else ``passed``."""
    status = getattr(result, "status", None)
    if status is not None:
        return str(getattr(status, "value", status)).lower()
    return "pass" if result.passed else "fail"


def determinism_summary(result: DeterminismResult) -> dict[str, Any]:
    """The determinism part of the summary: verdict, and distinct outputs per prompt."""
    return {
        "status": determinism_status(result),
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
        "cause": result.cause or None,
        "samples": result.samples,
        "comparisons": result.comparisons,
        "detectable_flip_rate": result.detectable_flip_rate,
        "compared_logprobs": result.compared_logprobs,
        "notes": list(result.notes[:20]),
        "prompts": [
            {
                "label": o.label,
                "prompt_chars": o.prompt_chars,
                "samples": o.samples,
                "distinct": o.distinct,
                "max_logprob_diff": o.max_logprob_diff,
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


def redact_file(path: str | os.PathLike[str], redactor: Redactor = redact) -> bool:
    """Rewrite a text file (the server log in the report) with ``redactor`` applied to each line, atomically.
    Returns ``False`` when the file does not exist.

    Raises:
        OSError: the file cannot be read or replaced.
    """
    src = Path(path)
    if not src.is_file():
        return False
    with src.open(encoding="utf-8", errors="replace") as inp:
        text = "".join(redactor(line) for line in inp)
    atomic_write(src, text)
    return True


class ReportFolderBusy(OSError):
    """Another mlaprop run is writing into the same report folder."""


class ReportWriter:
    """Writes ``items.jsonl`` as items finish and ``summary.json`` whenever asked, in ``directory``.

    ``items.jsonl`` is truncated when the writer is created and each line flushed as it is written. It is
    locked (``flock``) for the writer's life: a second run into the same folder is refused with
    :class:`ReportFolderBusy` instead of interleaving its items. Use as a context manager or
    call :meth:`close`.

    Raises:
        ReportFolderBusy: another run holds the folder.
        OSError: the folder cannot be created or written.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        parser: Parser = Parser.SIMPLE_EVALS,
        redactor: Redactor = redact,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.parser = Parser(parser)
        self.redactor = redactor
        self.items_path = self.directory / ITEMS_FILE
        self.summary_path = self.directory / SUMMARY_FILE
        self._items: TextIO | None = _open_locked(self.items_path)
        self.items_written = 0

    def __enter__(self) -> ReportWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record(self, record: ItemRecord, question: str | None = None) -> None:
        """Append one item (redacted) as a JSON line and flush it to the OS."""
        if self._items is None:
            raise ValueError("report writer is closed")
        data = item_json(record, self.parser)
        if question is not None:
            data = {"qid": data["qid"], "index": data["index"], "question": question, **data}
        line = json.dumps(redact_tree(data, self.redactor), ensure_ascii=False)
        self._items.write(line + "\n")
        self._items.flush()
        self.items_written += 1

    def rewrite_items(self, records: list[tuple[ItemRecord, str | None]]) -> None:
        """Replace ``items.jsonl`` with ``records`` in this order (question order at the end of the eval)."""
        if self._items is None:
            raise ValueError("report writer is closed")
        lines = []
        for record, question in records:
            data = item_json(record, self.parser)
            if question is not None:
                data = {"qid": data["qid"], "index": data["index"], "question": question, **data}
            lines.append(json.dumps(redact_tree(data, self.redactor), ensure_ascii=False) + "\n")
        self._items.seek(0)
        self._items.truncate()
        self._items.write("".join(lines))
        self._items.flush()
        self.items_written = len(lines)

    def write_summary(self, summary: Summary | Mapping[str, Any]) -> Path:
        """Write ``summary`` (redacted) to ``summary.json`` atomically; returns its path."""
        data = summary.to_json() if isinstance(summary, Summary) else summary
        text = json.dumps(redact_tree(data, self.redactor), indent=2, ensure_ascii=False, allow_nan=False)
        return atomic_write(self.summary_path, text + "\n")

    def close(self) -> None:
        """Close ``items.jsonl`` (which releases the folder)."""
        if self._items is not None:
            self._items.close()
            self._items = None


def _open_locked(path: Path) -> TextIO:
    """``path`` opened for writing, emptied, with an exclusive non-blocking ``flock`` (released when closed
    or when the process dies).

    Raises:
        ReportFolderBusy: another process holds the lock.
    """
    fh = path.open("a", encoding="utf-8")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise ReportFolderBusy(
            f"another mlaprop run is writing into {path.parent}; wait for it, or pass another --report-dir"
        ) from None
    fh.seek(0)
    fh.truncate()
    return fh


class _Heartbeat(contextlib.AbstractContextManager[None]):
    """A daemon thread printing a heartbeat line every ``every_s`` seconds until the block ends."""

    def __init__(self, reporter: Reporter, what: str, every_s: float, progress: Callable[[], str]) -> None:
        self._reporter = reporter
        self._what = what
        self._every = every_s
        self._progress = progress
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="mlaprop-heartbeat", daemon=True)
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = self._reporter._clock()
        self._thread.start()

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=1.0)

    def _beat(self) -> None:
        while not self._done.wait(self._every):
            elapsed = self._reporter._clock() - self._started
            detail = self._progress()
            self._reporter.say(
                f"heartbeat: {self._what}, {elapsed:.0f} s" + (f", {detail}" if detail else "")
            )


def step_summary_markdown(summary: Summary) -> str:
    """A short Markdown report of a run for a CI job page (GitHub's ``$GITHUB_STEP_SUMMARY``): the one
    rendering in :func:`mlaprop.cireport.step_summary_markdown`, fed this summary's JSON form."""
    return cireport.step_summary_markdown(summary.to_json())
