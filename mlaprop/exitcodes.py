"""The exit codes of ``mlaprop``, one per failure class a CI retry policy can act on. Pure, no imports.

=====  ==========================================================================================
code   meaning
=====  ==========================================================================================
0      pass: the gate (and the determinism check, when it ran) passed; or a command succeeded
1      quality failure: the gate failed or was inconclusive, or determinism FAILED
2      usage or environment error found before any server was launched (bad flag, dataset, plan)
3      infrastructure failure: the server did not start, died, the eval aborted, teardown failed,
       or the determinism check could not finish (ERROR); also an unexpected crash of mlaprop itself
130    interrupted by SIGINT (Ctrl-C), 128 + 2
143    terminated by SIGTERM, 128 + 15 (SIGHUP: 129)
141    stdout's reader went away (``mlaprop compose | head -1``), 128 + SIGPIPE, as a shell tool
=====  ==========================================================================================
"""

from __future__ import annotations

import enum

__all__ = ["ExitCode", "UsageError", "signal_exit_code"]


class ExitCode(enum.IntEnum):
    """What ``mlaprop`` exits with (see the module table)."""

    OK = 0
    QUALITY = 1
    USAGE = 2
    INFRASTRUCTURE = 3
    SIGINT = 130
    SIGTERM = 143
    BROKEN_PIPE = 141


def signal_exit_code(signum: int) -> int:
    """The shell's status for a process ended by signal ``signum``: ``128 + signum``."""
    return 128 + signum


class UsageError(ValueError):
    """A command line or option value mlaprop cannot use, found before anything was launched (exit 2); the
    message starts with the option's flag and says what to pass instead."""
