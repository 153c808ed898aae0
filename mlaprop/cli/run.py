"""``mlaprop run`` and ``mlaprop eval``: parse the command line into :mod:`mlaprop.options` and call
:mod:`mlaprop.job`. Every option's rule is the options module's validator, used here as the argparse type.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from types import FrameType

from mlaprop import options as o
from mlaprop.detect import simulation_platform
from mlaprop.determinism import DEFAULT_BATCH_SIZES, DEFAULT_PREFIX_LENGTHS
from mlaprop.environment import Vendor
from mlaprop.exitcodes import ExitCode
from mlaprop.job import evaluate, run
from mlaprop.mgsm import LANGUAGES, Parser
from mlaprop.options import (
    CANARY_GATE,
    SMOKE_MODEL_VARIABLE,
    SMOKE_QUESTIONS,
    EvalOptions,
    InvalidOptions,
    RunOptions,
    SmokeModel,
)
from mlaprop.report import Reporter
from mlaprop.server import Terminated
from mlaprop.stats import DEFAULT_GATE

from .common import (
    add_platform_options,
    add_request_options,
    arg_type,
    environment_for,
    one_line_errors,
    platform_from_args,
    request_from_args,
)

__all__ = ["add_eval", "add_run"]

#: Defaults the command line takes from the environment (the same variables the GPU tests read).
DATASET_VARIABLE = "MLAPROP_DATASET"
REPORT_DIR_VARIABLE = "MLAPROP_REPORT_DIR"
DEFAULT_REPORT_DIR = "mlaprop-report"

_EXIT_HELP = (
    "Exit 0 pass, 1 quality failure (gate, determinism), 2 usage or environment error before launch, "
    "3 infrastructure failure (server, aborted eval, teardown), 130/143/129 interrupted (SIGINT/SIGTERM/SIGHUP)."
)


def _add_eval_options(p: argparse.ArgumentParser, *, in_run: bool) -> None:
    g = p.add_argument_group("eval")
    g.add_argument("--lang", default="en", choices=LANGUAGES, help="MGSM language (default: %(default)s)")
    g.add_argument(
        "--dataset", metavar="PATH", help=f"MGSM TSV to use instead of downloading it ({DATASET_VARIABLE})"
    )
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
        "--gate",
        type=arg_type(o.fraction),
        default=None,
        help=f"score to reach (default: {DEFAULT_GATE}; {CANARY_GATE} for the canary in smoke mode)",
    )
    g.add_argument(
        "--limit", type=arg_type(o.positive_int), metavar="N", help="only the first N questions (smoke runs)"
    )
    g.add_argument(
        "--concurrency",
        type=arg_type(o.positive_int),
        default=None,
        help="requests in flight (default: every question in one wave, as SGLang's MLA FP8 test sends them, "
        "up to 1024, capped by the server's max_running_requests)",
    )
    g.add_argument(
        "--request-timeout",
        type=arg_type(o.positive_seconds),
        default=600.0,
        metavar="S",
        help="per-request timeout (default: %(default)s)",
    )
    g.add_argument(
        "--max-error-rate",
        type=arg_type(o.fraction),
        default=0.05,
        metavar="P",
        help="stop once failed requests pass this share (default: %(default)s)",
    )
    g.add_argument(
        "--report-dir",
        type=arg_type(o.report_dir),
        help=f"report folder (default: ${REPORT_DIR_VARIABLE}, else {DEFAULT_REPORT_DIR})",
    )
    g.add_argument(
        "--served-model", metavar="NAME", help="model name in requests (default: first of /v1/models)"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    g.add_argument(
        "--heartbeat",
        type=arg_type(o.non_negative_seconds),
        default=o.DEFAULT_HEARTBEAT_S,
        metavar="S",
        help="outside a terminal, a progress line every S seconds; 0 for none (default: %(default)s)",
    )
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
        type=arg_type(o.batch_sizes),
        default=DEFAULT_BATCH_SIZES,
        metavar="N,N",
        help="determinism wave sizes, each >= 1, capped at the server's max_running_requests "
        f"(default: {','.join(map(str, DEFAULT_BATCH_SIZES))})",
    )
    d.add_argument(
        "--prefix-lengths",
        type=arg_type(o.prefix_lengths),
        default=DEFAULT_PREFIX_LENGTHS,
        metavar="N,N",
        help="shared-prefix prompt lengths in characters; 0 skips (default: 1,511,2048,4097)",
    )


def _eval_options(
    args: argparse.Namespace, environ: Mapping[str, str], determinism: bool | None, api_key: str | None
) -> EvalOptions:
    return EvalOptions(
        lang=args.lang,
        dataset=args.dataset or environ.get(DATASET_VARIABLE) or None,
        offline=args.offline,
        parser=Parser(args.parser),
        gate=DEFAULT_GATE if args.gate is None else args.gate,
        limit=args.limit,
        concurrency=args.concurrency,
        request_timeout_s=args.request_timeout,
        max_error_rate=args.max_error_rate,
        report_dir=Path(args.report_dir or environ.get(REPORT_DIR_VARIABLE) or DEFAULT_REPORT_DIR),
        determinism=determinism,
        batch_sizes=args.batch_sizes,
        prefix_lengths=args.prefix_lengths,
        model=args.served_model,
        api_key=api_key,
        progress=False if args.no_progress else None,
        heartbeat_s=args.heartbeat,
    )


#: GitHub Actions' step summary file: a Markdown report is appended there when it is set.
STEP_SUMMARY_VARIABLE = "GITHUB_STEP_SUMMARY"


def _reporter(env_vars: Mapping[str, str]) -> Reporter:
    return Reporter(step_summary_path=env_vars.get(STEP_SUMMARY_VARIABLE) or None)


@contextlib.contextmanager
def _signals_end_the_job(reporter: Reporter) -> Iterator[None]:
    """While the job runs: SIGHUP and SIGTERM raise :class:`mlaprop.server.Terminated` (exit 128 + signal)
    so the report records how it ended instead of staying at ``running`` (the launcher installs its own
    SIGTERM handler while a server runs); the first SIGINT raises ``KeyboardInterrupt`` and later ones are
    ignored, so a second Ctrl-C cannot kill the process by signal while it tears down and writes the
    report (teardown is bounded: the grace period plus about 10 s). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    interrupts = 0

    def terminated(signum: int, frame: FrameType | None) -> None:
        raise Terminated(signum)

    def interrupted(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            raise KeyboardInterrupt
        if interrupts == 2:
            reporter.error("mlaprop: interrupted again; finishing teardown and the report, then exiting 130")

    handlers = {signal.SIGHUP: terminated, signal.SIGTERM: terminated, signal.SIGINT: interrupted}
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _cmd_run(args: argparse.Namespace, environ: Mapping[str, str] | None) -> int:
    env_vars = os.environ if environ is None else environ
    request = request_from_args(args)
    platform = platform_from_args(args)
    if args.simulate:  # the options, else MLAPROP_VENDOR / MLAPROP_ARCH, else the H200 CI runner
        vendor, arch = simulation_platform(
            platform.vendor.value if platform.vendor else None, platform.arch, env_vars
        )
        platform = replace(platform, vendor=Vendor(vendor) if vendor else None, arch=arch)
    smoke_model = smoke_model_choice(args.smoke_model, env_vars)
    run_opts = RunOptions(
        request=request,
        environment=environment_for(platform, environ, tp=request.tp_size, hardware_speaks=not args.simulate),
        env_vars=environ,
        simulate=args.simulate,
        sim_accuracy=_sim_accuracy(args, smoke_model),
        sim_latency_s=args.sim_latency,
        sim_args=args.sim_args,
        ready_timeout_s=args.ready_timeout,
        echo_server_log=args.server_log,
        smoke=args.smoke,
        smoke_model=smoke_model,
    )
    opts = _eval_options(args, env_vars, {"auto": None, "on": True, "off": False}[args.determinism], None)
    if args.smoke:
        opts = smoke_eval_options(opts, run_opts.smoke_model, explicit_gate=args.gate)
    reporter = _reporter(env_vars)
    with _signals_end_the_job(reporter):
        return run(run_opts, opts, reporter=reporter)


def _sim_accuracy(args: argparse.Namespace, smoke_model: SmokeModel) -> float:
    """``--sim-accuracy``, else 1.0 when the simulator stands in for the canary (which answers every
    question), else 0.9."""
    if args.sim_accuracy is not None:
        return float(args.sim_accuracy)
    return 1.0 if args.smoke and smoke_model.gated else 0.9


def smoke_model_choice(flag: SmokeModel | None, environ: Mapping[str, str]) -> SmokeModel:
    """The smoke model: ``--smoke-model``, else ``MLAPROP_SMOKE_MODEL``, else the canary.

    Raises:
        InvalidOptions: ``MLAPROP_SMOKE_MODEL`` holds another value (exit 2, the message lists the choices).
    """
    if flag is not None:
        return flag
    value = environ.get(SMOKE_MODEL_VARIABLE, "")
    if not value.strip():
        return SmokeModel.CANARY
    try:
        return o.smoke_model(value)
    except ValueError as exc:
        raise InvalidOptions(f"{SMOKE_MODEL_VARIABLE}: {exc}") from None


def smoke_eval_options(opts: EvalOptions, model: SmokeModel, *, explicit_gate: float | None) -> EvalOptions:
    """The eval settings smoke mode implies: the canary is gated (at ``--gate``, else
    :data:`~mlaprop.options.CANARY_GATE`) over every question (or ``--limit``); ``random`` and ``dummy`` are
    scored on :data:`~mlaprop.options.SMOKE_QUESTIONS` questions (or ``--limit``) and not gated."""
    if model.gated:
        return replace(opts, gated=True, gate=CANARY_GATE if explicit_gate is None else explicit_gate)
    return replace(opts, gated=False, limit=opts.limit or SMOKE_QUESTIONS)


def _header_safe(value: str) -> bool:
    """Printable ASCII only: what an HTTP header value (``Authorization: Bearer KEY``) can carry."""
    return value.isascii() and value.isprintable()


def _cmd_eval(args: argparse.Namespace, environ: Mapping[str, str] | None) -> int:
    env_vars = os.environ if environ is None else environ
    reporter = _reporter(env_vars)
    api_key = None
    if args.api_key_value is not None:
        reporter.error(
            "mlaprop: error: eval takes no key on the command line (`--api-key`), where ps and CI logs show "
            "it; export it and pass the variable's name with --api-key-env VAR"
        )
        return ExitCode.USAGE
    if args.api_key_env:
        api_key = env_vars.get(args.api_key_env)
        if api_key and not _header_safe(api_key):
            reporter.error(
                f"mlaprop: error: --api-key-env {args.api_key_env}: the key holds characters other than "
                "printable ASCII, which an HTTP Authorization header cannot carry; use the server's ASCII key"
            )
            return ExitCode.USAGE
        if not api_key:
            state = "is not set" if api_key is None else "is empty"
            reporter.error(
                f"mlaprop: error: --api-key-env {args.api_key_env}: the environment variable "
                f"{args.api_key_env} {state}; export it with the server's --api-key, or leave out "
                "--api-key-env for a server without a key"
            )
            return ExitCode.USAGE
    opts = _eval_options(args, env_vars, bool(args.determinism), api_key)
    with _signals_end_the_job(reporter):
        return evaluate(args.base_url, opts, reporter=reporter)


def add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser], help: str) -> None:
    """``mlaprop run``."""
    p = sub.add_parser(
        "run",
        help=help,
        description="detect -> compose -> launch -> MGSM -> determinism -> report -> teardown. " + _EXIT_HELP,
    )
    add_platform_options(p)
    add_request_options(p)
    _add_eval_options(p, in_run=True)
    s = p.add_argument_group("server")
    s.add_argument(
        "--simulate",
        action="store_true",
        help="use the simulated SGLang server (no GPU; platform defaults to nvidia sm90)",
    )
    s.add_argument(
        "--sim-accuracy",
        type=arg_type(o.fraction),
        default=None,
        metavar="P",
        help="simulated MGSM accuracy (default: 0.9; 1.0 standing in for the canary with --smoke)",
    )
    s.add_argument(
        "--sim-latency",
        type=arg_type(o.non_negative_seconds),
        default=0.02,
        metavar="S",
        help="simulated seconds per request (default: 0.02)",
    )
    s.add_argument(
        "--sim-args",
        type=arg_type(o.sim_words),
        default=(),
        metavar="ARGS",
        help="more --sim-* flags for the simulated server, as one shell-quoted string",
    )
    s.add_argument(
        "--ready-timeout",
        type=arg_type(o.positive_seconds),
        default=600.0,
        metavar="S",
        help="server start timeout (default: %(default)s)",
    )
    s.add_argument("--server-log", action="store_true", help="mirror the server log to stderr")
    s.add_argument(
        "--smoke",
        action="store_true",
        help="serve a tiny MLA FP8 model instead of --model (which: --smoke-model); the canary is gated at "
        f"{CANARY_GATE} over all questions, the others score {SMOKE_QUESTIONS} questions (or --limit), not gated",
    )
    s.add_argument(
        "--smoke-model",
        type=arg_type(o.smoke_model),
        default=None,
        metavar="{canary,random,dummy}",
        help="with --smoke: canary (trained to answer MGSM-en; built on this GPU or cached; gated), random "
        "(real-scale random weights, real loading; not gated), dummy (--load-format dummy; not gated) "
        f"(default: ${SMOKE_MODEL_VARIABLE}, else canary)",
    )
    p.set_defaults(func=_cmd_run)
    one_line_errors(p)


def add_eval(sub: argparse._SubParsersAction[argparse.ArgumentParser], help: str) -> None:
    """``mlaprop eval``."""
    p = sub.add_parser(
        "eval", help=help, description="MGSM eval against a server someone else started. " + _EXIT_HELP
    )
    p.add_argument(
        "--base-url", required=True, type=arg_type(o.base_url), help="the server, e.g. http://127.0.0.1:30000"
    )
    p.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="environment variable holding the server's --api-key (sent as bearer)",
    )
    # Without it, argparse reads ``--api-key KEY`` as the prefix of --api-key-env and prints KEY back.
    p.add_argument("--api-key", dest="api_key_value", metavar="KEY", help=argparse.SUPPRESS)
    _add_eval_options(p, in_run=False)
    p.set_defaults(func=_cmd_eval)
    one_line_errors(p)
