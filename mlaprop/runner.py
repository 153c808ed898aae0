"""The main job: detect -> compose -> launch -> MGSM -> determinism -> report -> teardown.

:func:`run` returns an exit code: 0 the gate (and, when the plan has ``--enable-deterministic-inference``, the
determinism check) passed; 1 the gate or determinism failed, the eval could not finish (the server died,
too many failed requests, a verdict failed requests could flip), or the server failed to start or stop;
2 a usage or environment error (bad dataset, dataset unavailable, impossible plan, no GPU), found before any
server is launched; 130 interrupted (Ctrl-C: the partial report is written, then 130 is returned). A SIGTERM
while the server runs ends the process with 143 (:class:`mlaprop.server.Terminated`) after teardown.
:func:`evaluate` runs the same eval against a server someone else started.

Both write ``summary.json`` and ``items.jsonl`` to the report folder as they go: what finished is on disk
before any error propagates, and ``exit_code`` in the summary is what the process exits with. ``run`` also
keeps the server's log there as ``server.log`` (a fresh one each run), redacted after teardown
(:func:`mlaprop.redact.redact`). Verdict and progress lines go to ``out`` (stdout); errors, each one line
naming the cause, go to ``err`` (stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import math
import os
import shlex
import sys
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn, TextIO

from mlaprop import __version__
from mlaprop.determinism import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_PREFIX_LENGTHS,
    LONG_PROMPT,
    DeterminismResult,
    check_determinism,
)
from mlaprop.environment import Environment, InvalidEnvironment, LaunchPlan, LaunchRequest, Vendor
from mlaprop.evalclient import ClientConfig, EvalAborted, EvalResult, ItemRecord, run_mgsm
from mlaprop.mgsm import LANGUAGES, DatasetUnavailable, InvalidDataset, MgsmDataset, Parser, resolve_dataset
from mlaprop.redact import redact
from mlaprop.report import (
    ReportWriter,
    dataset_summary,
    determinism_summary,
    mgsm_summary,
    plan_summary,
    redact_file,
)
from mlaprop.stats import DEFAULT_GATE, Verdict

__all__ = [
    "EXIT_FAIL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "SIMSERVER_COMMAND",
    "SMOKE_QUESTIONS",
    "SMOKE_SERVER_ARGS",
    "EvalOptions",
    "RunOptions",
    "add_cli_commands",
    "check_base_url",
    "evaluate",
    "run",
    "smoke_request",
]

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
#: Ctrl-C (128 + SIGINT), the shell's convention.
EXIT_INTERRUPTED = 130

#: The simulated SGLang server (``--simulate``).
SIMSERVER_COMMAND: tuple[str, ...] = (sys.executable, "-m", "mlaprop.simserver")


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate and how; shared by ``mlaprop run`` and ``mlaprop eval``.

    Attributes:
        lang: MGSM language (``en`` is SGLang's gate).
        dataset: an MGSM TSV to use instead of the cached download.
        offline: never download the dataset.
        parser: the extractor whose score gates (both are always reported).
        gate: the score to reach.
        limit: only the first ``limit`` questions (``None``: all 250).
        concurrency: requests in flight.
        request_timeout_s: per-request read timeout, seconds.
        max_error_rate: stop once failed requests pass this share of the questions.
        report_dir: where ``summary.json`` and ``items.jsonl`` go.
        determinism: run the determinism check (``None`` in ``run``: when the plan is deterministic).
        batch_sizes: determinism batch sizes.
        prefix_lengths: determinism shared-prefix lengths, characters.
        model: the model name sent to the server (``None``: the first of ``/v1/models``).
        api_key: sent as a bearer token (``None``: the plan's ``--api-key``, if any).
        progress: show progress bars (``None``: on a terminal).
        gated: the score decides the verdict; ``False`` (smoke runs on random weights) reports it only.
    """

    lang: str = "en"
    dataset: str | None = None
    offline: bool = False
    parser: Parser = Parser.SIMPLE_EVALS
    gate: float = DEFAULT_GATE
    limit: int | None = None
    concurrency: int = 64
    request_timeout_s: float = 600.0
    max_error_rate: float = 0.05
    report_dir: Path = Path("mlaprop-report")
    determinism: bool | None = None
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    prefix_lengths: tuple[int, ...] = DEFAULT_PREFIX_LENGTHS
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    progress: bool | None = None
    gated: bool = True

    def client_config(self, api_key: str | None = None) -> ClientConfig:
        """The client settings these options imply."""
        return ClientConfig(
            concurrency=self.concurrency,
            request_timeout_s=self.request_timeout_s,
            max_error_rate=self.max_error_rate,
            api_key=self.api_key or api_key,
            progress=self.progress,
        )


@dataclass(frozen=True)
class RunOptions:
    """The main job's settings beyond the eval's.

    Attributes:
        request: what to ask of SGLang.
        environment: where the server runs; ``None`` detects it (with ``environ``).
        environ: environment variables for detection and preflight (``None``: ``os.environ``).
        simulate: run the simulated SGLang server instead of SGLang (no GPU needed).
        sim_accuracy: the simulated model's MGSM accuracy.
        sim_latency_s: the simulated server's delay per generation request, seconds.
        sim_args: more ``--sim-*`` arguments for the simulated server (fault injection).
        command_prefix: the server command before ``--model-path`` (default SGLang's launcher, or the
            simulator with ``simulate``).
        ready_timeout_s: how long the server may take to become ready, seconds.
        grace_s: seconds between SIGTERM and SIGKILL at teardown.
        echo_server_log: mirror the server log (redacted) to stderr.
        preflight: check GPU, SGLang and model before launching (real runs only).
        smoke: write a tiny random-weight MLA FP8 model (:mod:`mlaprop.tinymodel`) into the report folder and
            serve it with ``--load-format dummy`` instead of the request's model: a new runner image is
            checked end to end without 16 GB of weights.
    """

    request: LaunchRequest = field(default_factory=LaunchRequest)
    environment: Environment | None = None
    environ: Mapping[str, str] | None = None
    simulate: bool = False
    sim_accuracy: float = 0.9
    sim_latency_s: float = 0.02
    sim_args: tuple[str, ...] = ()
    command_prefix: tuple[str, ...] | None = None
    ready_timeout_s: float = 600.0
    grace_s: float = 10.0
    echo_server_log: bool = False
    preflight: bool = True
    smoke: bool = False


#: Extra server arguments in smoke mode: no weights to read (the dummy loader fills every parameter).
SMOKE_SERVER_ARGS: tuple[str, ...] = ("--load-format", "dummy")
#: Questions scored in smoke mode unless ``--limit`` says otherwise.
SMOKE_QUESTIONS = 16


def smoke_request(request: LaunchRequest, model_dir: Path) -> LaunchRequest:
    """The request served in smoke mode: the tiny model at ``model_dir`` with ``--load-format dummy`` (a
    user ``--load-format`` wins)."""
    extra = request.extra_args
    if not any(a == "--load-format" or a.startswith("--load-format=") for a in extra):
        extra = (*SMOKE_SERVER_ARGS, *extra)
    return replace(request, model=str(model_dir), extra_args=extra)


class _Job:
    """The summary being built, written to disk at every step.

    Raises:
        OSError: the report folder cannot be created or written (see :func:`_new_job`).
    """

    def __init__(self, command: str, opts: EvalOptions, out: TextIO, err: TextIO) -> None:
        self.out = out
        self.err = err
        self.opts = opts
        self.started = time.monotonic()
        self.stage = "dataset"
        self.records: list[ItemRecord] = []  # MGSM items as they finish (the partial result of an interrupt)
        self.writer = ReportWriter(opts.report_dir, opts.parser)
        self.timings: dict[str, float] = {}
        self.summary: dict[str, Any] = {
            "mlaprop_version": __version__,
            "command": command,
            "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "status": "running",
            "exit_code": None,
            "message": None,
            "gate": opts.gate,
            "gating_parser": Parser(opts.parser).value,
            "dataset": None,
            "environment": None,
            "plan": None,
            "server": None,
            "mgsm": None,
            "determinism": None,
            "timings_s": self.timings,
            "report": {"summary": str(self.writer.summary_path), "items": str(self.writer.items_path)},
        }
        self.save()

    def say(self, line: str) -> None:
        print(redact(line), file=self.out, flush=True)

    def error(self, line: str) -> None:
        print(redact(line), file=self.err, flush=True)

    def step(self, name: str, since: float) -> None:
        self.timings[name] = round(time.monotonic() - since, 3)

    def save(self) -> None:
        self.timings["total"] = round(time.monotonic() - self.started, 3)
        self.writer.write_summary(self.summary)

    def finish(self, status: str, code: int, message: str, *, error: bool = False) -> int:
        """Record the outcome and print ``message`` (to ``err`` when ``error``) and where the report is."""
        self.summary.update(status=status, exit_code=code, message=message)
        self.save()
        self.writer.close()
        (self.error if error else self.say)(message)
        if code != EXIT_OK and not error:
            self.error(message)  # a failed verdict names its cause on stderr too
        self.say(f"report: {self.writer.summary_path} (items: {self.writer.items_path})")
        return code

    def record(self, record: ItemRecord) -> None:
        self.records.append(record)
        self.writer.record(record)

    def stopped(self, exc: BaseException) -> int:
        """Record an exception that ends the job (interrupt, ``SystemExit``, a bug) with the exit code the
        process will end with; returns that code."""
        code = _exit_code_of(exc)
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self.summary["status"] == "running":
            status = "interrupted" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "error"
            self.summary["error"] = {"stage": self.stage, "type": type(exc).__name__, "message": str(exc)}
            self.finish(status, code, f"mlaprop: {status} ({detail}); partial report kept", error=True)
        elif self.summary["exit_code"] != code:  # after the verdict (during teardown)
            self.summary["exit_code"] = code
            self.summary["message"] = f"{self.summary['message']}; then ended by {detail}"
            self.save()
            self.error(f"mlaprop: ended by {detail} after the verdict; exit code {code}")
        return code

    def eval_mgsm(
        self, base_url: str, dataset: MgsmDataset, config: ClientConfig, is_alive: Callable[[], bool] | None
    ) -> EvalResult:
        opts = self.opts
        n = len(dataset) if opts.limit is None else min(len(dataset), opts.limit)
        self.say(
            f"MGSM-{dataset.lang}: {n} questions, concurrency {config.concurrency}, "
            f"gate {opts.gate:g} by the {Parser(opts.parser).value} parser"
        )
        since = time.monotonic()
        self.stage = "mgsm"
        self.records = []
        try:
            result = run_mgsm(
                base_url,
                dataset,
                config=config,
                model=opts.model,
                is_alive=is_alive,
                on_record=self.record,
                limit=opts.limit,
            )
        except EvalAborted as exc:
            self.step("mgsm", since)
            if isinstance(exc.partial, EvalResult):
                self.summary["mgsm"] = mgsm_summary(exc.partial, opts.parser, opts.gate)
            self.save()
            raise
        except BaseException as exc:  # Ctrl-C, SIGTERM: what was answered goes into the summary
            self.step("mgsm", since)
            why = f"interrupted ({type(exc).__name__})"
            done = tuple(sorted(self.records, key=lambda r: r.index))
            partial = EvalResult(dataset.lang, n, done, time.monotonic() - since, opts.model or "", why)
            self.summary["mgsm"] = mgsm_summary(partial, opts.parser, opts.gate)
            self.save()
            raise
        self.step("mgsm", since)
        self.summary["mgsm"] = mgsm_summary(result, opts.parser, opts.gate)
        self.save()
        self._print_scores(result)
        return result

    def _print_scores(self, result: EvalResult) -> None:
        opts = self.opts
        gating = Parser(opts.parser)
        for p in (gating, *(q for q in Parser if q is not gating)):
            s = result.score(p, opts.gate)
            label = f"{p.value} parser" + (" (gates)" if p is gating else "")
            self.say(f"  {label}: {s.describe() if s else 'no answers'}")
        m = self.summary["mgsm"]
        lat = m["latency_s"]
        tps = m["output_tokens_per_s"]
        self.say(
            f"  errors {result.errors}, parsers disagree on {len(result.disagreements)}; latency p50 "
            f"{_fmt(lat['p50'])} s, p95 {_fmt(lat['p95'])} s; "
            f"{_fmt(tps, 0)} output tokens/s; {result.wall_s:.1f} s"
        )

    def check_determinism(
        self, base_url: str, config: ClientConfig, is_alive: Callable[[], bool] | None
    ) -> DeterminismResult:
        opts = self.opts
        since = time.monotonic()
        self.stage = "determinism"
        result = check_determinism(
            base_url,
            batch_sizes=opts.batch_sizes,
            prefix_lengths=opts.prefix_lengths,
            config=config,
            is_alive=is_alive,
        )
        self.step("determinism", since)
        self.summary["determinism"] = determinism_summary(result)
        self.save()
        self.say(f"determinism: {result.reason}")
        return result

    def verdict(self, result: EvalResult, det: DeterminismResult | None) -> int:
        opts = self.opts
        verdict = result.verdict(opts.parser, opts.gate)
        s = result.score(opts.parser, opts.gate)
        what = s.describe() if s is not None else "no answers"
        parts = [f"MGSM-{result.lang} {what}"]
        if result.errors:
            parts.append(f"{result.errors} failed requests")
        if det is not None:
            parts.append("determinism " + ("passed" if det.passed else "FAILED"))
        detail = "; ".join(parts)
        if not opts.gated:
            if result.answered == 0:
                return self.finish("fail", EXIT_FAIL, f"verdict: FAIL - no question was answered; {detail}")
            if det is not None and not det.passed:
                return self.finish("determinism-failed", EXIT_FAIL, f"verdict: FAIL - {detail}")
            return self.finish(
                "pass", EXIT_OK, f"verdict: PASS (smoke: score reported, not gated) - {detail}"
            )
        if verdict is Verdict.PASS and (det is None or det.passed):
            return self.finish("pass", EXIT_OK, f"verdict: PASS - {detail}")
        if verdict is Verdict.INCONCLUSIVE:
            return self.finish(
                "inconclusive",
                EXIT_FAIL,
                f"verdict: INCONCLUSIVE - {detail}; failed requests could flip the gate",
            )
        status = "fail" if verdict is Verdict.FAIL else "determinism-failed"
        return self.finish(status, EXIT_FAIL, f"verdict: FAIL - {detail}")


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _exit_code_of(exc: BaseException) -> int:
    """The status a process ends with when ``exc`` ends it: 130 for Ctrl-C, a ``SystemExit``'s code (143
    for :class:`mlaprop.server.Terminated`), 1 for a traceback."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_FAIL)
    return EXIT_FAIL


def _report_dir_problem(path: Path, exc: OSError) -> str:
    """Why ``path`` cannot be the report folder, and what to pass instead."""
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


def _new_job(command: str, opts: EvalOptions, out: TextIO, err: TextIO) -> _Job | None:
    """The job, or ``None`` (and one error line on ``err``) when the report folder cannot be used."""
    try:
        return _Job(command, opts, out, err)
    except OSError as exc:
        print(f"mlaprop: error: {redact(_report_dir_problem(Path(opts.report_dir), exc))}", file=err)
        return None


def _finite(value: float, *, positive: bool) -> bool:
    return math.isfinite(value) and (value > 0 if positive else value >= 0)


def _option_problem(opts: EvalOptions, run_opts: RunOptions | None = None) -> str | None:
    """What is wrong with the options, checked before anything is written or launched (``None``: nothing).

    The command line refuses these in its argument types already; this catches them for library callers.
    """
    try:
        opts.client_config()
    except ValueError as exc:
        return f"{exc}; pass --concurrency >= 1, --request-timeout > 0 and --max-error-rate within [0, 1]"
    if not str(opts.report_dir).strip():
        return "--report-dir is empty; pass a folder path"
    if opts.limit is not None and opts.limit < 1:
        return f"--limit must be >= 1, got {opts.limit}"
    if not (isinstance(opts.gate, (int, float)) and 0.0 <= opts.gate <= 1.0):
        return f"--gate must be within [0, 1], got {opts.gate}"
    if not opts.batch_sizes or any(not 1 <= b <= MAX_BATCH_SIZE for b in opts.batch_sizes):
        sizes = ",".join(map(str, opts.batch_sizes)) or "(none)"
        return f"--batch-sizes must list whole numbers from 1 to {MAX_BATCH_SIZE}, got {sizes}"
    if any(not 1 <= n <= len(LONG_PROMPT) for n in opts.prefix_lengths):
        return (
            f"--prefix-lengths must be between 1 and {len(LONG_PROMPT)} characters, "
            f"got {','.join(map(str, opts.prefix_lengths))}"
        )
    if run_opts is not None:
        if not _finite(run_opts.ready_timeout_s, positive=True):
            return f"--ready-timeout must be a number of seconds > 0, got {run_opts.ready_timeout_s}"
        if not _finite(run_opts.grace_s, positive=False):
            return f"the teardown grace must be a number of seconds >= 0, got {run_opts.grace_s}"
        if not _finite(run_opts.sim_latency_s, positive=False):
            return f"--sim-latency must be a number of seconds >= 0, got {run_opts.sim_latency_s}"
        if not 0.0 <= run_opts.sim_accuracy <= 1.0:
            return f"--sim-accuracy must be within [0, 1], got {run_opts.sim_accuracy}"
    return None


def _load_dataset(job: _Job, opts: EvalOptions) -> MgsmDataset | None:
    since = time.monotonic()
    try:
        dataset = resolve_dataset(opts.lang, opts.dataset, download=not opts.offline)
    except (InvalidDataset, DatasetUnavailable) as exc:
        job.summary["error"] = {"stage": "dataset", "type": type(exc).__name__, "message": str(exc)}
        job.finish("error", EXIT_USAGE, f"mlaprop: dataset error: {exc}", error=True)
        return None
    job.step("dataset", since)
    job.summary["dataset"] = dataset_summary(dataset)
    if not dataset.canonical:
        job.say(
            f"note: {dataset.path} is not the published MGSM-{dataset.lang} file; scores are not comparable"
        )
    return dataset


def _sim_args(env: Environment, dataset: MgsmDataset, run_opts: RunOptions) -> list[str]:
    return [
        "--sim-platform",
        "rocm" if env.vendor is Vendor.AMD else "cuda",
        "--sim-arch",
        env.arch or ("gfx942" if env.vendor is Vendor.AMD else "sm90"),
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


def run(
    run_opts: RunOptions,
    opts: EvalOptions,
    *,
    plan_to_dict: Callable[[LaunchPlan], dict[str, Any]] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """The main job. Returns the exit code (0 pass, 1 failed, 2 usage/environment error, 130 interrupted;
    see the module).

    Option, report-folder, dataset and plan problems are found before any server is launched (one
    ``mlaprop: error:`` line on ``err``, exit 2). The server is always torn down. ``plan_to_dict`` renders the
    plan into the report (default: :func:`mlaprop.cli.plan_to_dict`). ``out`` (default stdout) gets progress
    and the verdict, ``err`` (default stderr) the errors.

    Raises:
        mlaprop.server.Terminated: SIGTERM while the server ran, after teardown and the partial summary
            (status ``interrupted``, exit code 143). Ctrl-C is not raised: the same happens and 130 is
            returned.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    problem = _option_problem(opts, run_opts)
    if problem is not None:
        print(f"mlaprop: error: {problem}", file=err)
        return EXIT_USAGE
    job = _new_job("run --simulate" if run_opts.simulate else "run", opts, out, err)
    if job is None:
        return EXIT_USAGE
    try:
        return _run_job(job, run_opts, opts, plan_to_dict)
    except KeyboardInterrupt as exc:
        return job.stopped(exc)
    except BaseException as exc:
        job.stopped(exc)
        raise


def _run_job(
    job: _Job,
    run_opts: RunOptions,
    opts: EvalOptions,
    plan_to_dict: Callable[[LaunchPlan], dict[str, Any]] | None,
) -> int:
    from mlaprop import server as srv
    from mlaprop.cli import plan_to_dict as default_render
    from mlaprop.compose import UnsupportedCombination, compose
    from mlaprop.detect import detect_environment
    from mlaprop.preflight import PreflightError, preflight
    from mlaprop.tinymodel import TinyModelError, write_tiny_mla

    render = plan_to_dict or default_render

    dataset = _load_dataset(job, opts)
    if dataset is None:
        return EXIT_USAGE
    since = time.monotonic()
    job.stage = "compose"
    try:
        env = run_opts.environment or detect_environment(run_opts.environ)
        request = run_opts.request
        if run_opts.smoke:
            model_dir = write_tiny_mla(opts.report_dir / "tiny-mla-fp8")
            request = smoke_request(request, model_dir)
            job.say(f"smoke: tiny MLA FP8 model (random weights) at {model_dir}; score reported, not gated")
        job.summary["environment"] = {
            "vendor": env.vendor.value,
            "arch": env.arch,
            "gpu_count": env.gpu_count,
            "sglang_version": env.sglang_version,
            "notes": list(env.notes),
        }
        plan = compose(env, request)
        job.summary["plan"] = plan_summary(render(plan))
        if run_opts.preflight and not run_opts.simulate:
            preflight(env, expect=None, model=plan.model, environ=run_opts.environ)
    except (InvalidEnvironment, UnsupportedCombination, PreflightError, TinyModelError) as exc:
        job.summary["error"] = {"stage": "compose", "type": type(exc).__name__, "message": str(exc)}
        return job.finish("error", EXIT_USAGE, f"mlaprop: error: {type(exc).__name__}: {exc}", error=True)
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
    config = opts.client_config(plan.option("--api-key"))
    log_path = opts.report_dir / "server.log"
    try:  # the launcher appends: each run starts its own log
        log_path.unlink(missing_ok=True)
    except OSError as exc:
        job.summary["error"] = {"stage": "launch", "type": type(exc).__name__, "message": str(exc)}
        return job.finish(
            "error",
            EXIT_USAGE,
            f"mlaprop: error: cannot replace the previous server log {log_path} ({exc.strerror or exc}); "
            "remove it, or pass another --report-dir",
            error=True,
        )
    since = time.monotonic()
    job.stage = "launch"
    code: int | None = None
    try:
        with srv.launch(
            plan,
            command_prefix=prefix,
            extra_args=extra,
            log_path=log_path,
            echo=run_opts.echo_server_log,
            ready_timeout=run_opts.ready_timeout_s,
            grace=run_opts.grace_s,
        ) as server:
            job.step("launch", since)
            job.summary["server"] = {
                "base_url": server.base_url,
                "command": server.command,
                "log": str(server.log_path),
            }
            job.save()
            job.say(
                f"server ready in {job.timings['launch']:.1f} s at {server.base_url} (log: {server.log_path})"
            )
            try:
                result = job.eval_mgsm(server.base_url, dataset, config, server.alive)
            except EvalAborted as exc:
                code = _aborted(job, exc, server.log_tail(5))
            else:
                det = job.check_determinism(server.base_url, config, server.alive) if wants_det else None
                code = job.verdict(result, det)
            since = time.monotonic()
            job.stage = "teardown"
        job.step("teardown", since)
        job.save()
        return code
    except srv.ServerTeardownError as exc:
        # the verdict, if one was reached, stays in the report; processes left behind fail the run
        job.summary["teardown_error"] = str(exc)
        job.summary.update(status="teardown-failed", exit_code=EXIT_FAIL)
        job.save()
        job.error(f"mlaprop: server teardown failed: {exc.headline}")
        return EXIT_FAIL
    except srv.ServerError as exc:  # could not start (teardown failures are handled above)
        job.step("launch", since)
        job.summary["error"] = {"stage": "launch", "type": type(exc).__name__, "message": str(exc)}
        return job.finish(
            "server-failed", EXIT_FAIL, f"mlaprop: the server failed: {exc.headline}", error=True
        )
    finally:
        with contextlib.suppress(OSError):  # the raw log holds what the server printed, secrets included
            redact_file(log_path)


def _aborted(job: _Job, exc: EvalAborted, tail: Sequence[str]) -> int:
    m = job.summary.get("mgsm") or {}
    done = (
        f"{m.get('answered', 0)} answered, {m.get('errors', 0)} failed, {m.get('missing', '?')} not finished"
    )
    job.summary["error"] = {
        "stage": "mgsm",
        "type": "EvalAborted",
        "message": exc.reason,
        "log_tail": list(tail),
    }
    return job.finish("aborted", EXIT_FAIL, f"verdict: ABORTED - {exc.reason} ({done})", error=True)


def evaluate(
    base_url: str, opts: EvalOptions, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """``mlaprop eval``: the MGSM eval (and, with ``opts.determinism``, the determinism check) against a
    running server at ``base_url``. Returns the exit code (0 pass, 1 failed or aborted, 2 usage or dataset
    error, 130 interrupted: the partial report is written first). ``out`` and ``err`` as in :func:`run`.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        base_url = check_base_url(base_url)
    except ValueError as exc:
        print(f"mlaprop: error: --base-url: {exc}", file=err)
        return EXIT_USAGE
    problem = _option_problem(opts)
    if problem is not None:
        print(f"mlaprop: error: {problem}", file=err)
        return EXIT_USAGE
    job = _new_job(f"eval --base-url {base_url}", opts, out, err)
    if job is None:
        return EXIT_USAGE
    try:
        dataset = _load_dataset(job, opts)
        if dataset is None:
            return EXIT_USAGE
        job.summary["server"] = {"base_url": base_url}
        config = opts.client_config()
        try:
            result = job.eval_mgsm(base_url, dataset, config, None)
        except EvalAborted as exc:
            return _aborted(job, exc, ())
        det = job.check_determinism(base_url, config, None) if opts.determinism else None
        return job.verdict(result, det)
    except KeyboardInterrupt as exc:
        return job.stopped(exc)
    except BaseException as exc:
        job.stopped(exc)
        raise


def check_base_url(text: str) -> str:
    """``text`` if it is an ``http://`` or ``https://`` URL with a host (and a valid port, if any).

    Raises:
        ValueError: what is wrong, and an example of a good one.
    """
    example = "such as http://127.0.0.1:30000"
    stripped = text.strip()
    if not stripped:
        raise ValueError(f"the URL is empty; pass the server's address, {example}")
    parts = urllib.parse.urlsplit(stripped)
    if parts.scheme not in ("http", "https"):
        hint = f" (did you mean http://{stripped}?)" if "://" not in stripped else ""
        raise ValueError(f"{text!r} is not an http:// or https:// URL{hint}; pass one {example}")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.hostname or port == -1:
        what = "no host" if not parts.hostname else "an invalid port"
        raise ValueError(f"{text!r} has {what}; pass a URL {example}")
    return stripped


# --------------------------------------------------------------------------------------------- CLI


def _numbers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated whole numbers such as 1,2,4, got {text!r}"
        ) from None


#: The largest determinism batch: enough to show batch dependence, small enough to finish in bounded time.
MAX_BATCH_SIZE = 1024


def _batch_sizes(text: str) -> tuple[int, ...]:
    values = _numbers(text)
    if not values or any(not 1 <= v <= MAX_BATCH_SIZE for v in values):
        raise argparse.ArgumentTypeError(
            f"expected one or more batch sizes from 1 to {MAX_BATCH_SIZE} such as 1,2,4,8,16, got {text!r}"
        )
    return values


def _prefix_lengths(text: str) -> tuple[int, ...]:
    values = _numbers(text)
    if any(not 0 <= v <= len(LONG_PROMPT) for v in values):
        raise argparse.ArgumentTypeError(
            f"expected lengths between 0 (skip) and {len(LONG_PROMPT)} characters, got {text!r}"
        )
    return tuple(v for v in values if v > 0)


def _seconds(text: str, *, positive: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not _finite(value, positive=positive):
        want = "> 0" if positive else ">= 0"
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds {want}, got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    return _seconds(text, positive=True)


def _non_negative_seconds(text: str) -> float:
    return _seconds(text, positive=False)


def _report_dir(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "the path is empty; pass a folder, such as --report-dir mlaprop-report"
        )
    return Path(text)


def _shell_words(text: str) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"not valid shell quoting ({exc}): {text!r}; close every quote, e.g. --sim-args='--sim-seed 3'"
        ) from None


def _url(text: str) -> str:
    try:
        return check_base_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {value}")
    return value


def _add_eval_options(p: argparse.ArgumentParser, *, in_run: bool) -> None:
    g = p.add_argument_group("eval")
    g.add_argument("--lang", default="en", choices=LANGUAGES, help="MGSM language (default: %(default)s)")
    g.add_argument("--dataset", metavar="PATH", help="MGSM TSV to use instead of downloading it")
    g.add_argument(
        "--offline", action="store_true", help="never download the dataset (use the cache or --dataset)"
    )
    g.add_argument(
        "--parser",
        default=Parser.SIMPLE_EVALS.value,
        choices=[q.value for q in Parser],
        help="answer extractor that gates; both are reported (default: %(default)s, SGLang's)",
    )
    g.add_argument(
        "--gate", type=_fraction, default=DEFAULT_GATE, help="score to reach (default: %(default)s)"
    )
    g.add_argument("--limit", type=_positive_int, metavar="N", help="only the first N questions (smoke runs)")
    g.add_argument(
        "--concurrency", type=_positive_int, default=64, help="requests in flight (default: %(default)s)"
    )
    g.add_argument(
        "--request-timeout",
        type=_positive_seconds,
        default=600.0,
        metavar="S",
        help="per-request timeout (default: %(default)s)",
    )
    g.add_argument(
        "--max-error-rate",
        type=_fraction,
        default=0.05,
        metavar="P",
        help="stop once failed requests pass this share (default: %(default)s)",
    )
    g.add_argument(
        "--report-dir",
        type=_report_dir,
        default=Path("mlaprop-report"),
        help="report folder (default: %(default)s)",
    )
    g.add_argument(
        "--served-model", metavar="NAME", help="model name in requests (default: first of /v1/models)"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    d = p.add_argument_group("determinism")
    if in_run:
        d.add_argument(
            "--determinism",
            choices=("auto", "on", "off"),
            default="auto",
            help="run the check: auto = when the plan is deterministic (default)",
        )
    else:
        d.add_argument("--determinism", action="store_true", help="also run the determinism check")
    d.add_argument(
        "--batch-sizes",
        type=_batch_sizes,
        default=DEFAULT_BATCH_SIZES,
        metavar="N,N",
        help="determinism batch sizes, each >= 1 (default: 1,2,4,8,16)",
    )
    d.add_argument(
        "--prefix-lengths",
        type=_prefix_lengths,
        default=DEFAULT_PREFIX_LENGTHS,
        metavar="N,N",
        help="shared-prefix prompt lengths in characters; 0 skips (default: 1,511,2048,4097)",
    )


def _eval_options(args: argparse.Namespace, determinism: bool | None, api_key: str | None) -> EvalOptions:
    return EvalOptions(
        lang=args.lang,
        dataset=args.dataset,
        offline=args.offline,
        parser=Parser(args.parser),
        gate=args.gate,
        limit=args.limit,
        concurrency=args.concurrency,
        request_timeout_s=args.request_timeout,
        max_error_rate=args.max_error_rate,
        report_dir=args.report_dir,
        determinism=determinism,
        batch_sizes=args.batch_sizes,
        prefix_lengths=args.prefix_lengths,
        model=args.served_model,
        api_key=api_key,
        progress=False if args.no_progress else None,
    )


def _cmd_run(args: argparse.Namespace, environ: Mapping[str, str] | None) -> int:
    from mlaprop import cli

    if args.simulate and not args.vendor and not args.arch:
        args.vendor, args.arch = "nvidia", "sm90"  # the H200 CI runner
    try:
        request = cli._request_from_args(args)
        env = cli._environment_from_args(args, environ)
    except InvalidEnvironment as exc:
        print(f"mlaprop: error: InvalidEnvironment: {exc}", file=sys.stderr)
        return EXIT_USAGE
    determinism = {"auto": None, "on": True, "off": False}[args.determinism]
    run_opts = RunOptions(
        request=request,
        environment=env,
        environ=environ,
        simulate=args.simulate,
        sim_accuracy=args.sim_accuracy,
        sim_latency_s=args.sim_latency,
        sim_args=args.sim_args,
        ready_timeout_s=args.ready_timeout,
        echo_server_log=args.server_log,
        smoke=args.smoke,
    )
    opts = _eval_options(args, determinism, None)
    if args.smoke:
        opts = replace(opts, gated=False, limit=opts.limit or SMOKE_QUESTIONS)
    return run(run_opts, opts, plan_to_dict=cli.plan_to_dict)


def _header_safe(value: str) -> bool:
    """Printable ASCII only: what an HTTP header value (``Authorization: Bearer KEY``) can carry."""
    return value.isascii() and value.isprintable()


def _cmd_eval(args: argparse.Namespace, environ: Mapping[str, str] | None) -> int:
    env = os.environ if environ is None else environ
    api_key = None
    if args.api_key_env:
        api_key = env.get(args.api_key_env)
        if api_key and not _header_safe(api_key):
            print(
                f"mlaprop: error: --api-key-env {args.api_key_env}: the key holds characters other than "
                "printable ASCII, which an HTTP Authorization header cannot carry; use the server's ASCII key",
                file=sys.stderr,
            )
            return EXIT_USAGE
        if not api_key:
            state = "is not set" if api_key is None else "is empty"
            print(
                f"mlaprop: error: --api-key-env {args.api_key_env}: the environment variable "
                f"{args.api_key_env} {state}; export it with the server's --api-key, or leave out "
                "--api-key-env for a server without a key",
                file=sys.stderr,
            )
            return EXIT_USAGE
    return evaluate(args.base_url, _eval_options(args, bool(args.determinism), api_key))


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Usage errors of ``parser`` print one ``mlaprop: error:`` line (no usage block) and exit 2, so the
    first line on stderr names the cause."""

    def error(message: str) -> NoReturn:
        parser.exit(EXIT_USAGE, f"mlaprop: error: {message} (see {parser.prog} --help)\n")

    parser.error = error  # type: ignore[method-assign]


def add_cli_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``run`` and ``eval`` to ``mlaprop``'s subcommands (called by :func:`mlaprop.cli.build_parser`)."""
    from mlaprop import cli

    p_run = sub.add_parser(
        "run",
        help="launch the server, run MGSM (and the determinism check), report, tear down",
        description="detect -> compose -> launch -> MGSM -> determinism -> report -> teardown. "
        "Exit 0 pass, 1 failed, 2 usage or environment error, 130 interrupted.",
    )
    cli._add_platform_options(p_run)
    cli._add_request_options(p_run)
    _add_eval_options(p_run, in_run=True)
    s = p_run.add_argument_group("server")
    s.add_argument(
        "--simulate",
        action="store_true",
        help="use the simulated SGLang server (no GPU; platform defaults to nvidia sm90)",
    )
    s.add_argument(
        "--sim-accuracy",
        type=_fraction,
        default=0.9,
        metavar="P",
        help="simulated MGSM accuracy (default: 0.9)",
    )
    s.add_argument(
        "--sim-latency",
        type=_non_negative_seconds,
        default=0.02,
        metavar="S",
        help="simulated seconds per request (default: 0.02)",
    )
    s.add_argument(
        "--sim-args",
        type=_shell_words,
        default=(),
        metavar="ARGS",
        help="more --sim-* flags for the simulated server, as one shell-quoted string",
    )
    s.add_argument(
        "--ready-timeout",
        type=_positive_seconds,
        default=600.0,
        metavar="S",
        help="server start timeout (default: %(default)s)",
    )
    s.add_argument("--server-log", action="store_true", help="mirror the server log to stderr")
    s.add_argument(
        "--smoke",
        action="store_true",
        help="serve a tiny random-weight MLA FP8 model with --load-format dummy instead of --model; score "
        f"{SMOKE_QUESTIONS} questions (or --limit) and report the score without gating",
    )
    p_run.set_defaults(func=_cmd_run)
    _one_line_errors(p_run)

    p_eval = sub.add_parser(
        "eval",
        help="run the MGSM eval against a running server",
        description="MGSM eval against a server someone else started. Exit 0 pass, 1 failed, 2 usage or "
        "dataset error, 130 interrupted.",
    )
    p_eval.add_argument(
        "--base-url", required=True, type=_url, help="the server, e.g. http://127.0.0.1:30000"
    )
    p_eval.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="environment variable holding the server's --api-key (sent as bearer)",
    )
    _add_eval_options(p_eval, in_run=False)
    p_eval.set_defaults(func=_cmd_eval)
    _one_line_errors(p_eval)
