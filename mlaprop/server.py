"""Start an SGLang server, wait until it serves, and stop it and everything it started.

:func:`launch` (a context manager) and :func:`start` / :meth:`Server.stop` run ``python -m
sglang.launch_server --model-path M --host H --port P <plan argv> <extra args>`` (the command prefix is
configurable; tests use :mod:`mlaprop.simserver`) with the plan's environment variables merged onto this
process's environment, in a new session and process group, with stdout and stderr appended to one log file
(optionally mirrored, redacted, to the console).

What it guarantees, and how SGLang's own ``popen_launch_server`` differs (``sglang/test/test_utils.py``):

- Readiness is ``GET /health_generate`` answering 200 (``/v1/models`` can answer before the model is ready).
  Polls start 10 ms apart and back off to ``poll_interval`` (0.1 s); each request has its own timeout and
  runs in a helper thread while the process is checked every 50 ms, so a server that exits before it is ready
  (any exit code, 0 included) raises :class:`ServerExited` within about 0.1 s, with its exit code and the last
  50 log lines. SGLang polls every 10 s. A server that never becomes ready raises :class:`ServerStartTimeout`.
- The port is chosen at random below Linux's ephemeral range and checked bindable; ``CUDA_VISIBLE_DEVICES`` is
  never read (SGLang derives the port from its first character). A server that fails with "address already
  in use" is torn down and relaunched on a new port, at most ``port_attempts`` times.
- Teardown on every path (normal exit, exception, Ctrl-C, SIGTERM to this process while :func:`launch` runs):
  SIGTERM to the process group and to every process found, ``grace`` seconds, then SIGKILL; it returns only
  when every process is gone and the port is bindable again. "Every process" is the process group, every
  descendant seen at any time (sampled while starting and every 0.25 s while serving), and every process
  carrying this server's ``MLAPROP_SERVER_ID`` environment variable, which finds descendants that were
  re-parented to PID 1 or moved to another session (SGLang walks down from the parent and misses those).
  When the server had already exited, the leftovers get at most 0.25 s of grace.
- The printed command, mirrored log lines and error messages are passed through :func:`mlaprop.redact.redact`.
  The log file itself holds what the server wrote, unredacted.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import logging
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import TextIO

import psutil
import requests

from mlaprop.environment import LaunchPlan, option_value
from mlaprop.redact import redact, redact_argv, redact_env

__all__ = [
    "DEFAULT_COMMAND_PREFIX",
    "SERVER_ID_VARIABLE",
    "Server",
    "ServerError",
    "ServerExited",
    "ServerPortInUse",
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
#: Environment variable set to a fresh id in every server's environment; descendants inherit it, which is
#: how teardown finds them after they left the process group or were re-parented.
SERVER_ID_VARIABLE = "MLAPROP_SERVER_ID"

_TAIL_LINES = 50
_EXIT_CHECK = 0.05  # seconds between process checks while a health request is in flight
_SAMPLE_EVERY = 0.25  # seconds between descendant samples while serving
_ORPHAN_GRACE = 0.25  # grace for leftovers when the server itself has already exited
_KILL_WAIT = 5.0  # seconds to wait for SIGKILLed processes to disappear
_PORT_WAIT = 5.0  # seconds to wait for the port to become bindable after the processes are gone
_PORT_RANGE = (20000, 32768)  # below Linux's default ephemeral range (32768-60999)
_LAUNCHER_FLAGS = ("--model-path", "--model", "--host", "--port")
_PORT_CONFLICT = re.compile(
    r"(?i)address already in use|EADDRINUSE|\[Errno 98\]|error while attempting to bind"
)
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
    ) -> None:
        self.headline = redact(headline)
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
    """This process received SIGTERM while :func:`raise_on_sigterm` was active (so while :func:`launch` ran).

    A ``SystemExit`` with code ``128 + signum`` (143), so ``except Exception`` does not swallow it and an
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
    """While active, SIGTERM to this process raises :class:`Terminated` in the main thread (so ``finally``
    blocks and context managers tear servers down); the previous handler is restored on exit. Does nothing
    outside the main thread (Python only runs signal handlers there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends (teardown must not be cut short), then re-raise the
    first one received so its handler runs as usual. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def record(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    saved = {s: signal.signal(s, record) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if pending:
            signal.raise_signal(pending[0])


# --------------------------------------------------------------------------------------------------- logs


def _read_tail(path: Path, n: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            data = f.read()
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    return [redact(line) for line in lines[-n:]] if n > 0 else []


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


class _Mirror(threading.Thread):
    """Copies new log lines, redacted, to a stream until stopped (checks every 50 ms)."""

    def __init__(self, path: Path, offset: int, stream: TextIO) -> None:
        super().__init__(name="mlaprop-log-mirror", daemon=True)
        self._path, self._offset, self._stream = path, offset, stream
        self._stop_event = threading.Event()

    def run(self) -> None:
        pending = b""
        with open(self._path, "rb") as f:
            f.seek(self._offset)
            while True:
                stopping = self._stop_event.wait(0.05)
                pending += f.read()
                *lines, pending = pending.split(b"\n")
                if stopping and pending:
                    lines, pending = [*lines, pending], b""
                for line in lines:
                    self._stream.write(redact(line.decode("utf-8", errors="replace")) + "\n")
                if lines:
                    self._stream.flush()
                if stopping:
                    return

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=2.0)


class _LogScanner:
    """Reads a log incrementally from an offset and tells whether a pattern has appeared."""

    def __init__(self, path: Path, offset: int) -> None:
        self._path, self._offset, self._carry = path, offset, ""

    def seen(self, pattern: re.Pattern[str]) -> bool:
        try:
            with open(self._path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return False
        self._offset += len(data)
        text = self._carry + data.decode("utf-8", errors="replace")
        self._carry = text[-200:]
        return bool(pattern.search(text))


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
        log_path: the file its stdout and stderr go to.
        command: the command line, redacted, with the environment variables the plan added.
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
        owns_log: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.base_url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        self.log_path = log_path
        shown_env = " ".join(f"{k}={shlex.quote(v)}" for k, v in redact_env(added_env).items())
        self.command = (shown_env + " " if shown_env else "") + shlex.join(redact_argv(argv))
        self._grace = grace
        self._owns_log = owns_log
        self._token = env[SERVER_ID_VARIABLE]
        self._last_probe = "none"  # what the last readiness probe got, for ServerStartTimeout
        self._api_key = option_value(argv, "--api-key")
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._known: dict[tuple[int, float], psutil.Process] = {}
        self._stopped = False
        self._sampler_stop = threading.Event()
        self._sampler: threading.Thread | None = None
        with open(log_path, "ab") as log:
            offset = log.tell()
            log.write(f"$ {self.command}\n".encode())
            log.flush()
            _log.info("starting server: %s (log: %s)", self.command, log_path)
            try:
                self._proc = subprocess.Popen(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=dict(env),
                    start_new_session=True,
                )
            except OSError as exc:
                raise ServerError(
                    f"could not run the server command: {exc}", command=self.command, log_path=log_path
                ) from exc
        self.pid = self._proc.pid
        self._mirror = _Mirror(log_path, offset, echo) if echo is not None else None
        if self._mirror is not None:
            self._mirror.start()
        self._scanner = _LogScanner(log_path, offset)
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
        return _read_tail(self.log_path, n)

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
        )

    def _probe(self, session: requests.Session, timeout: float) -> bool:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        try:
            r = session.get(f"{self.base_url}/health_generate", timeout=max(timeout, 0.01), headers=headers)
        except (requests.RequestException, ValueError) as exc:  # ValueError: a header value http cannot carry
            self._last_probe = redact(f"{type(exc).__name__}: {exc}")[:200]
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
                if self._scanner.seen(_PORT_CONFLICT):
                    tail = self.log_tail()
                    raise ServerPortInUse(
                        f"port {self.port} on {self.host} is already in use: {_cause(tail)}",
                        returncode=-1,
                        elapsed=time.monotonic() - self._started,
                        command=self.command,
                        log_path=self.log_path,
                        log_tail=tail,
                        pid=self.pid,
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
        )

    # ---- process tracking

    def _sample(self) -> None:
        """Remember every current descendant of the server process."""
        try:
            found = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return
        with self._lock:
            for p in found:
                self._known.setdefault(_proc_key(p), p)

    def _start_sampler(self) -> None:
        def run() -> None:
            while not self._sampler_stop.wait(_SAMPLE_EVERY):
                self._sample()

        self._sampler = threading.Thread(target=run, name="mlaprop-sampler", daemon=True)
        self._sampler.start()

    def _collect(self) -> list[psutil.Process]:
        """Every live process of this server: its group, its sampled descendants, and every process whose
        environment carries this server's id."""
        self._sample()
        me = os.getpid()
        for p in psutil.process_iter():
            if p.pid == me:
                continue
            try:
                ours = os.getpgid(p.pid) == self.pid or p.environ().get(SERVER_ID_VARIABLE) == self._token
            except (psutil.Error, OSError):
                continue
            if ours:
                with self._lock:
                    self._known.setdefault(_proc_key(p), p)
        with self._lock:
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
            port_busy = check_port and not _wait_bindable(self.host, self.port, _PORT_WAIT)
            if self._mirror is not None:
                self._mirror.stop()
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

    Raises:
        ServerExited: the server exited before it was ready (exit code and log tail attached).
        ServerPortInUse: the port stayed in use over every attempt, or ``port`` was given and is in use.
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
    full_env = {**os.environ, **added, SERVER_ID_VARIABLE: uuid.uuid4().hex}
    full_env.setdefault("PYTHONUNBUFFERED", "1")  # log lines reach the file as they are written
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
            owns_log=log_path is None,
        )
        try:
            server._wait_ready(deadline, request_timeout, poll_interval)
        except ServerPortInUse:
            server._teardown(check_port=False, keep_log=True)
            if port is not None or attempt == port_attempts:
                raise
            _log.warning("port %d in use; relaunching on another port (attempt %d)", chosen, attempt + 1)
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
) -> Iterator[Server]:
    """Context manager: :func:`start` a ready server, yield it, and stop it on every way out of the block.

    Arguments are :func:`start`'s; with ``handle_sigterm`` (default), SIGTERM to this process raises
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
