"""The main job: detect -> compose -> launch -> MGSM -> determinism -> report -> teardown.

:func:`run` returns an exit code: 0 the gate (and, when the plan has ``--enable-deterministic-inference``, the
determinism check) passed; 1 the gate or determinism failed, the eval could not finish (the server died,
too many failed requests, a verdict failed requests could flip), or the server failed to start or stop;
2 a usage or environment error (bad dataset, dataset unavailable, impossible plan, no GPU), found before any
server is launched. :func:`evaluate` runs the same eval against a server someone else started.

Both write ``summary.json`` and ``items.jsonl`` to the report folder as they go: what finished is on disk
before any error propagates. ``run`` also keeps the server's log there as ``server.log``, redacted after
teardown (:func:`mlaprop.redact.redact`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from mlaprop import __version__
from mlaprop.determinism import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_PREFIX_LENGTHS,
    DeterminismResult,
    check_determinism,
)
from mlaprop.environment import Environment, InvalidEnvironment, LaunchPlan, LaunchRequest, Vendor
from mlaprop.evalclient import ClientConfig, EvalAborted, EvalResult, run_mgsm
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
    "EXIT_OK",
    "EXIT_USAGE",
    "SIMSERVER_COMMAND",
    "SMOKE_QUESTIONS",
    "SMOKE_SERVER_ARGS",
    "EvalOptions",
    "RunOptions",
    "add_cli_commands",
    "evaluate",
    "run",
    "smoke_request",
]

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

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
    """The summary being built, written to disk at every step."""

    def __init__(self, command: str, opts: EvalOptions, out: TextIO) -> None:
        self.out = out
        self.opts = opts
        self.started = time.monotonic()
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

    def step(self, name: str, since: float) -> None:
        self.timings[name] = round(time.monotonic() - since, 3)

    def save(self) -> None:
        self.timings["total"] = round(time.monotonic() - self.started, 3)
        self.writer.write_summary(self.summary)

    def finish(self, status: str, code: int, message: str) -> int:
        self.summary.update(status=status, exit_code=code, message=message)
        self.save()
        self.writer.close()
        self.say(message)
        self.say(f"report: {self.writer.summary_path} (items: {self.writer.items_path})")
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
        try:
            result = run_mgsm(
                base_url,
                dataset,
                config=config,
                model=opts.model,
                is_alive=is_alive,
                on_record=self.writer.record,
                limit=opts.limit,
            )
        except EvalAborted as exc:
            self.step("mgsm", since)
            if isinstance(exc.partial, EvalResult):
                self.summary["mgsm"] = mgsm_summary(exc.partial, opts.parser, opts.gate)
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


def _load_dataset(job: _Job, opts: EvalOptions) -> MgsmDataset | None:
    since = time.monotonic()
    try:
        dataset = resolve_dataset(opts.lang, opts.dataset, download=not opts.offline)
    except (InvalidDataset, DatasetUnavailable) as exc:
        job.summary["error"] = {"stage": "dataset", "type": type(exc).__name__, "message": str(exc)}
        job.finish("error", EXIT_USAGE, f"mlaprop: dataset error: {exc}")
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
) -> int:
    """The main job. Returns the exit code (0 pass, 1 failed, 2 usage/environment error; see the module).

    Dataset and plan problems are found before any server is launched. The server is always torn down.
    ``plan_to_dict`` renders the plan into the report (default: :func:`mlaprop.cli.plan_to_dict`).

    Raises:
        KeyboardInterrupt, mlaprop.server.Terminated: after the server is torn down and the partial
            summary written (status ``interrupted``).
    """
    from mlaprop import server as srv
    from mlaprop.cli import plan_to_dict as default_render
    from mlaprop.compose import UnsupportedCombination, compose
    from mlaprop.detect import detect_environment
    from mlaprop.preflight import PreflightError, preflight
    from mlaprop.tinymodel import TinyModelError, write_tiny_mla

    render = plan_to_dict or default_render

    job = _Job("run --simulate" if run_opts.simulate else "run", opts, out or sys.stdout)
    dataset = _load_dataset(job, opts)
    if dataset is None:
        return EXIT_USAGE
    since = time.monotonic()
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
        return job.finish("error", EXIT_USAGE, f"mlaprop: {type(exc).__name__}: {exc}")
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
    since = time.monotonic()
    code: int | None = None
    try:
        with srv.launch(
            plan,
            command_prefix=prefix,
            extra_args=extra,
            log_path=opts.report_dir / "server.log",
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
        job.step("teardown", since)
        job.save()
        return code
    except srv.ServerTeardownError as exc:
        # the verdict, if one was reached, stays in the report; processes left behind fail the run
        job.summary["teardown_error"] = str(exc)
        job.summary.update(status="teardown-failed", exit_code=EXIT_FAIL)
        job.save()
        job.say(f"mlaprop: server teardown failed: {exc.headline}")
        return EXIT_FAIL
    except srv.ServerError as exc:  # could not start (teardown failures are handled above)
        job.step("launch", since)
        job.summary["error"] = {"stage": "launch", "type": type(exc).__name__, "message": str(exc)}
        return job.finish("server-failed", EXIT_FAIL, f"mlaprop: the server failed: {exc.headline}")
    except BaseException as exc:
        if job.summary["status"] == "running":
            status = "interrupted" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "error"
            job.summary["error"] = {"stage": "run", "type": type(exc).__name__, "message": str(exc)}
            job.finish(status, EXIT_FAIL, f"mlaprop: {status} ({type(exc).__name__}); partial report kept")
        raise
    finally:
        with contextlib.suppress(OSError):  # the raw log holds what the server printed, secrets included
            redact_file(opts.report_dir / "server.log")


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
    return job.finish("aborted", EXIT_FAIL, f"verdict: ABORTED - {exc.reason} ({done})")


def evaluate(base_url: str, opts: EvalOptions, *, out: TextIO | None = None) -> int:
    """``mlaprop eval``: the MGSM eval (and, with ``opts.determinism``, the determinism check) against a
    running server at ``base_url``. Returns the exit code (0 pass, 1 failed or aborted, 2 dataset error).
    """
    job = _Job(f"eval --base-url {base_url}", opts, out or sys.stdout)
    dataset = _load_dataset(job, opts)
    if dataset is None:
        return EXIT_USAGE
    job.summary["server"] = {"base_url": base_url}
    config = opts.client_config()
    try:
        result = job.eval_mgsm(base_url, dataset, config, None)
    except EvalAborted as exc:
        return _aborted(job, exc, ())
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "error"
        job.summary["error"] = {"stage": "mgsm", "type": type(exc).__name__, "message": str(exc)}
        job.finish(status, EXIT_FAIL, f"mlaprop: {status} ({type(exc).__name__}); partial report kept")
        raise
    det = job.check_determinism(base_url, config, None) if opts.determinism else None
    return job.verdict(result, det)


# --------------------------------------------------------------------------------------------- CLI


def _sizes(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers >= 0, got {text!r}")
    return tuple(v for v in values if v > 0)


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
        type=float,
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
        "--report-dir", type=Path, default=Path("mlaprop-report"), help="report folder (default: %(default)s)"
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
        "--batch-sizes", type=_sizes, default=DEFAULT_BATCH_SIZES, metavar="N,N", help="default: 1,2,4,8,16"
    )
    d.add_argument(
        "--prefix-lengths",
        type=_sizes,
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
        batch_sizes=args.batch_sizes or DEFAULT_BATCH_SIZES,
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
        sim_args=tuple(shlex.split(args.sim_args)),
        ready_timeout_s=args.ready_timeout,
        echo_server_log=args.server_log,
        smoke=args.smoke,
    )
    opts = _eval_options(args, determinism, None)
    if args.smoke:
        opts = replace(opts, gated=False, limit=opts.limit or SMOKE_QUESTIONS)
    return run(run_opts, opts, plan_to_dict=cli.plan_to_dict)


def _cmd_eval(args: argparse.Namespace, environ: Mapping[str, str] | None) -> int:
    import os

    env = os.environ if environ is None else environ
    api_key = env.get(args.api_key_env) if args.api_key_env else None
    return evaluate(args.base_url, _eval_options(args, bool(args.determinism), api_key))


def add_cli_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``run`` and ``eval`` to ``mlaprop``'s subcommands (called by :func:`mlaprop.cli.build_parser`)."""
    from mlaprop import cli

    p_run = sub.add_parser(
        "run",
        help="launch the server, run MGSM (and the determinism check), report, tear down",
        description="detect -> compose -> launch -> MGSM -> determinism -> report -> teardown. "
        "Exit 0 pass, 1 failed, 2 usage or environment error.",
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
        type=float,
        default=0.02,
        metavar="S",
        help="simulated seconds per request (default: 0.02)",
    )
    s.add_argument(
        "--sim-args", default="", metavar="ARGS", help="more --sim-* flags for the simulated server"
    )
    s.add_argument(
        "--ready-timeout",
        type=float,
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

    p_eval = sub.add_parser(
        "eval",
        help="run the MGSM eval against a running server",
        description="MGSM eval against a server someone else started. Exit 0 pass, 1 failed, 2 dataset error.",
    )
    p_eval.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:30000")
    p_eval.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="environment variable holding the server's --api-key (sent as bearer)",
    )
    _add_eval_options(p_eval, in_run=False)
    p_eval.set_defaults(func=_cmd_eval)
