"""Deprecated home of the main job, kept so existing imports keep working: the job is :mod:`mlaprop.job`,
its options :mod:`mlaprop.options`, its exit codes :mod:`mlaprop.exitcodes`."""

from __future__ import annotations

from mlaprop.exitcodes import ExitCode
from mlaprop.job import SIMSERVER_COMMAND, evaluate, run, smoke_request
from mlaprop.options import SMOKE_QUESTIONS, SMOKE_SERVER_ARGS, EvalOptions, RunOptions

__all__ = [
    "EXIT_FAIL",
    "EXIT_INFRA",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "SIMSERVER_COMMAND",
    "SMOKE_QUESTIONS",
    "SMOKE_SERVER_ARGS",
    "EvalOptions",
    "RunOptions",
    "evaluate",
    "run",
    "smoke_request",
]

EXIT_OK, EXIT_FAIL, EXIT_USAGE = ExitCode.OK, ExitCode.QUALITY, ExitCode.USAGE
EXIT_INFRA, EXIT_INTERRUPTED = ExitCode.INFRASTRUCTURE, ExitCode.SIGINT
