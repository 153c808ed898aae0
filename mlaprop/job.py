"""The main job, as stages: detect -> compose -> preflight -> launch -> eval -> determinism -> teardown.

Each stage is a function returning a typed result (:class:`~mlaprop.environment.Environment`,
:class:`~mlaprop.environment.LaunchPlan`, :class:`~mlaprop.evalclient.EvalResult`,
:class:`~mlaprop.determinism.DeterminismResult`, :class:`Outcome`); :func:`run` and :func:`evaluate` chain
them and record each result in the report (:class:`JobRecord`). Nothing here parses arguments; nothing is
printed except through the :class:`~mlaprop.report.Reporter` given, and every byte printed or written
passes through its redactor.

Exit codes (:class:`mlaprop.exitcodes.ExitCode`): 0 pass; 1 quality failure (gate failed or inconclusive,
determinism FAILED); 2 usage or environment error before launch (options, report folder, dataset, plan,
preflight); 3 infrastructure failure (server did not start or died, eval aborted, teardown failed,
determinism ERROR); 130 Ctrl-C (the partial report is written, then 130 is returned); 143 SIGTERM
(:class:`mlaprop.server.Terminated` propagates after teardown). ``exit_code`` in ``summary.json`` is what
the process exits with.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from mlaprop import __version__
from mlaprop import server as srv
from mlaprop.args import read_plan, read_server_args
from mlaprop.canary import CanaryError, compare_with_reference, ensure_canary, reference_answers
from mlaprop.capabilities import KNOWN_VERSIONS
from mlaprop.compose import UnsupportedCombination, compose
from mlaprop.detect import detect_environment
from mlaprop.determinism import DeterminismResult, check_determinism
from mlaprop.environment import Environment, InvalidEnvironment, LaunchPlan, LaunchRequest
from mlaprop.evalclient import (
    ClientConfig,
    EvalAborted,
    EvalResult,
    ItemRecord,
    default_concurrency,
    fetch_server_info,
    run_mgsm,
)
from mlaprop.exitcodes import ExitCode
from mlaprop.mgsm import DatasetUnavailable, InvalidDataset, MgsmDataset, Parser, resolve_dataset
from mlaprop.options import SMOKE_SERVER_ARGS, EvalOptions, RunOptions, SmokeModel
from mlaprop.options import base_url as check_base_url
from mlaprop.planview import environment_to_dict, plan_to_dict
from mlaprop.preflight import PreflightError, preflight
from mlaprop.provenance import collect_provenance
from mlaprop.redact import is_secret_name
from mlaprop.report import (
    ErrorInfo,
    Reporter,
    ReportFolderBusy,
    ReportWriter,
    ServerInfo,
    Status,
    Summary,
    dataset_summary,
    determinism_status,
    determinism_summary,
    mgsm_summary,
    reference_summary,
    with_secrets,
)
from mlaprop.stats import Verdict
from mlaprop.tinymodel import TinyModelError, write_tiny_mla

__all__ = [
    "SIMSERVER_COMMAND",
    "SMOKE_STAGE",
    "JobRecord",
    "Outcome",
    "ServerOptions",
    "decide",
    "evaluate",
    "reference_stage",
    "run",
    "server_options",
    "smoke_model_stage",
    "smoke_request",
]

#: The simulated SGLang server (``--simulate``).
SIMSERVER_COMMAND: tuple[str, ...] = (sys.executable, "-m", "mlaprop.simserver")
#: Exit code of an infrastructure failure.
EXIT_INFRA = ExitCode.INFRASTRUCTURE


# ------------------------------------------------------------------------------------ reading the plan


@dataclass(frozen=True)
class ServerOptions:
    """The server options the job needs to know, as SGLang will read them (a subset of
    ``mlaprop.args.ServerArgs``, with its field names)."""

    api_key: str | None = None
    load_format: str | None = None


def server_options(argv: Sequence[str], sglang_version: str) -> ServerOptions:
    """The one place the job reads server options out of an argv that has no plan yet (the user's extra
    args in smoke mode): read as SGLang ``sglang_version``'s parser reads it
    (:func:`mlaprop.args.read_server_args`: prefixes, ``=`` forms, last repeat wins). Code holding a plan reads
    ``read_plan(plan)``.

    Raises:
        InvalidEnvironment: SGLang's parser would refuse ``argv``.
    """
    read = read_server_args(argv, sglang_version or KNOWN_VERSIONS[-1])
    return ServerOptions(api_key=read.api_key, load_format=read.load_format)


def smoke_request(
    request: LaunchRequest, model_dir: Path, sglang_version: str = "", *, dummy: bool = True
) -> LaunchRequest:
    """The request served in smoke mode: the tiny model at ``model_dir``; with ``dummy`` (no weight files)
    also ``--load-format dummy`` (a user ``--load-format`` wins), else SGLang's real weight loading."""
    extra = request.extra_args
    if dummy and server_options(extra, sglang_version).load_format is None:
        extra = (*SMOKE_SERVER_ARGS, *extra)
    return replace(request, model=str(model_dir), extra_args=extra)


# ------------------------------------------------------------------------------------------ the record


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class JobRecord:
    """The report being built: the :class:`~mlaprop.report.Summary`, written to disk after every stage,
    the items as they finish, and the console.

    Raises:
        OSError: the report folder cannot be created or written (see :func:`_open_record`).
    """

    def __init__(self, command: str, opts: EvalOptions, reporter: Reporter) -> None:
        self.reporter = reporter
        self.opts = opts
        self.started = time.monotonic()
        self.stage = "dataset"
        self.records: list[ItemRecord] = []  # MGSM items as they finish (the partial result of an interrupt)
        self.dataset: MgsmDataset | None = None
        self.writer = ReportWriter(opts.report_dir, opts.parser, reporter.redactor)
        self.summary = Summary(
            command=command,
            started_at=_now(),
            gate=opts.gate,
            gating_parser=Parser(opts.parser).value,
            report={"summary": str(self.writer.summary_path), "items": str(self.writer.items_path)},
            mlaprop_version=__version__,
        )
        self.save()

    def say(self, line: str) -> None:
        self.reporter.say(line)

    def add_secrets(self, values: Iterable[str | None]) -> None:
        """Mask these values, by value, in everything printed or written from now on (console, summary,
        items, server log)."""
        redactor = with_secrets(self.reporter.redactor, values)
        self.reporter.redactor = self.writer.redactor = redactor

    def error(self, line: str) -> None:
        self.reporter.error(line)

    def step(self, name: str, since: float) -> None:
        self.summary.timings_s[name] = round(time.monotonic() - since, 3)

    def save(self) -> None:
        self.summary.timings_s["total"] = round(time.monotonic() - self.started, 3)
        self.writer.write_summary(self.summary)

    def fail(self, stage: str, exc: BaseException, status: Status, code: int, message: str) -> int:
        """Record an error that ends the job at ``stage`` and print ``message`` on stderr."""
        self.summary.error = ErrorInfo(stage, type(exc).__name__, str(exc))
        return self.finish(status, code, message, error=True)

    def finish(self, status: Status, code: int, message: str, *, error: bool = False) -> int:
        """Record the outcome and print ``message`` (to stderr when ``error``) and where the report is."""
        self.summary.status, self.summary.exit_code, self.summary.message = status, int(code), message
        self.summary.finished_at = _now()
        self.save()
        self.writer.close()
        self.reporter.step_summary(self.summary)
        (self.error if error else self.say)(message)
        if code != ExitCode.OK and not error:
            self.error(message)  # a failed verdict names its cause on stderr too
        self.say(f"report: {self.writer.summary_path} (items: {self.writer.items_path})")
        return int(code)

    def record(self, record: ItemRecord) -> None:
        self.records.append(record)
        self.writer.record(record, self._question(record.index))

    def _question(self, index: int) -> str | None:
        items = self.dataset.items if self.dataset is not None else ()
        return items[index].question if 0 <= index < len(items) else None

    def sort_items(self) -> None:
        """Rewrite ``items.jsonl`` in question order (items are appended as they finish)."""
        done = sorted(self.records, key=lambda r: r.index)
        with contextlib.suppress(ValueError):  # closed: the report is already final
            self.writer.rewrite_items([(r, self._question(r.index)) for r in done])

    def stopped(self, exc: BaseException) -> int:
        """Record an exception that ends the job (interrupt, ``SystemExit``, a bug) with the exit code the
        process will end with; returns that code."""
        code = _exit_code_of(exc)
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        with _sigint_deferred():  # a second Ctrl-C must not cut the final summary short
            return self._stopped(exc, code, detail)

    def _stopped(self, exc: BaseException, code: int, detail: str) -> int:
        signum = _signal_of(exc)
        if signum is not None:
            self.summary.ended_by_signal = signal.Signals(signum).name
        if self.summary.status is Status.RUNNING:
            interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
            status = Status.INTERRUPTED if interrupted else Status.ERROR
            self.summary.error = ErrorInfo(self.stage, type(exc).__name__, str(exc))
            self.finish(status, code, f"mlaprop: {status.value} ({detail}); partial report kept", error=True)
        elif self.summary.exit_code != code:  # after the verdict (during teardown)
            self.summary.exit_code = code
            self.summary.message = f"{self.summary.message}; then ended by {detail}"
            self.summary.finished_at = _now()
            self.save()
            self.error(f"mlaprop: ended by {detail} after the verdict; exit code {code}")
        return code


def _signal_of(exc: BaseException) -> int | None:
    """The signal behind ``exc``: SIGINT for Ctrl-C, the signal of :class:`mlaprop.server.Terminated`."""
    if isinstance(exc, KeyboardInterrupt):
        return signal.SIGINT
    signum = getattr(exc, "signum", None)
    return signum if isinstance(exc, SystemExit) and isinstance(signum, int) else None


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Ignore SIGINT while the block runs (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _exit_code_of(exc: BaseException) -> int:
    """The status a process ends with when ``exc`` ends it: 130 for Ctrl-C, a ``SystemExit``'s code (143
    for :class:`mlaprop.server.Terminated`), 3 for an unexpected exception (a crash of mlaprop itself says
    nothing about the model's quality, so a CI retry policy must not read it as exit 1)."""
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.SIGINT
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else ExitCode.QUALITY)
    return ExitCode.INFRASTRUCTURE


def _report_dir_problem(path: Path, exc: OSError) -> str:
    """Why ``path`` cannot be the report folder, and what to pass instead."""
    if isinstance(exc, ReportFolderBusy):
        return f"--report-dir {path}: {exc}"
    if path.exists() and not path.is_dir():
        return f"--report-dir {path} is a file, not a folder; pass a folder (it is created if missing)"
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return (
                    f"--report-dir {path} is under {parent}, which is a file, so no folder can be made there; "
                    "pass a folder path whose parents are folders"
                )
            break
    reason = exc.strerror or str(exc)
    return f"--report-dir {path} cannot be created or written ({reason}); pass a folder you can write to"


def _open_record(command: str, opts: EvalOptions, reporter: Reporter) -> JobRecord | None:
    """The job's record, or ``None`` (and one error line) when the report folder cannot be used."""
    try:
        return JobRecord(command, opts, reporter)
    except OSError as exc:
        reporter.error(f"mlaprop: error: {_report_dir_problem(Path(opts.report_dir), exc)}")
        return None


# -------------------------------------------------------------------------------------------- stages


def load_dataset(opts: EvalOptions) -> MgsmDataset:
    """Stage *dataset*: the MGSM questions.

    Raises:
        InvalidDataset, DatasetUnavailable: see :func:`mlaprop.mgsm.resolve_dataset`.
    """
    return resolve_dataset(opts.lang, opts.dataset, download=not opts.offline)


def detect(run_opts: RunOptions) -> Environment:
    """Stage *detect*: the given environment, or the detected one."""
    return run_opts.environment or detect_environment(run_opts.env_vars)


def compose_plan(env: Environment, request: LaunchRequest, run_opts: RunOptions) -> LaunchPlan:
    """Stages *compose* and *preflight* (real runs only).

    Raises:
        UnsupportedCombination, InvalidEnvironment, PreflightError.
    """
    plan = compose(env, request)
    if run_opts.preflight and not run_opts.simulate:
        preflight(env, expect=None, model=plan.model, environ=run_opts.env_vars)
    return plan


def eval_mgsm(
    job: JobRecord,
    base_url: str,
    dataset: MgsmDataset,
    config: ClientConfig,
    is_alive: Callable[[], bool] | None,
) -> EvalResult:
    """Stage *eval*: MGSM against ``base_url``; the summary gets the (partial, on any exception) result.

    Raises:
        EvalAborted: the eval stopped early (server died, too many errors).
    """
    opts = job.opts
    n = len(dataset) if opts.limit is None else min(len(dataset), opts.limit)
    if opts.concurrency is None:  # one wave, as the gate sends it, within the server's own limit
        config = replace(config, concurrency=default_concurrency(n, fetch_server_info(base_url, config)))
    job.say(
        f"MGSM-{dataset.lang}: {n} questions, concurrency {config.concurrency}, "
        f"gate {opts.gate:g} by the {Parser(opts.parser).value} parser"
    )
    since = time.monotonic()
    job.stage = "mgsm"
    job.records = []
    beat = job.reporter.heartbeat(
        f"MGSM-{dataset.lang}", opts.heartbeat_s, lambda: f"{len(job.records)}/{n} questions answered"
    )
    try:
        with beat:
            result = run_mgsm(
                base_url,
                dataset,
                config=config,
                model=opts.model,
                is_alive=is_alive,
                on_record=job.record,
                limit=opts.limit,
                notice=job.say,
            )
    except EvalAborted as exc:
        job.step("mgsm", since)
        if isinstance(exc.partial, EvalResult):
            job.summary.mgsm = mgsm_summary(exc.partial, opts.parser, opts.gate)
        job.sort_items()
        job.save()
        raise
    except BaseException as exc:  # Ctrl-C, SIGTERM: what was answered goes into the summary
        job.step("mgsm", since)
        why = f"interrupted ({type(exc).__name__})"
        done = tuple(sorted(job.records, key=lambda r: r.index))
        partial = EvalResult(dataset.lang, n, done, time.monotonic() - since, opts.model or "", why)
        job.summary.mgsm = mgsm_summary(partial, opts.parser, opts.gate)
        job.sort_items()
        job.save()
        raise
    job.step("mgsm", since)
    job.summary.mgsm = mgsm_summary(result, opts.parser, opts.gate)
    job.sort_items()
    job.save()
    _print_scores(job, result)
    return result


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _print_scores(job: JobRecord, result: EvalResult) -> None:
    opts = job.opts
    gating = Parser(opts.parser)
    for p in (gating, *(q for q in Parser if q is not gating)):
        s = result.score(p, opts.gate)
        label = f"{p.value} parser" + (" (gates)" if p is gating else "")
        job.say(f"  {label}: {s.describe() if s else 'no answers'}")
    m = job.summary.mgsm or {}
    lat = m["latency_s"]
    job.say(
        f"  errors {result.errors}, parsers disagree on {len(result.disagreements)}; latency p50 "
        f"{_fmt(lat['p50'])} s, p95 {_fmt(lat['p95'])} s; "
        f"{_fmt(m['output_tokens_per_s'], 0)} output tokens/s; {result.wall_s:.1f} s"
    )


def determinism(
    job: JobRecord, base_url: str, config: ClientConfig, is_alive: Callable[[], bool] | None
) -> DeterminismResult:
    """Stage *determinism*: the batch-invariance check; the summary gets its result."""
    opts = job.opts
    since = time.monotonic()
    job.stage = "determinism"

    def keep(partial: DeterminismResult) -> None:  # answered waves survive an interrupt or a crash
        job.summary.determinism = determinism_summary(partial)
        job.save()

    with job.reporter.heartbeat("determinism check", opts.heartbeat_s, lambda: ""):
        result = check_determinism(
            base_url,
            batch_sizes=opts.batch_sizes,
            prefix_lengths=opts.prefix_lengths,
            config=config,
            is_alive=is_alive,
            on_progress=keep,
        )
    job.step("determinism", since)
    job.summary.determinism = determinism_summary(result)
    job.save()
    job.say(f"determinism: {result.reason}")
    return result


@dataclass(frozen=True)
class Outcome:
    """How a job that reached the end of its eval ended: status, exit code and the verdict line."""

    status: Status
    exit_code: int
    message: str


def decide(result: EvalResult, det: DeterminismResult | None, opts: EvalOptions) -> Outcome:
    """Stage *verdict* (pure): the gate (unless ``opts.gated`` is off) and the determinism check."""
    verdict = result.verdict(opts.parser, opts.gate)
    s = result.score(opts.parser, opts.gate)
    parts = [f"MGSM-{result.lang} {s.describe() if s is not None else 'no answers'}"]
    if result.errors:
        parts.append(f"{result.errors} failed requests")
    det_status = determinism_status(det) if det is not None else None
    if det_status is not None:
        parts.append(
            {"pass": "determinism passed", "fail": "determinism FAILED"}.get(det_status, "determinism ERROR")
        )
    detail = "; ".join(parts)
    if det_status == "error":
        cause = getattr(det, "cause", "") or "the check could not finish"
        return Outcome(Status.DETERMINISM_ERROR, EXIT_INFRA, f"verdict: ERROR - {detail} ({cause})")
    det_failed = det_status == "fail"
    if not opts.gated:
        if result.answered == 0:
            return Outcome(
                Status.FAIL, ExitCode.QUALITY, f"verdict: FAIL - no question was answered; {detail}"
            )
        if det_failed:
            return Outcome(Status.DETERMINISM_FAILED, ExitCode.QUALITY, f"verdict: FAIL - {detail}")
        return Outcome(
            Status.PASS, ExitCode.OK, f"verdict: PASS (smoke: score reported, not gated) - {detail}"
        )
    if verdict is Verdict.PASS and not det_failed:
        return Outcome(Status.PASS, ExitCode.OK, f"verdict: PASS - {detail}")
    if verdict is Verdict.INCONCLUSIVE:
        return Outcome(
            Status.INCONCLUSIVE,
            ExitCode.QUALITY,
            f"verdict: INCONCLUSIVE - {detail}; failed requests could flip the gate",
        )
    status = Status.FAIL if verdict is Verdict.FAIL else Status.DETERMINISM_FAILED
    return Outcome(status, ExitCode.QUALITY, f"verdict: FAIL - {detail}")


def _aborted(job: JobRecord, exc: EvalAborted, tail: Sequence[str], *, server_died: bool = False) -> int:
    """Record an aborted eval; when the server died, the verdict line names the log line saying why."""
    m = job.summary.mgsm or {}
    done = (
        f"{m.get('answered', 0)} answered, {m.get('errors', 0)} failed, {m.get('missing', '?')} not finished"
    )
    job.summary.error = ErrorInfo("mgsm", "EvalAborted", exc.reason, tuple(tail))
    cause = None
    if server_died:
        cause = next((line.strip() for line in reversed(tail) if _LOG_CAUSE.search(line)), None)
    why = f"{exc.reason} (server log: {cause})" if cause else exc.reason
    first = next(iter(m.get("first_errors") or ()), None)
    if not cause and isinstance(first, Mapping) and first.get("error"):  # the cause, not only the count
        why = f"{why}; first error ({first.get('qid', '?')}): {first['error']}"
    return job.finish(Status.ABORTED, EXIT_INFRA, f"verdict: ABORTED - {why} ({done})", error=True)


#: A server-log line that names why the server stopped.
_LOG_CAUSE = re.compile(r"(?i)(?:error|exception|killed|out of memory|fault|abort)")


def _dataset_stage(job: JobRecord, opts: EvalOptions) -> MgsmDataset | None:
    since = time.monotonic()
    try:
        dataset = load_dataset(opts)
    except (InvalidDataset, DatasetUnavailable) as exc:
        job.fail("dataset", exc, Status.ERROR, ExitCode.USAGE, f"mlaprop: dataset error: {exc}")
        return None
    job.step("dataset", since)
    job.dataset = dataset
    job.summary.dataset = dataset_summary(dataset)
    if not dataset.canonical:
        job.say(
            f"note: {dataset.path} is not the published MGSM-{dataset.lang} file; scores are not comparable"
        )
    return dataset


#: The stage that writes or fetches the smoke model (``error.stage`` and ``timings_s`` key).
SMOKE_STAGE = "smoke_model"


def smoke_model_stage(job: JobRecord, run_opts: RunOptions, dataset: MgsmDataset) -> Path:
    """Stage *smoke_model*: the model folder smoke mode serves (:class:`~mlaprop.options.SmokeModel`).

    ``canary``: :func:`mlaprop.canary.ensure_canary` (cached, or trained now on this machine's GPU);
    ``random``: real-scale random block-FP8 weights written into the report folder; ``dummy``: no weights
    (served with ``--load-format dummy``). With the simulated server the weights are never read, so a
    ``dummy`` folder stands in for every choice (no torch or GPU needed) and the simulator answers.
    The summary's ``smoke`` section records the choice.

    Raises:
        mlaprop.canary.CanaryError: the canary cannot be built here (no torch, no GPU, misses its
            reference check).
        mlaprop.tinymodel.TinyModelError: ``tokenizers`` (or, for ``random``, torch) missing.
    """
    choice = run_opts.smoke_model
    gated = job.opts.gated
    job.summary.smoke = {
        "model": choice.value,
        "path": None,
        "gated": gated,
        "simulated": run_opts.simulate,
        "reference": None,
    }
    if run_opts.simulate:
        path = write_tiny_mla(job.opts.report_dir / "tiny-mla-fp8")
        job.say(f"smoke: {choice} model (the simulated server stands in; no weights read) at {path}")
    elif choice is SmokeModel.CANARY:
        job.say("smoke: the canary (trained MLA FP8 model): from the cache, or trained now on this GPU")
        path = ensure_canary(dataset.path, log=lambda line: job.say(f"  canary: {line}"))
        job.say(f"smoke: the canary at {path}; real weight loading, gate {job.opts.gate:g}")
    elif choice is SmokeModel.RANDOM:
        path = write_tiny_mla(job.opts.report_dir / "tiny-mla-fp8", weights="random")
        job.say(f"smoke: tiny MLA FP8 model (real-scale random weights) at {path}; score reported, not gated")
    else:
        path = write_tiny_mla(job.opts.report_dir / "tiny-mla-fp8")
        job.say(f"smoke: tiny MLA FP8 model (--load-format dummy) at {path}; score reported, not gated")
    job.summary.smoke["path"] = str(path)
    job.save()
    return path


def _canary_failed(job: JobRecord, exc: CanaryError) -> int:
    """The canary could not be had: a missing reference check is infrastructure (3), anything else (no
    torch, no GPU) is the runner's setup (2, with the fix in the message)."""
    if "reference forward" in str(exc):
        code, status = EXIT_INFRA, Status.ERROR
    else:
        code, status = ExitCode.USAGE, Status.ERROR
    hint = "" if code == EXIT_INFRA else "; or pick another smoke model: --smoke-model random|dummy"
    message = f"mlaprop: error: CanaryError: {exc}{hint}"
    return job.fail(SMOKE_STAGE, exc, status, code, message)


def reference_stage(job: JobRecord, run_opts: RunOptions, model_dir: Path, result: EvalResult) -> None:
    """After the eval on the canary: the server's answers against the reference forward's, per question,
    into the summary's ``smoke.reference`` and one printed line. Nothing for other smoke models or the
    simulated server (no reference to compare with)."""
    if run_opts.smoke_model is not SmokeModel.CANARY or run_opts.simulate or job.summary.smoke is None:
        return
    answers = {
        r.qid: (r.response, r.extracted_simple_evals)  # the reference is read by simple-evals
        for r in result.records
        if r.response is not None
    }
    try:
        reference = reference_answers(model_dir)
        agreement = compare_with_reference(model_dir, answers)
    except CanaryError as exc:  # the folder changed under us: report, do not fail the eval
        job.say(f"canary: no reference comparison ({exc})")
        return
    job.summary.smoke["reference"] = reference_summary(agreement, answers, reference)
    job.save()
    job.say(
        f"canary: server agrees with the reference forward on {agreement.same_answer}/{agreement.total} "
        f"answers ({agreement.same_text} identical texts)"
        + (f"; differ: {', '.join(agreement.differing[:8])}" if agreement.differing else "")
    )


# ------------------------------------------------------------------------------------------ the jobs


def evaluate(base_url: str, opts: EvalOptions, *, reporter: Reporter | None = None) -> int:
    """``mlaprop eval``: the MGSM eval (and, with ``opts.determinism``, the determinism check) against a
    running server at ``base_url`` (checked by the CLI, :func:`mlaprop.options.base_url`). Returns the exit
    code (see the module; a bad ``base_url`` is exit 2); the partial report is written before any error
    propagates."""
    reporter = reporter or Reporter()
    try:
        base_url = check_base_url(base_url)
    except ValueError as exc:
        reporter.error(f"mlaprop: error: --base-url: {exc}")
        return ExitCode.USAGE
    job = _open_record(f"eval --base-url {base_url}", opts, reporter)
    if job is None:
        return ExitCode.USAGE
    try:
        job.summary.provenance = collect_provenance(None, simulated=False)
        dataset = _dataset_stage(job, opts)
        if dataset is None:
            return ExitCode.USAGE
        job.add_secrets([opts.api_key, *_secret_values(None)])
        job.summary.server = ServerInfo(base_url)
        config = opts.client_config()
        try:
            result = eval_mgsm(job, base_url, dataset, config, None)
        except EvalAborted as exc:
            return _aborted(job, exc, ())
        det = determinism(job, base_url, config, None) if opts.determinism else None
        outcome = decide(result, det, opts)
        return job.finish(outcome.status, outcome.exit_code, outcome.message)
    except KeyboardInterrupt as exc:
        return job.stopped(exc)
    except BaseException as exc:
        job.stopped(exc)
        raise


def run(run_opts: RunOptions, opts: EvalOptions, *, reporter: Reporter | None = None) -> int:
    """The main job. Returns the exit code (see the module).

    Report-folder, dataset, plan and preflight problems are found before any server is launched (one
    ``mlaprop: error:`` line on stderr, exit 2). The server is always torn down.

    Raises:
        mlaprop.server.Terminated: SIGTERM while the server ran, after teardown and the partial summary
            (status ``interrupted``, exit code 143). Ctrl-C is not raised: the same happens and 130 is
            returned.
    """
    reporter = reporter or Reporter()
    job = _open_record("run --simulate" if run_opts.simulate else "run", opts, reporter)
    if job is None:
        return ExitCode.USAGE
    try:
        return _run(job, run_opts, opts)
    except KeyboardInterrupt as exc:
        return job.stopped(exc)
    except BaseException as exc:
        job.stopped(exc)
        raise


def _secret_values(env_vars: Mapping[str, str] | None) -> list[str]:
    """Values of secret-named environment variables (``HF_TOKEN``, ``*_API_KEY``): masked by value."""
    env = os.environ if env_vars is None else env_vars
    return [v for k, v in env.items() if is_secret_name(k)]


def _sim_args(env: Environment, dataset: MgsmDataset, run_opts: RunOptions) -> list[str]:
    return [
        "--sim-platform",
        "rocm" if env.vendor.value == "amd" else "cuda",
        "--sim-arch",
        env.arch or ("gfx942" if env.vendor.value == "amd" else "sm90"),
        "--sim-sglang-version",
        env.sglang_version,
        "--sim-dataset",
        dataset.path,
        "--sim-accuracy",
        repr(run_opts.sim_accuracy),
        "--sim-latency",
        repr(run_opts.sim_latency_s),
        *run_opts.sim_args,
    ]


def _run(job: JobRecord, run_opts: RunOptions, opts: EvalOptions) -> int:
    job.summary.provenance = collect_provenance(None, simulated=run_opts.simulate)  # refined after detect
    dataset = _dataset_stage(job, opts)
    if dataset is None:
        return ExitCode.USAGE
    smoke_dir: Path | None = None
    if run_opts.smoke:
        since = time.monotonic()
        job.stage = SMOKE_STAGE
        try:
            smoke_dir = smoke_model_stage(job, run_opts, dataset)
        except CanaryError as exc:
            return _canary_failed(job, exc)
        except TinyModelError as exc:
            message = f"mlaprop: error: TinyModelError: {exc}"
            return job.fail(SMOKE_STAGE, exc, Status.ERROR, ExitCode.USAGE, message)
        job.step(SMOKE_STAGE, since)
    since = time.monotonic()
    job.stage = "compose"
    try:
        env = detect(run_opts)
        request = run_opts.request
        if smoke_dir is not None:
            dummy = run_opts.smoke_model is SmokeModel.DUMMY
            request = smoke_request(request, smoke_dir, env.sglang_version, dummy=dummy)
        env_view = environment_to_dict(env)
        job.summary.environment = {
            k: env_view[k] for k in ("vendor", "arch", "gpu_count", "sglang_version", "notes")
        }
        job.summary.provenance = collect_provenance(env, simulated=run_opts.simulate)
        plan = compose_plan(env, request, run_opts)
        job.summary.plan = plan_to_dict(plan)
    except (InvalidEnvironment, UnsupportedCombination, PreflightError) as exc:
        message = f"mlaprop: error: {type(exc).__name__}: {exc}"
        return job.fail("compose", exc, Status.ERROR, ExitCode.USAGE, message)
    job.step("compose", since)
    wants_det = plan.deterministic if opts.determinism is None else opts.determinism
    job.say(
        f"plan: {env.vendor} {env.arch} x{env.gpu_count}, SGLang {env.sglang_version} rules; attention backend "
        f"{plan.attention_backend}; deterministic inference {'on' if plan.deterministic else 'off'}"
        + (" (simulated server)" if run_opts.simulate else "")
    )
    prefix = run_opts.command_prefix or (
        SIMSERVER_COMMAND if run_opts.simulate else srv.DEFAULT_COMMAND_PREFIX
    )
    extra = _sim_args(env, dataset, run_opts) if run_opts.simulate else []
    api_key = read_plan(plan).api_key
    job.add_secrets([api_key, opts.api_key, *_secret_values(run_opts.env_vars)])
    config = opts.client_config(api_key)
    log_path = opts.report_dir / "server.log"
    try:  # the launcher appends: each run starts its own log
        log_path.unlink(missing_ok=True)
    except OSError as exc:
        message = (
            f"mlaprop: error: cannot replace the previous server log {log_path} ({exc.strerror or exc}); "
            "remove it, or pass another --report-dir"
        )
        return job.fail("launch", exc, Status.ERROR, ExitCode.USAGE, message)
    since = time.monotonic()
    job.stage = "launch"
    code: int | None = None
    try:
        with contextlib.ExitStack() as stack:
            with job.reporter.heartbeat("server start-up", opts.heartbeat_s, lambda: "not ready yet"):
                server = stack.enter_context(
                    srv.launch(
                        plan,
                        command_prefix=prefix,
                        extra_args=extra,
                        log_path=log_path,
                        echo=job.reporter.stream() if run_opts.echo_server_log else False,
                        ready_timeout=run_opts.ready_timeout_s,
                        grace=run_opts.grace_s,
                        redactor=job.reporter.redactor,
                    )
                )
            try:
                job.step("launch", since)
                job.summary.server = ServerInfo(server.base_url, server.command, str(server.log_path))
                job.save()
                job.say(
                    f"server ready in {job.summary.timings_s['launch']:.1f} s at {server.base_url} "
                    f"(log: {server.log_path})"
                )
                try:
                    result = eval_mgsm(job, server.base_url, dataset, config, server.alive)
                except EvalAborted as exc:
                    code = _aborted(job, exc, server.log_tail(5), server_died=not server.alive())
                else:
                    if run_opts.smoke and smoke_dir is not None:
                        reference_stage(job, run_opts, smoke_dir, result)
                    det = determinism(job, server.base_url, config, server.alive) if wants_det else None
                    outcome = decide(result, det, opts)
                    # infrastructure: cause + log tail
                    if det is not None and determinism_status(det) == "error":
                        tail = tuple(server.log_tail(5))
                        job.summary.error = ErrorInfo("determinism", "DeterminismError", det.cause, tail)
                    code = job.finish(outcome.status, outcome.exit_code, outcome.message)
                since = time.monotonic()
                job.stage = "teardown"
            except (KeyboardInterrupt, SystemExit) as exc:
                # the partial report first: teardown may take the whole grace period, and a runner that
                # cancels a job sends SIGKILL after a few seconds
                job.stopped(exc)
                raise
        job.step("teardown", since)
        job.save()
        return code
    except srv.ServerTeardownError as exc:
        # the verdict, if one was reached, stays in the report; processes left behind fail the run
        job.summary.teardown_error = str(exc)
        job.summary.status, job.summary.exit_code = Status.TEARDOWN_FAILED, EXIT_INFRA
        job.summary.finished_at = _now()
        job.save()
        job.error(f"mlaprop: server teardown failed: {exc.headline}")
        return EXIT_INFRA
    except srv.ServerError as exc:  # could not start (teardown failures are handled above)
        job.step("launch", since)
        message = f"mlaprop: the server failed: {exc.headline}"
        if isinstance(exc, srv.ServerStartTimeout):  # the fix, on the same line, for a server only slow
            message += "; if it is only slow to load, raise --ready-timeout (MLAPROP_READY_TIMEOUT in tox)"
        return job.fail("launch", exc, Status.SERVER_FAILED, EXIT_INFRA, message)
