"""Start an SGLang server, wait until it serves, and stop it and everything it started.

:func:`launch` (a context manager) and :func:`start` / :meth:`Server.stop` run ``python -m
sglang.launch_server --model-path M --host H --port P <plan argv> <extra args>`` (the command prefix is
configurable; tests use :mod:`mlaprop.simserver`) with the plan's environment variables merged onto this
process's environment, in a new session and process group, with stdout and stderr, redacted, appended to one
log file (optionally mirrored to the console).

What it guarantees, and how SGLang's own ``popen_launch_server`` differs (``sglang/test/test_utils.py``):

- The server runs under a small watchdog process (:mod:`mlaprop.watchdog`) that is the *child subreaper* of
  the server's tree (Linux ``PR_SET_CHILD_SUBREAPER``): a descendant that double-forks, leaves the session or
  clears its environment is re-parented to the watchdog, not to PID 1, so the watchdog's descendants are
  the whole tree. The watchdog holds one end of a socket pair whose other end only this process holds; when
  this process dies by any signal, SIGKILL included, the kernel closes it and the watchdog kills the tree
  (SIGTERM, ``grace`` seconds, SIGKILL). The server itself gets ``PR_SET_PDEATHSIG=SIGKILL`` against the
  watchdog. SIGHUP and SIGTERM to this process raise :class:`Terminated` while :func:`launch` runs, so the
  normal teardown runs and partial reports are written.
- Readiness is ``GET /health_generate`` answering 200 (``/v1/models`` can answer before the model is ready)
  *from our server*: before "ready", the socket listening on the port must belong to a process of the
  launched tree, else :class:`ServerPortTaken` ("port N is served by PID X (cmd), not the launched
  server"). Polls start 10 ms apart and back off to ``poll_interval`` (0.1 s); each request has its own
  timeout and runs in a helper thread while the process is checked every 50 ms, so a server that exits
  before it is ready (any exit code, 0 included) raises :class:`ServerExited` within about 0.1 s, with its
  exit code and the last 50 log lines. SGLang polls every 10 s. A server that never becomes ready raises
  :class:`ServerStartTimeout`.
- The port is chosen at random below Linux's ephemeral range and checked bindable; ``CUDA_VISIBLE_DEVICES`` is
  never read (SGLang derives the port from its first character). A server that fails with "address already
  in use" is torn down and relaunched on a new port, at most ``port_attempts`` times; the error after the
  last attempt names the cause on its first line (relaunches are logged at INFO level, not printed).
- Teardown on every path (normal exit, exception, Ctrl-C, SIGTERM/SIGHUP to this process while :func:`launch`
  runs): SIGTERM to the process group and to every process found, ``grace`` seconds, then SIGKILL; it returns
  only when every process is gone and the port is bindable again. "Every process" is every descendant of the
  watchdog (which, as subreaper, includes re-parented ones), the server's process group and session, and
  every descendant seen at any time (sampled every 0.25 s); no environment variable is relied on. When the
  server had already exited, the leftovers get at most 0.25 s of grace.
- The server's stdout and stderr reach this process through a pipe and are written to the log file
  streaming and already redacted (:class:`mlaprop.redact.LogFilter` with a :class:`mlaprop.redact.Redactor`
  built from every secret in the command line and the environment, plus the caller's): memory stays bounded
  whatever the server writes (lines longer than 16 KiB are cut and marked), the mirror to the console gets
  exactly the lines the file gets, and nothing is rewritten at teardown. The printed command and error
  messages go through the same redactor. The price: the server's writes wait when this process cannot keep
  up (about 100 MB/s of SGLang-like lines on one core) or the mirror stream blocks.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import logging
import os
import random
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import BinaryIO, TextIO

import psutil
import requests

from mlaprop import watchdog
from mlaprop.environment import LaunchPlan, option_value
from mlaprop.redact import LogFilter, Redactor, redact_argv, redact_env

__all__ = [
    "DEFAULT_COMMAND_PREFIX",
    "Server",
    "ServerError",
    "ServerExited",
    "ServerPortInUse",
    "ServerPortTaken",
    "ServerStartTimeout",
    "ServerTeardownError",
    "Terminated",
    "free_port",
    "launch",
    "port_is_bindable",
    "raise_on_sigterm",
    "start",
]

_log = logging.getLogger(__name__)

#: What runs the server unless told otherwise: SGLang's launcher under this Python.
DEFAULT_COMMAND_PREFIX: tuple[str, ...] = (sys.executable, "-m", "sglang.launch_server")
_WATCHDOG = Path(watchdog.__file__)
_WATCHDOG_START = 30.0  # seconds for the watchdog to report the server's pid

_TAIL_LINES = 50
_EXIT_CHECK = 0.05  # seconds between process checks while a health request is in flight
_SAMPLE_EVERY = 0.25  # seconds between descendant samples while serving
_ORPHAN_GRACE = 0.25  # grace for leftovers when the server itself has already exited
_KILL_WAIT = 5.0  # seconds to wait for SIGKILLed processes to disappear
_PORT_WAIT = 5.0  # seconds to wait for the port to become bindable after the processes are gone
_PORT_RANGE = (20000, 32768)  # below Linux's default ephemeral range (32768-60999)
_LAUNCHER_FLAGS = ("--model-path", "--model", "--host", "--port")
_READ_CHUNK = 64 * 1024  # bytes per read of the server's output
_PORT_CONFLICT = re.compile(
    r"(?i)address already in use|EADDRINUSE|\[Errno 98\]|error while attempting to bind"
)
_PORT_CONFLICT_WORDS = ("address already in use", "eaddrinuse", "[errno 98]", "attempting to bind")
_CAUSE = re.compile(
    r"(?i)^\s*(?:\[[^\]]*\]\s*)?(?:[\w.]*(?:Error|Exception|Interrupt)\b.*|.*: error: .*|.*address already in use.*"
    r"|.*out of memory.*|.*segmentation fault.*|.*memory access fault.*)$"
)


# --------------------------------------------------------------------------------------------------- errors


class ServerError(RuntimeError):
    """The server could not be started, failed, or could not be stopped cleanly.

    The message's first line names the cause; the rest gives the (redacted) command, the log path and the
    log tail. Attributes: ``headline`` (the first line), ``command`` (redacted command line), ``log_path``,
    ``log_tail`` (redacted lines), ``pid`` (the server process, ``None`` if it never started).
    """

    def __init__(
        self,
        headline: str,
        *,
        command: str = "",
        log_path: Path | None = None,
        log_tail: Sequence[str] = (),
        pid: int | None = None,
        redactor: Callable[[str], str] | None = None,
    ) -> None:
        self.headline = (redactor or Redactor())(headline)
        self.command = command
        self.log_path = log_path
        self.log_tail = tuple(log_tail)
        self.pid = pid
        parts = [self.headline]
        if command:
            parts.append(f"command: {command}")
        if log_path is not None:
            parts.append(f"log: {log_path}")
        if self.log_tail:
            parts.append(f"last {len(self.log_tail)} log lines:")
            parts.extend(f"  | {line}" for line in self.log_tail)
        super().__init__("\n".join(parts))


class ServerExited(ServerError):
    """The server process exited (any exit code, 0 included) before it was ready, or while serving.

    Attributes: ``returncode`` (negative: killed by that signal), ``elapsed`` (seconds from start to the
    moment the exit was noticed).
    """

    def __init__(self, headline: str, *, returncode: int, elapsed: float, **kwargs: object) -> None:
        self.returncode = returncode
        self.elapsed = elapsed
        super().__init__(headline, **kwargs)  # type: ignore[arg-type]


class ServerPortInUse(ServerExited):
    """The server could not bind its port ("address already in use") on the last allowed attempt, or on a
    port the caller chose (the launcher does not move a port the caller named)."""


class ServerPortTaken(ServerPortInUse):
    """``/health_generate`` answered, but the socket listening on the port belongs to a process outside the
    launched tree (another server took the port first). Attributes: ``owner_pid`` (``None`` when the owner
    cannot be seen, such as another user's process), ``owner_command``."""

    def __init__(self, headline: str, *, owner_pid: int | None, owner_command: str, **kwargs: object) -> None:
        self.owner_pid = owner_pid
        self.owner_command = owner_command
        super().__init__(headline, **kwargs)  # type: ignore[arg-type]


class ServerStartTimeout(ServerError):
    """The server was still running but not ready after ``timeout`` seconds (attribute ``timeout``)."""

    def __init__(self, headline: str, *, timeout: float, **kwargs: object) -> None:
        self.timeout = timeout
        super().__init__(headline, **kwargs)  # type: ignore[arg-type]


class ServerTeardownError(ServerError):
    """Teardown could not finish: processes survived SIGKILL (``survivors``, pids) or the port stayed busy
    (``port_busy``)."""

    def __init__(self, headline: str, *, survivors: Sequence[int], port_busy: bool, **kwargs: object) -> None:
        self.survivors = tuple(survivors)
        self.port_busy = port_busy
        super().__init__(headline, **kwargs)  # type: ignore[arg-type]


class Terminated(SystemExit):
    """This process received SIGTERM or SIGHUP while :func:`raise_on_sigterm` was active (so while
    :func:`launch` ran).

    A ``SystemExit`` with code ``128 + signum`` (143 for SIGTERM, 129 for SIGHUP), so ``except Exception`` does not swallow it and an
    unhandled one ends the program with the conventional status, after every ``finally`` has torn down.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(128 + signum)

    def __str__(self) -> str:
        return f"terminated by {signal.Signals(self.signum).name}"


# --------------------------------------------------------------------------------------------------- ports


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def port_is_bindable(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now (bound with ``SO_REUSEADDR``, as uvicorn and
    ``http.server`` do, so connections lingering in TIME_WAIT do not count as busy)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is bindable on ``host`` now, picked at random from 20000-32767 (below Linux's ephemeral
    range, so outgoing connections do not take it; random, so parallel test workers rarely collide).
    Never reads ``CUDA_VISIBLE_DEVICES``. Falls back to a kernel-assigned port after 50 busy picks.

    Raises:
        OSError: ``host`` cannot be bound at all.
    """
    rng = random.SystemRandom()
    for _ in range(50):
        port = rng.randrange(*_PORT_RANGE)
        if port_is_bindable(host, port):
            return port
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_bindable(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not port_is_bindable(host, port):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


# --------------------------------------------------------------------------------------------------- signals


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def raise_on_sigterm() -> Iterator[None]:
    """While active, SIGTERM and SIGHUP (a closed terminal, a CI runner's cancel) to this process raise
    :class:`Terminated` in the main thread (so ``finally`` blocks and context managers tear servers down and
    reports are written); the previous handlers are restored on exit. Does nothing outside the main thread
    (Python only runs signal handlers there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_terminated) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP until the block ends (teardown must not be cut short), then re-raise the
    first one received so its handler runs as usual. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def record(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    saved = {s: signal.signal(s, record) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if pending:
            signal.raise_signal(pending[0])


# --------------------------------------------------------------------------------------------------- logs


def _read_tail(path: Path, n: int, redactor: Callable[[str], str]) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            data = f.read()
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    return [redactor(line) for line in lines[-n:]] if n > 0 else []


def _cause(lines: Sequence[str]) -> str:
    """The log line that best names why a server stopped: the last exception or error line, else the last
    non-empty line."""
    for line in reversed(lines):
        if _CAUSE.match(line):
            return line.strip()
    for line in reversed(lines):
        if line.strip():
            return line.strip()
    return "(the log is empty)"


@contextlib.contextmanager
def _held(lock: threading.Lock, timeout: float = 2.0) -> Iterator[None]:
    """Hold ``lock`` for the block, but go on without it after ``timeout`` seconds: a KeyboardInterrupt that
    lands between a ``with lock:``'s acquire and its block leaves the lock held for ever (CPython
    bpo-29988), and teardown must never wait on that."""
    got = lock.acquire(timeout=timeout)
    try:
        yield
    finally:
        if got:
            lock.release()


class _LogPump(threading.Thread):
    """Reads the server's output from a pipe until end of file and writes it, redacted and with long lines
    cut (:class:`mlaprop.redact.LogFilter`), to the log file and, when given, to an echo stream: the same
    lines to both, none dropped. Memory: one read (64 KiB) plus one cut line (16 KiB). Sets
    :attr:`port_conflict` when an "address already in use" line passes."""

    def __init__(self, fd: int, log: BinaryIO, log_filter: LogFilter, echo: TextIO | None) -> None:
        super().__init__(name="mlaprop-log-pump", daemon=True)
        self._fd, self._log, self._filter, self._echo = fd, log, log_filter, echo
        self._stop_event = threading.Event()
        self.port_conflict = threading.Event()

    def _emit(self, out: bytes) -> None:
        if not out:
            return
        with contextlib.suppress(OSError, ValueError):
            self._log.write(out)
            self._log.flush()
        text = out.decode("utf-8", errors="replace")
        if not self.port_conflict.is_set():
            low = text.lower()  # plain substring tests first: a regex over a flood costs more than the rest
            if any(k in low for k in _PORT_CONFLICT_WORDS) and _PORT_CONFLICT.search(text):
                self.port_conflict.set()
        if self._echo is not None:
            with contextlib.suppress(OSError, ValueError):
                self._echo.write(text)
                self._echo.flush()

    def run(self) -> None:
        try:
            while True:
                if self._stop_event.is_set():  # drain what is there, without waiting for writers to go
                    ready, _, _ = select.select([self._fd], [], [], 0)
                    if not ready:
                        break
                else:
                    ready, _, _ = select.select([self._fd], [], [], 0.1)
                    if not ready:
                        continue
                try:
                    data = os.read(self._fd, _READ_CHUNK)
                except OSError:
                    break
                if not data:
                    break
                try:
                    self._emit(self._filter.feed(data))
                except Exception:  # never stop reading: a full pipe would block the server
                    _log.exception("server log: %d bytes could not be written", len(data))
            with contextlib.suppress(Exception):
                self._emit(self._filter.close())
        finally:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            with contextlib.suppress(OSError):
                self._log.close()

    def stop(self, timeout: float = 2.0) -> None:
        """Wait up to ``timeout`` seconds for end of file, then drain what is readable and finish."""
        self.join(timeout=timeout)
        self._stop_event.set()
        self.join(timeout=2.0)


class _Child:
    """The server process, seen through its watchdog: pid, exit code, signals.

    The watchdog (``watchdog`` attribute, a ``Popen``) reports ``pid N`` and ``exit RC`` on ``sock``; when it
    disappears without reporting the server's exit, the server was killed with it (``PR_SET_PDEATHSIG``) and
    the exit code reads ``-SIGKILL``.
    """

    def __init__(self, wd: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.watchdog, self._sock = wd, sock
        self._lock = threading.Lock()
        self._buf = b""
        self._eof = False
        self.pid: int | None = None
        self.error: str | None = None
        self.returncode: int | None = None

    def _read(self, timeout: float) -> None:
        if self._eof:
            return
        try:  # wait outside the lock: alive() from other threads must not queue behind a waiting poll
            ready, _, _ = select.select([self._sock], [], [], max(timeout, 0.0))
        except (OSError, ValueError):  # closed meanwhile
            return
        if not ready:
            return
        with _held(self._lock):
            if self._eof:
                return
            try:
                data = self._sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:  # another thread read it first
                return
            except OSError:
                data = b""
            if not data:
                self._eof = True
                if self.pid is not None and self.returncode is None:
                    self.returncode = -signal.SIGKILL
            self._buf += data
            *lines, self._buf = self._buf.split(b"\n")
            for raw in lines:
                kind, _, value = raw.decode("utf-8", errors="replace").partition(" ")
                if kind == "pid":
                    self.pid = int(value)
                elif kind == "exit":
                    self.returncode = int(value)
                elif kind == "error":
                    self.error = value

    def wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.pid is None and self.error is None and not self._eof:
            if time.monotonic() >= deadline:
                break
            self._read(0.05)

    def poll(self) -> int | None:
        if self.returncode is None:
            self._read(0.0)
        return self.returncode

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline and not self._eof:
            self._read(min(0.05, max(deadline - time.monotonic(), 0.0)))
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.pid is not None and self.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, sig)

    def close(self, timeout: float) -> None:
        """Close the socket (the watchdog then kills whatever is left and exits) and reap the watchdog."""
        self._read(0.0)  # the last news first: the server's exit code
        with _held(self._lock):
            self._eof = True
            with contextlib.suppress(OSError):
                self._sock.close()
        if self.pid is not None and self.returncode is None and not psutil.pid_exists(self.pid):
            self.returncode = -signal.SIGKILL
        try:
            self.watchdog.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.watchdog.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.watchdog.wait(timeout=2.0)


def _listens_on(conn: object, port: int) -> bool:
    laddr = getattr(conn, "laddr", None)
    return getattr(conn, "status", None) == psutil.CONN_LISTEN and bool(laddr) and laddr.port == port  # type: ignore[union-attr]


def _listeners(port: int) -> list[tuple[int | None, str]]:
    """``(pid, command)`` of every TCP socket listening on ``port`` on any address; pid ``None`` where the
    process cannot be seen (another user's)."""
    out: list[tuple[int | None, str]] = []
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return out
    for c in conns:
        if _listens_on(c, port):
            command = "?"
            if c.pid is not None:
                with contextlib.suppress(psutil.Error):
                    command = shlex.join(psutil.Process(c.pid).cmdline()) or "?"
            out.append((c.pid, command))
    return out


# --------------------------------------------------------------------------------------------------- server


def _proc_key(p: psutil.Process) -> tuple[int, float]:
    try:
        return p.pid, p.create_time()
    except psutil.Error:
        return p.pid, 0.0


def _gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _send(p: psutil.Process, sig: int) -> None:
    with contextlib.suppress(psutil.Error, OSError):
        p.send_signal(sig)


class Server:
    """A running server started by :func:`start` or :func:`launch` (do not construct directly).

    Attributes:
        host: the address it listens on.
        port: its HTTP port.
        base_url: ``http://host:port``.
        pid: the server process id, which is also its process group and session id.
        watchdog_pid: the watchdog process (the server's parent, subreaper of its tree).
        log_path: the file its stdout and stderr go to, redacted.
        command: the command line, redacted, with the environment variables the plan added.
        redactor: what masks secrets in the log, the command and error messages.
    """

    def __init__(
        self,
        *,
        argv: Sequence[str],
        env: Mapping[str, str],
        added_env: Mapping[str, str],
        host: str,
        port: int,
        log_path: Path,
        echo: TextIO | None,
        grace: float,
        redactor: Redactor,
        owns_log: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.base_url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        self.log_path = log_path
        self.redactor = redactor
        shown_env = " ".join(f"{k}={shlex.quote(v)}" for k, v in redact_env(added_env).items())
        self.command = redactor((shown_env + " " if shown_env else "") + shlex.join(redact_argv(argv)))
        self._grace = grace
        self._owns_log = owns_log
        self._last_probe = "none"  # what the last readiness probe got, for ServerStartTimeout
        self._api_key = option_value(argv, "--api-key")
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._known: dict[tuple[int, float], psutil.Process] = {}
        self._stopped = False
        self._sampler_stop = threading.Event()
        self._sampler: threading.Thread | None = None
        log = open(log_path, "ab")  # noqa: SIM115 - the pump owns and closes it
        log.write(f"$ {self.command}\n".encode())
        log.flush()
        _log.info("starting server: %s (log: %s)", self.command, log_path)
        read_fd, write_fd = os.pipe()
        ours, theirs = socket.socketpair()
        try:
            wd = subprocess.Popen(
                [sys.executable, "-I", "-S", str(_WATCHDOG), str(theirs.fileno()), repr(grace), "--", *argv],
                stdin=subprocess.DEVNULL,
                stdout=write_fd,
                stderr=write_fd,
                env=dict(env),
                pass_fds=(theirs.fileno(),),
                start_new_session=True,  # a signal to this process group (Ctrl-C, kill -PGID) spares it
            )
        except OSError as exc:
            for fd in (read_fd, write_fd):
                os.close(fd)
            ours.close()
            log.close()
            raise ServerError(
                f"could not run the watchdog ({sys.executable}): {exc}",
                command=self.command,
                log_path=log_path,
                redactor=redactor,
            ) from exc
        finally:
            theirs.close()
        os.close(write_fd)
        self._pump = _LogPump(read_fd, log, LogFilter(redactor), echo)
        self._pump.start()
        self._proc = _Child(wd, ours)
        self.watchdog_pid = wd.pid
        self._proc.wait_started(_WATCHDOG_START)
        if self._proc.pid is None:
            error = self._proc.error or f"the watchdog did not start it within {_WATCHDOG_START:g} s"
            self._proc.close(timeout=5.0)
            self._pump.stop()
            raise ServerError(
                f"could not run the server command: {error}",
                command=self.command,
                log_path=log_path,
                log_tail=_read_tail(log_path, _TAIL_LINES, redactor),
                redactor=redactor,
            )
        self.pid: int = self._proc.pid
        atexit.register(self._stop_at_exit)

    def __repr__(self) -> str:
        return f"Server(pid={self.pid}, base_url={self.base_url!r}, alive={self.alive()})"

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- state

    @property
    def returncode(self) -> int | None:
        """The server's exit code once it has exited (negative: killed by that signal), else ``None``."""
        return self._proc.poll()

    def alive(self) -> bool:
        """Whether the server process is still running."""
        return self._proc.poll() is None

    def log_tail(self, n: int = _TAIL_LINES) -> list[str]:
        """The last ``n`` lines of the log, redacted."""
        return _read_tail(self.log_path, n, self.redactor)

    def check(self) -> None:
        """Raise if the server has exited (use between requests to tell a dead server from a slow one).

        Raises:
            ServerExited: the process has exited; carries the exit code and the log tail.
        """
        if (rc := self._proc.poll()) is not None:
            raise self._exited(rc, "while serving")

    # ---- readiness

    def _exited(self, rc: int, when: str) -> ServerExited:
        tail = self.log_tail()
        elapsed = time.monotonic() - self._started
        how = f"exited with code {rc}"
        if rc < 0:
            with contextlib.suppress(ValueError):
                how = f"was killed by {signal.Signals(-rc).name} (exit code {rc})"
        cls = ServerExited
        headline = f"server {how} {when}, {elapsed:.2f} s after start: {_cause(tail)}"
        if _PORT_CONFLICT.search("\n".join(tail)):
            cls = ServerPortInUse
            headline = f"port {self.port} on {self.host} is already in use; server {how}: {_cause(tail)}"
        return cls(
            headline,
            returncode=rc,
            elapsed=elapsed,
            command=self.command,
            log_path=self.log_path,
            log_tail=tail,
            pid=self.pid,
            redactor=self.redactor,
        )

    def _probe(self, session: requests.Session, timeout: float) -> bool:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        try:
            r = session.get(f"{self.base_url}/health_generate", timeout=max(timeout, 0.01), headers=headers)
        except (requests.RequestException, ValueError) as exc:  # ValueError: a header value http cannot carry
            self._last_probe = self.redactor(f"{type(exc).__name__}: {exc}")[:200]
            return False
        self._last_probe = f"HTTP {r.status_code}"
        return r.status_code == 200

    def _wait_ready(self, deadline: float, request_timeout: float, poll_interval: float) -> None:
        interval = min(0.01, poll_interval)
        session = requests.Session()
        session.trust_env = False  # loopback: never through a proxy from the environment
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mlaprop-health")
        try:
            while True:
                self._sample()
                if (rc := self._proc.poll()) is not None:
                    raise self._exited(rc, "before it was ready")
                if self._pump.port_conflict.is_set():
                    tail = self.log_tail()
                    raise ServerPortInUse(
                        f"port {self.port} on {self.host} is already in use: {_cause(tail)}",
                        returncode=-1,
                        elapsed=time.monotonic() - self._started,
                        command=self.command,
                        log_path=self.log_path,
                        log_tail=tail,
                        pid=self.pid,
                        redactor=self.redactor,
                    )
                now = time.monotonic()
                if now >= deadline:
                    raise self._timeout(now)
                future = pool.submit(self._probe, session, min(request_timeout, deadline - now))
                while not concurrent.futures.wait([future], timeout=_EXIT_CHECK).done:
                    if (rc := self._proc.poll()) is not None:
                        raise self._exited(rc, "before it was ready")
                    if time.monotonic() >= deadline:
                        raise self._timeout(time.monotonic())
                if future.result():
                    self._check_listener()
                    _log.info(
                        "server ready at %s after %.2f s", self.base_url, time.monotonic() - self._started
                    )
                    return
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=max(0.0, min(interval, deadline - time.monotonic())))
                interval = min(interval * 2, poll_interval)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            session.close()

    def _timeout(self, now: float) -> ServerStartTimeout:
        waited = now - self._started
        tail = self.log_tail()
        return ServerStartTimeout(
            f"server not ready after {waited:.1f} s: GET /health_generate never answered 200 (last answer: "
            f"{self._last_probe}); last log line: {_cause(tail)}",
            timeout=waited,
            command=self.command,
            log_path=self.log_path,
            log_tail=tail,
            pid=self.pid,
            redactor=self.redactor,
        )

    def tree(self) -> list[psutil.Process]:
        """Every live process of the server's tree: the watchdog's descendants (the server included)."""
        try:
            return [p for p in psutil.Process(self.watchdog_pid).children(recursive=True) if not _gone(p)]
        except psutil.Error:
            return []

    def _check_listener(self) -> None:
        """Raise :class:`ServerPortTaken` unless a process of the launched tree listens on the port."""
        tree = self.tree()
        for p in tree:  # the usual case, cheap: one of ours listens (no scan of every process)
            with contextlib.suppress(psutil.Error, OSError):
                if any(_listens_on(c, self.port) for c in p.net_connections(kind="tcp")):
                    return
        ours = {p.pid for p in tree}
        listeners = _listeners(self.port)
        if not listeners or any(pid in ours for pid, _ in listeners):
            return  # nobody visible (a platform without net_connections): trust the answer
        pid, command = listeners[0]
        tail = self.log_tail()
        who = f"PID {pid} ({command[:200]})" if pid is not None else "a process this user cannot see"
        raise ServerPortTaken(
            f"port {self.port} is served by {who}, not the launched server (PID {self.pid}); another "
            "program answers on it (it took the port first)",
            owner_pid=pid,
            owner_command=command,
            returncode=-1,
            elapsed=time.monotonic() - self._started,
            command=self.command,
            log_path=self.log_path,
            log_tail=tail,
            pid=self.pid,
            redactor=self.redactor,
        )

    # ---- process tracking

    def _sample(self) -> None:
        """Remember every current process of the tree."""
        found = self.tree()
        with _held(self._lock):
            for p in found:
                self._known.setdefault(_proc_key(p), p)

    def _start_sampler(self) -> None:
        def run() -> None:
            while not self._sampler_stop.wait(_SAMPLE_EVERY):
                self._sample()

        self._sampler = threading.Thread(target=run, name="mlaprop-sampler", daemon=True)
        self._sampler.start()

    def _collect(self) -> list[psutil.Process]:
        """Every live process of this server: the watchdog's descendants, the server's process group and
        session, and every process sampled as part of the tree before (in case the watchdog is gone)."""
        self._sample()
        me = os.getpid()
        for p in psutil.process_iter():
            if p.pid in (me, self.watchdog_pid):
                continue
            try:
                ours = self.pid in (os.getpgid(p.pid), os.getsid(p.pid))
            except OSError:
                continue
            if ours:
                with _held(self._lock):
                    self._known.setdefault(_proc_key(p), p)
        with _held(self._lock):
            return [p for p in self._known.values() if not _gone(p)]

    def _signal_all(self, sig: int, procs: Sequence[psutil.Process], group: bool) -> None:
        if group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
            if self._proc.poll() is None:  # in case it left its group
                with contextlib.suppress(ProcessLookupError):
                    self._proc.send_signal(sig)
        for p in procs:
            _send(p, sig)

    def _kill_all(self, grace: float) -> list[int]:
        """SIGTERM, up to ``grace`` seconds, SIGKILL; returns the pids still alive after ``_KILL_WAIT``."""
        termed: set[tuple[int, float]] = set()
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, _KILL_WAIT)):
            deadline = time.monotonic() + wait
            first = True
            while True:
                self._proc.poll()  # reap the server process as soon as it exits
                alive = self._collect()
                if not alive and self._proc.poll() is not None:
                    return []
                if sig == signal.SIGKILL:
                    self._signal_all(sig, alive, group=True)
                else:  # SIGTERM once to each process, including ones that appear during the grace period
                    self._signal_all(sig, [p for p in alive if _proc_key(p) not in termed], group=first)
                    termed.update(_proc_key(p) for p in alive)
                first = False
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.02)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=0.1)
        return sorted(p.pid for p in self._collect())

    # ---- teardown

    def stop(self) -> None:
        """Stop the server and everything it started; idempotent. Waits until every process is gone and the
        port is bindable (at most ``grace`` + about 10 s).

        Raises:
            ServerTeardownError: processes survived SIGKILL, or the port stayed busy.
        """
        self._teardown(check_port=True, keep_log=False)

    def _teardown(self, *, check_port: bool, keep_log: bool) -> None:
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self._stop_at_exit)
        with _signals_deferred():
            self._sampler_stop.set()
            if self._sampler is not None:
                self._sampler.join(timeout=2.0)
            exited_by_itself = self._proc.poll() is not None  # keep its log: someone will want to read it
            grace = min(self._grace, _ORPHAN_GRACE) if exited_by_itself else self._grace
            t0 = time.monotonic()
            survivors = self._kill_all(grace)
            self._proc.close(timeout=2.0)
            port_busy = check_port and not _wait_bindable(self.host, self.port, _PORT_WAIT)
            self._pump.stop()
            _log.info("server %s stopped in %.2f s", self.pid, time.monotonic() - t0)
        if not (survivors or port_busy or keep_log or exited_by_itself) and self._owns_log:
            with contextlib.suppress(OSError):
                self.log_path.unlink()
        if survivors or port_busy:
            what = []
            if survivors:
                what.append(f"processes {survivors} survived SIGKILL")
            if port_busy:
                what.append(f"port {self.port} still busy {_PORT_WAIT:g} s after its processes were gone")
            raise ServerTeardownError(
                "teardown incomplete: " + "; ".join(what),
                survivors=survivors,
                port_busy=port_busy,
                command=self.command,
                log_path=self.log_path,
                log_tail=self.log_tail(),
                pid=self.pid,
                redactor=self.redactor,
            )

    def _stop_at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self._teardown(check_port=False, keep_log=False)


# --------------------------------------------------------------------------------------------------- API


def start(
    plan: LaunchPlan | None = None,
    model: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    command_prefix: Sequence[str] = DEFAULT_COMMAND_PREFIX,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    echo: bool | TextIO = False,
    ready_timeout: float = 600.0,
    grace: float = 10.0,
    request_timeout: float = 5.0,
    poll_interval: float = 0.1,
    port_attempts: int = 3,
    port_picker: Callable[[str], int] = free_port,
    redactor: Callable[[str], str] | None = None,
) -> Server:
    """Start a server and wait until ``GET /health_generate`` answers 200; the caller must call
    :meth:`Server.stop` (or use the server as a context manager; :func:`launch` does both). A server still
    running when the interpreter exits is stopped then.

    Args:
        plan: the composed plan (``plan.argv`` after ``--model-path/--host/--port``, ``plan.env`` merged onto
            this process's environment); ``None`` runs just the model with ``extra_args``.
        model: ``--model-path``; defaults to ``plan.model``.
        host: address to bind (loopback by default).
        port: port to use; ``None`` picks one with ``port_picker`` and moves on "address already in use".
        command_prefix: the command before ``--model-path``.
        extra_args: more server arguments, after the plan's.
        env: environment variables set last (override the plan's and this process's).
        log_path: file that receives stdout and stderr (appended); default a new temporary file, removed by
            a clean :meth:`Server.stop`; kept when starting or stopping failed (the error names it) or the
            server had exited by itself.
        echo: also copy log lines, redacted, to this stream (``True``: ``sys.stderr``).
        ready_timeout: seconds, from launch, for the server to become ready (all port attempts together).
        grace: seconds between SIGTERM and SIGKILL at teardown.
        request_timeout: seconds each health request may take.
        poll_interval: longest pause, in seconds, between health requests (they start 10 ms apart).
        port_attempts: launches allowed when the port turns out to be in use (``port=None`` only).
        port_picker: ``host -> port`` used when ``port`` is ``None``.
        redactor: the caller's redactor (a :class:`mlaprop.redact.Redactor`, whose secrets are merged, or
            any ``str -> str``, applied after): the server's own is built from every secret in its command
            line and environment (:meth:`mlaprop.redact.Redactor.from_sources`) and masks the live log, the
            command and error messages.

    Raises:
        ServerExited: the server exited before it was ready (exit code and log tail attached).
        ServerPortInUse: the port stayed in use over every attempt, or ``port`` was given and is in use
            (:class:`ServerPortTaken` when another program answers on it).
        ServerStartTimeout: not ready within ``ready_timeout``.
        ServerError: the command could not be run.
        ValueError: an argument is invalid (no model, the plan or extra args set ``--port``/``--host``/
            ``--model-path``, a non-positive timeout).
        Terminated: SIGTERM arrived while :func:`raise_on_sigterm` was active (the server is torn down first).
    """
    model = model if model is not None else (plan.model if plan is not None else None)
    if not model:
        raise ValueError("no model: pass model= or a plan")
    server_args = [*(plan.argv if plan is not None else ()), *extra_args]
    for flag in _LAUNCHER_FLAGS:
        if option_value(server_args, flag) is not None or flag in server_args:
            raise ValueError(f"{flag} belongs to the launcher: pass it as an argument of start()/launch()")
    if ready_timeout <= 0 or request_timeout <= 0 or poll_interval <= 0 or grace < 0 or port_attempts < 1:
        raise ValueError(
            "ready_timeout, request_timeout and poll_interval must be > 0, grace >= 0, port_attempts >= 1"
        )
    stream: TextIO | None = sys.stderr if echo is True else (echo or None)
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="mlaprop-server-", suffix=".log")
        os.close(fd)
        log_file = Path(name)
    else:
        log_file = Path(log_path)
        log_file.parent.mkdir(parents=True, exist_ok=True)
    added = {**(plan.env if plan is not None else {}), **(env or {})}
    full_env = {**os.environ, **added}
    full_env.setdefault("PYTHONUNBUFFERED", "1")  # log lines reach the file as they are written
    known = Redactor.from_sources(argv=[*command_prefix, *server_args], environ=full_env)
    if redactor is not None:
        known = known.followed_by(redactor)
    deadline = time.monotonic() + ready_timeout
    for attempt in range(1, port_attempts + 1):
        chosen = port if port is not None else port_picker(host)
        argv = [*command_prefix, "--model-path", model, "--host", host, "--port", str(chosen), *server_args]
        server = Server(
            argv=argv,
            env=full_env,
            added_env=added,
            host=host,
            port=chosen,
            log_path=log_file,
            echo=stream,
            grace=grace,
            redactor=known,
            owns_log=log_path is None,
        )
        try:
            server._wait_ready(deadline, request_timeout, poll_interval)
        except ServerPortInUse:
            server._teardown(check_port=False, keep_log=True)
            if port is not None or attempt == port_attempts:
                raise
            # INFO, not WARNING: the first line a user sees must be the cause if every attempt fails
            _log.info("port %d in use; relaunching on another port (attempt %d)", chosen, attempt + 1)
            continue
        except BaseException:
            server._teardown(check_port=True, keep_log=True)
            raise
        server._start_sampler()
        return server
    raise AssertionError("unreachable")  # pragma: no cover


@contextlib.contextmanager
def launch(
    plan: LaunchPlan | None = None,
    model: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    command_prefix: Sequence[str] = DEFAULT_COMMAND_PREFIX,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    echo: bool | TextIO = False,
    ready_timeout: float = 600.0,
    grace: float = 10.0,
    request_timeout: float = 5.0,
    poll_interval: float = 0.1,
    port_attempts: int = 3,
    port_picker: Callable[[str], int] = free_port,
    handle_sigterm: bool = True,
    redactor: Callable[[str], str] | None = None,
) -> Iterator[Server]:
    """Context manager: :func:`start` a ready server, yield it, and stop it on every way out of the block.

    Arguments are :func:`start`'s; with ``handle_sigterm`` (default), SIGTERM or SIGHUP to this process raises
    :class:`Terminated` while the block runs (see :func:`raise_on_sigterm`). When the block raised and
    teardown also failed, the block's exception propagates (with a note naming the teardown failure).

    Raises:
        everything :func:`start` raises; ServerTeardownError: the block ended normally but teardown failed.
    """
    with raise_on_sigterm() if handle_sigterm else contextlib.nullcontext():
        server = start(
            plan,
            model,
            host=host,
            port=port,
            command_prefix=command_prefix,
            extra_args=extra_args,
            env=env,
            log_path=log_path,
            echo=echo,
            ready_timeout=ready_timeout,
            grace=grace,
            request_timeout=request_timeout,
            poll_interval=poll_interval,
            port_attempts=port_attempts,
            port_picker=port_picker,
            redactor=redactor,
        )
        try:
            yield server
        except BaseException as exc:
            try:
                server.stop()
            except ServerTeardownError as failure:
                _log.error("%s", failure)
                if hasattr(exc, "add_note"):
                    exc.add_note(f"while tearing down: {failure.headline}")
            raise
        server.stop()
