"""The ``mlaprop`` command line: argument parsing and printing only; the work is in :mod:`mlaprop.job`
(``run``, ``eval``) and the pure core (``env``, ``compose``, ``preflight``).

Each command's parser lives in its own module (:mod:`mlaprop.cli.plan`, :mod:`mlaprop.cli.run`) and only the
chosen command's module is imported, so ``mlaprop compose`` never loads the HTTP client. Exit codes: see
:mod:`mlaprop.exitcodes` (0 pass, 1 quality failure, 2 usage or environment error, 3 infrastructure failure,
130/143 signals).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence

from mlaprop import __version__
from mlaprop.compose import UnsupportedCombination
from mlaprop.environment import InvalidEnvironment
from mlaprop.exitcodes import ExitCode, UsageError
from mlaprop.planview import plan_to_dict, shell_command
from mlaprop.preflight import PreflightError
from mlaprop.redact import redact

from .common import one_line_errors

__all__ = ["COMMANDS", "build_parser", "main", "plan_to_dict", "shell_command"]

#: command -> (module, function adding its parser, one-line help). Only the chosen command's module is
#: imported (start-up time, issue 15); the others get a help-only stub for ``mlaprop --help``.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "env": ("mlaprop.cli.plan", "add_env", "show the detected environment"),
    "compose": (
        "mlaprop.cli.plan",
        "add_compose",
        "print the SGLang launch command composed for this environment",
    ),
    "preflight": (
        "mlaprop.cli.plan",
        "add_preflight",
        "refuse a GPU run in seconds: wrong vendor, no visible GPU, no SGLang, model not cached",
    ),
    "run": (
        "mlaprop.cli.run",
        "add_run",
        "launch the server, run MGSM (and the determinism check), report, tear down",
    ),
    "eval": ("mlaprop.cli.run", "add_eval", "run the MGSM eval against a running server"),
    "canary": (
        "mlaprop.canary",
        "add_canary_parser",
        "train (on this GPU) or reuse the canary model smoke mode gates on",
    ),
    "compare": (
        "mlaprop.compare_cli",
        "add_compare",
        "compare two runs on the same questions: exact McNemar p-value, flipped questions, differences",
    ),
    "table": (
        "mlaprop.compare_cli",
        "add_table",
        "merge many runs into one platform x SGLang version table (Markdown or HTML)",
    ),
}

#: Options whose value is itself a string of arguments, so it may start with "--".
_STRING_OPTIONS = ("--server-args", "--sim-args")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser for ``mlaprop``; ``None`` builds every command; a command name builds only that
    command's options (and imports its module), the others are listed by name and help (``""``: none)."""
    parser = argparse.ArgumentParser(
        prog="mlaprop",
        description="Compose, launch and verify SGLang's MLA FP8 server test on NVIDIA and AMD GPUs.",
    )
    parser.add_argument("--version", action="version", version=f"mlaprop {__version__}")
    one_line_errors(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, adder, help_text) in COMMANDS.items():
        if command is None or name == command:
            getattr(importlib.import_module(module), adder)(sub, help_text)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _glue_string_options(tokens: list[str]) -> list[str]:
    """``--server-args "--disable-cuda-graph"`` as ``--server-args=--disable-cuda-graph``: argparse would
    otherwise read the value as an option and stop with "expected one argument"."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "--":
            out += tokens[i:]
            break
        if tok in _STRING_OPTIONS and i + 1 < len(tokens):
            out.append(f"{tok}={tokens[i + 1]}")
            i += 2
            continue
        out.append(tok)
        i += 1
    return out


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run ``mlaprop``; returns the exit code (:class:`mlaprop.exitcodes.ExitCode`).

    ``environ`` replaces ``os.environ`` for detection, preflight and the ``MLAPROP_*`` defaults. Called
    without ``argv`` (the console command), SIGINT is ignored once the command has returned, so the exit
    code recorded in ``summary.json`` is the one the process ends with.
    """
    tokens = _glue_string_options(list(sys.argv[1:] if argv is None else argv))
    server_argv: list[str] = []
    if "--" in tokens:  # everything after -- goes to the SGLang server
        cut = tokens.index("--")
        tokens, server_argv = tokens[:cut], tokens[cut + 1 :]
    chosen = next((t for t in tokens if not t.startswith("-")), None)
    parser = build_parser(chosen if chosen in COMMANDS else "")  # "": every command as a help-only stub
    try:
        args = parser.parse_args(tokens)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
    args.server_argv = server_argv
    try:
        code = int(args.func(args, environ))
        sys.stdout.flush()  # a reader gone away (`| head -1`) shows here, not as exit 120 at shutdown
        if argv is None and threading.current_thread() is threading.main_thread():
            # The console command is done and its report final: a late Ctrl-C must not turn the recorded
            # exit code into a death by signal while the interpreter exits.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        return code
    except UsageError as exc:  # its message starts with the option's flag
        print(redact(f"mlaprop: error: {exc}"), file=sys.stderr)
        return ExitCode.USAGE
    except (UnsupportedCombination, InvalidEnvironment, PreflightError) as exc:
        print(redact(f"mlaprop: error: {type(exc).__name__}: {exc}"), file=sys.stderr)
        return ExitCode.USAGE
    except BrokenPipeError:  # `mlaprop compose --explain | head -1`: the reader had enough
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
            os.close(devnull)
        return ExitCode.BROKEN_PIPE
    except Exception as exc:  # a bug in mlaprop: infrastructure (3), never read as a quality failure (1)
        print(
            redact(f"mlaprop: error: internal error, {type(exc).__name__}: {exc} (a bug in mlaprop; exit 3)"),
            file=sys.stderr,
        )
        trace = traceback.format_exception(type(exc), exc, exc.__traceback__)
        print(redact("".join(trace)), file=sys.stderr, end="")
        return ExitCode.INFRASTRUCTURE
    except KeyboardInterrupt:
        if argv is None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("mlaprop: interrupted", file=sys.stderr)
        return ExitCode.SIGINT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
