"""The MGSM eval client: pooled session, bounded retries with backoff, concurrent work that stops in time.

A failed request is an *error*, never a wrong answer: :meth:`HttpClient.post_json` raises
:class:`RequestFailed`, and :func:`run_concurrent` counts it. The whole run stops early, in bounded time,
when the server process dies (an ``is_alive`` callable) or the error rate passes a bound, raising
:class:`EvalAborted` with what was finished. Retries are counted by cause (:class:`RetryCounts`) and
reported with the result, so ``errors 0`` never hides a server that needed them.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import logging
import math
import os
import queue
import random
import socket
import sys
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import requests
import urllib3
from requests.adapters import HTTPAdapter
from tqdm import tqdm

from mlaprop.mgsm import MgsmDataset, MgsmItem, Parser, chat_request, extract, is_correct
from mlaprop.stats import DEFAULT_GATE, Score, Verdict, gate_verdict
from mlaprop.stats import score as score_counts

__all__ = [
    "GATE_CONCURRENCY",
    "ClientConfig",
    "EvalAborted",
    "EvalResult",
    "HttpClient",
    "ItemRecord",
    "Reply",
    "RequestFailed",
    "RetryCounts",
    "default_concurrency",
    "fetch_server_info",
    "first_model",
    "percentile",
    "run_concurrent",
    "run_mgsm",
    "server_root",
    "wait_while_starting",
]

T = TypeVar("T")
R = TypeVar("R")

_log = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})

#: Client threads of SGLang's MLA FP8 test (``test/registered/mla/test_mla_fp8.py`` passes
#: ``num_threads=1024`` to ``run_eval``): every MGSM-en question (250) is in flight at once.
GATE_CONCURRENCY = 1024

#: File descriptors kept free for everything but the eval's connections (logs, reports, the server's pipes).
_FD_RESERVE = 32
#: The shortest run of first-attempt failures (different items, no answer between) that stops an eval
#: without waiting for retries, however small the error bound. A server that fails one first attempt in three
#: and answers the retries gives such a run with probability about (1/3)^12 = 2e-6 at any point; a server
#: failing everything reaches it within the first wave.
TRIP_FLOOR = 12


def default_concurrency(n_questions: int, server_info: Mapping[str, Any] | None = None) -> int:
    """Requests in flight when the user names none: every question in one wave, as the gate does.

    ``min(n_questions, GATE_CONCURRENCY)`` (SGLang's MLA FP8 test sends all 250 questions at once with 1024
    threads; ``run_eval``'s CLI default of 512 is not what the gate uses), lowered to the server's own limit
    on running requests when ``server_info`` (the JSON of SGLang's ``GET /get_server_info``) gives one:
    ``max_running_requests`` (a server argument, ``None`` when SGLang sizes it), else the first
    ``internal_states[*].effective_max_running_requests_per_dp`` (SGLang 0.5.23
    ``managers/scheduler_components/internal_state.py``). Requests above that limit would only queue
    inside the server, where the read timeout still runs.

    Args:
        n_questions: questions the eval will ask (>= 0).
        server_info: the decoded ``/get_server_info`` answer, or ``None`` when it was not available.

    Returns:
        A whole number >= 1.
    """
    want = max(1, min(int(n_questions), GATE_CONCURRENCY))
    limit = _server_limit(server_info)
    return max(1, min(want, limit)) if limit is not None else want


def _server_limit(server_info: Mapping[str, Any] | None) -> int | None:
    if not isinstance(server_info, Mapping):
        return None
    candidates: list[object] = [server_info.get("max_running_requests")]
    states = server_info.get("internal_states")
    if isinstance(states, list):
        candidates += [
            s.get("effective_max_running_requests_per_dp") for s in states if isinstance(s, Mapping)
        ]
    for value in candidates:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def server_root(base_url: str) -> str:
    """``base_url`` without a trailing ``/`` or ``/v1`` (the OpenAI-style prefix some users include:
    ``http://h:30000/v1`` and ``http://h:30000`` name the same server; paths are added to the root)."""
    root = base_url.strip().rstrip("/")
    while root.endswith("/v1"):
        root = root[: -len("/v1")].rstrip("/")
    return root


@dataclass(frozen=True)
class ClientConfig:
    """How an eval talks to the server.

    Attributes:
        concurrency: requests in flight at once (threads, and HTTP connections in the pool; never more than
            the items, nor than the free file descriptors allow). The default, 1024, is what SGLang's MLA FP8
            test passes (all 250 MGSM-en questions in one wave); ``run_eval``'s CLI default is 512. Callers
            that know the question count and the server use :func:`default_concurrency`.
        request_timeout_s: read timeout of one attempt, seconds (2048 generated tokens on a slow GPU
            can take minutes).
        connect_timeout_s: TCP connect timeout of one attempt, seconds.
        max_retries: retries after the first attempt, on connection errors, timeouts of the connect phase,
            HTTP 429 and 5xx; other failures are not retried.
        backoff_s: first retry delay, seconds; doubles each retry (with jitter), capped at ``backoff_max_s``.
            A ``Retry-After`` header (seconds) is honoured up to the cap.
        backoff_max_s: the cap on one retry delay, seconds.
        max_error_rate: stop once failed requests exceed this share of all the items (the run could no
            longer end under it). The stop does not wait for retries: once more *different* items have had a
            request fail in a row (HTTP 5xx or no connection; 429 is back-pressure and does not count), with
            no answer anywhere between, than this share allows, the server is failing everything and the
            run stops at that failure (a server failing every request: at the 13th of 250 at 5%); such a run
            must be at least :data:`TRIP_FLOOR` items long, so a few flaky first attempts that complete together
            wait for their retries however small the eval.
        max_consecutive_errors: stop after this many different items failed in a row with no answer
            between (as above), whatever the share.
        alive_poll_s: how often the server process is checked while waiting, seconds.
        abort_grace_s: after a stop, how long to wait for requests still in flight, seconds.
        startup_wait_s: how long :func:`run_mgsm` waits, before the first question, for a server that
            answers ``GET /health`` with 503 (SGLang's "starting" answer), seconds; it says so while waiting.
            600 s is SGLang's own launch timeout (``DEFAULT_TIMEOUT_FOR_SERVER_LAUNCH``).
        api_key: sent as ``Authorization: Bearer <key>`` (SGLang ``--api-key``); never logged or reported.
        progress: show a tqdm bar; ``None`` shows it only when stderr is a terminal.
    """

    concurrency: int = GATE_CONCURRENCY
    request_timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    max_retries: int = 3
    backoff_s: float = 0.5
    backoff_max_s: float = 8.0
    max_error_rate: float = 0.05
    max_consecutive_errors: int = 16
    alive_poll_s: float = 1.0
    abort_grace_s: float = 5.0
    startup_wait_s: float = 600.0
    api_key: str | None = None
    progress: bool | None = None

    def __post_init__(self) -> None:
        if (
            isinstance(self.concurrency, bool)
            or not isinstance(self.concurrency, int)
            or self.concurrency < 1
        ):
            raise ValueError(f"concurrency must be a whole number >= 1, got {self.concurrency!r}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        for name in ("request_timeout_s", "connect_timeout_s", "alive_poll_s", "startup_wait_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):  # nan compares false with everything
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {value}")
        if self.max_consecutive_errors < 1:
            raise ValueError(f"max_consecutive_errors must be >= 1, got {self.max_consecutive_errors}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"max_error_rate must be between 0 and 1, got {self.max_error_rate}")

    def __repr__(self) -> str:  # keep the key out of logs and tracebacks
        key = "None" if self.api_key is None else "'***'"
        return (
            f"ClientConfig(concurrency={self.concurrency}, request_timeout_s={self.request_timeout_s}, "
            f"max_retries={self.max_retries}, max_error_rate={self.max_error_rate}, api_key={key})"
        )


@dataclass(frozen=True)
class Reply:
    """A successful (HTTP 200, JSON) answer.

    Attributes:
        body: the decoded JSON (the text, for :meth:`HttpClient.request` with ``parse_json=False``).
        latency_s: wall time of the successful attempt, seconds.
        attempts: attempts made, >= 1.
    """

    body: Any
    latency_s: float
    attempts: int


class RequestFailed(Exception):
    """A request that did not produce a usable answer after its retries.

    Attributes:
        reason: what went wrong, in one line (HTTP status and body start, or the exception).
        status: the last HTTP status, or ``None`` for a connection-level failure.
        attempts: attempts made.
    """

    def __init__(self, reason: str, status: int | None = None, attempts: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.attempts = attempts


class EvalAborted(RuntimeError):
    """A concurrent run stopped early; ``partial`` holds the results finished before the stop.

    Attributes:
        reason: why, in one sentence (server died, error rate over the bound, interrupted).
        partial: results finished before the stop, in completion order (``Any``: the caller's result type;
            :func:`run_mgsm` gives its partial :class:`EvalResult`).
    """

    def __init__(self, reason: str, partial: Any = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.partial = partial


@dataclass(frozen=True)
class RetryCounts:
    """HTTP attempts of a run and the retries among them, by cause.

    Attributes:
        attempts: HTTP requests sent (first attempts and retries).
        retries: attempts that repeated a failed one.
        by_cause: retries per cause, most frequent first: ``("HTTP 503", 12)``, ``("connection", 3)``.
    """

    attempts: int = 0
    retries: int = 0
    by_cause: tuple[tuple[str, int], ...] = ()

    def describe(self) -> str:
        """``"no retries"`` or ``"14 retries (HTTP 503 x12, connection x2)"``."""
        if not self.retries:
            return "no retries"
        causes = ", ".join(f"{cause} x{n}" for cause, n in self.by_cause)
        return f"{self.retries} retr{'y' if self.retries == 1 else 'ies'} ({causes})"


class _Tally:
    """Thread-safe count of attempts and retries, and the run of failures with no answer between.

    A *failing run* is the set of distinct calls (one per item) whose latest attempt failed with a 5xx or
    no connection since the last answer of any call; when it reaches ``trip_at`` the ``on_trip`` callback
    fires once, from the failing worker's thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._attempts = 0
        self._retries: Counter[str] = Counter()
        self._failing: set[int] = set()
        self._causes: Counter[str] = Counter()
        self._trip_at: int | None = None
        self._on_trip: Callable[[str], None] | None = None
        self._tripped = False

    def arm(self, trip_at: int, on_trip: Callable[[str], None]) -> None:
        with self._lock:
            self._trip_at, self._on_trip, self._tripped = trip_at, on_trip, False
            self._failing.clear()
            self._causes.clear()

    def disarm(self) -> None:
        with self._lock:
            self._trip_at, self._on_trip = None, None

    def answered(self) -> None:
        with self._lock:
            self._attempts += 1
            self._failing.clear()
            self._causes.clear()

    def failed(self, call: int, cause: str, *, counts_as_failing: bool) -> None:
        fire: Callable[[str], None] | None = None
        with self._lock:
            self._attempts += 1
            if counts_as_failing:
                self._failing.add(call)
                self._causes[cause] += 1
                if self._trip_at is not None and not self._tripped and len(self._failing) >= self._trip_at:
                    self._tripped = True
                    fire = self._on_trip
                    causes = ", ".join(f"{c} x{n}" for c, n in self._causes.most_common())
                    why = f"{len(self._failing)} different requests failed in a row with no answer between ({causes})"
        if fire is not None:
            fire(why)

    def retried(self, cause: str) -> None:
        with self._lock:
            self._retries[cause] += 1

    def snapshot(self) -> RetryCounts:
        with self._lock:
            return RetryCounts(
                self._attempts, sum(self._retries.values()), tuple(self._retries.most_common())
            )


class _Sockets:
    """The connections a client opened: :meth:`HttpClient.stop` cuts the ones waiting on a reply, and
    :meth:`HttpClient.close` closes every one, so no socket waits for the garbage collector."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: weakref.WeakSet[Any] = weakref.WeakSet()
        self._closed = False

    def add(self, conn: Any) -> None:
        with self._lock:
            self._conns.add(conn)
            closed = self._closed
        if closed:  # connected after the stop: cut it too
            self._cut(conn)

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        for conn in conns:
            self._cut(conn)

    def close_all(self) -> None:
        with self._lock:
            conns = list(self._conns)
            self._conns = weakref.WeakSet()
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()

    @staticmethod
    def _cut(conn: Any) -> None:
        sock = getattr(conn, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _tracked_adapter(maxsize: int, sockets: _Sockets) -> HTTPAdapter:
    """An adapter (no urllib3 retries, pool of ``maxsize``) whose connections register with ``sockets``."""

    class Conn(urllib3.connection.HTTPConnection):
        def connect(self) -> None:
            super().connect()
            sockets.add(self)

    class SecureConn(urllib3.connection.HTTPSConnection):
        def connect(self) -> None:
            super().connect()
            sockets.add(self)

    class Pool(urllib3.HTTPConnectionPool):
        ConnectionCls = Conn

    class SecurePool(urllib3.HTTPSConnectionPool):
        ConnectionCls = SecureConn

    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=maxsize, max_retries=0)
    adapter.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": SecurePool}
    return adapter


def _descriptor_room(want: int) -> int | None:
    """How many more file descriptors this process may open, after raising the soft ``RLIMIT_NOFILE``
    toward ``want`` + the open ones + a reserve when the hard limit allows (what SGLang's own
    ``set_ulimit`` does at start-up); ``None`` when unknown or unlimited."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return None
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    need = open_now + want + _FD_RESERVE
    if soft < need and (hard == resource.RLIM_INFINITY or hard > soft):
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return max(0, soft - open_now - _FD_RESERVE)


class HttpClient:
    """A ``requests.Session`` sized to ``config.concurrency`` with bounded, stoppable retries.

    Thread-safe for concurrent ``post_json`` calls. :meth:`stop` makes pending retries give up at once and
    cuts the connections of requests still waiting for a reply (so a hung server cannot hold a stopped run
    until the read timeout). :meth:`close` (or the context manager) closes every connection it opened.

    ``base_url`` may end in ``/v1`` (it is dropped: :func:`server_root`). :attr:`concurrency` is
    ``config.concurrency``, lowered when the process's descriptor limit (``ulimit -n``, raised toward the
    need when the hard limit allows) leaves too few free for one connection per request; a warning says so.
    """

    def __init__(self, base_url: str, config: ClientConfig | None = None, *, seed: int = 0) -> None:
        self.base_url = server_root(base_url)
        self.config = config or ClientConfig()
        self.concurrency = self.config.concurrency
        room = _descriptor_room(self.concurrency) if self.concurrency > 1 else None
        if room is not None and room < self.concurrency:
            self.concurrency = max(1, room)
            _log.warning(
                "the open-file limit (ulimit -n) leaves room for %d connections; running %d requests at "
                "once instead of %d (raise ulimit -n to run them all)",
                room,
                self.concurrency,
                self.config.concurrency,
            )
        self._stop = threading.Event()
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._sockets = _Sockets()
        self._tally = _Tally()
        self._calls = iter(range(1 << 62))
        self._calls_lock = threading.Lock()
        self.session = requests.Session()
        adapter = _tracked_adapter(self.concurrency, self._sockets)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if self.config.api_key:
            self.session.headers["Authorization"] = f"Bearer {self.config.api_key}"

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stop(self) -> None:
        """Make every pending and future request fail fast with :class:`RequestFailed` ("stopped"), cutting
        connections that wait for a reply."""
        self._stop.set()
        self._sockets.shutdown()

    @property
    def stopped(self) -> bool:
        """:meth:`stop` was called."""
        return self._stop.is_set()

    @property
    def retry_counts(self) -> RetryCounts:
        """Attempts and retries so far."""
        return self._tally.snapshot()

    def close(self) -> None:
        """Close every connection this client opened (pooled or not), without waiting for the garbage
        collector."""
        self.session.close()
        self._sockets.close_all()

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        cfg = self.config
        if retry_after is not None:
            try:
                return float(min(max(0.0, float(retry_after)), cfg.backoff_max_s))
            except ValueError:
                pass  # an HTTP date: fall back to our own backoff
        base = min(cfg.backoff_s * (2.0**attempt), cfg.backoff_max_s)
        with self._rng_lock:
            return base * (0.5 + 0.5 * self._rng.random())

    def request(
        self,
        method: str,
        path: str,
        payload: Mapping[str, Any] | None = None,
        *,
        parse_json: bool = True,
        max_retries: int | None = None,
    ) -> Reply:
        """Send ``method path`` (with a JSON body when given) and return the decoded JSON of a 200 answer
        (its text with ``parse_json=False``).

        Retries connection errors, connect timeouts, HTTP 429 and 5xx up to ``max_retries`` times
        (default ``config.max_retries``) with exponential backoff; a read timeout
        (``config.request_timeout_s``), another 4xx, or a non-JSON body fails at once.

        Raises:
            RequestFailed: no usable answer; ``reason`` says why.
        """
        cfg = self.config
        retries = cfg.max_retries if max_retries is None else max_retries
        url = f"{self.base_url}{path}"
        with self._calls_lock:
            call = next(self._calls)
        attempts = 0
        last = "not attempted"
        last_status: int | None = None
        while True:
            if self._stop.is_set():
                raise RequestFailed(f"stopped before an answer ({last})", last_status, attempts)
            attempts += 1
            retry_after: str | None = None
            started = time.monotonic()
            try:
                with self.session.request(
                    method, url, json=payload, timeout=(cfg.connect_timeout_s, cfg.request_timeout_s)
                ) as resp:
                    status, content, headers = resp.status_code, resp.content, resp.headers
                    # resp.text guesses the charset of an undeclared body (slow); JSON is UTF-8 (RFC 8259)
                    text = resp.text if status != 200 or not parse_json else ""
            except (requests.ConnectionError, requests.ConnectTimeout) as exc:
                if self._stop.is_set():
                    raise RequestFailed("stopped while waiting for the reply", None, attempts) from None
                last, last_status = f"{type(exc).__name__}: {_short(str(exc))}", None
                cause = "connection"
            except requests.Timeout:
                self._tally.failed(call, "read timeout", counts_as_failing=False)
                if self._stop.is_set():
                    raise RequestFailed("stopped while waiting for the reply", None, attempts) from None
                raise RequestFailed(
                    f"no answer within {cfg.request_timeout_s:g} s (read timeout)", None, attempts
                ) from None
            except requests.RequestException as exc:
                self._tally.failed(call, type(exc).__name__, counts_as_failing=False)
                if self._stop.is_set():
                    raise RequestFailed("stopped while waiting for the reply", None, attempts) from None
                raise RequestFailed(f"{type(exc).__name__}: {_short(str(exc))}", None, attempts) from None
            else:
                latency = time.monotonic() - started
                if status == 200:
                    self._tally.answered()
                    if not parse_json:
                        return Reply(body=text, latency_s=latency, attempts=attempts)
                    try:
                        body = json.loads(content)
                    except ValueError:
                        shown = _short(content.decode("utf-8", "replace"))
                        raise RequestFailed(
                            f"HTTP 200 with a body that is not JSON: {shown!r}", 200, attempts
                        ) from None
                    return Reply(body=body, latency_s=latency, attempts=attempts)
                last, last_status = f"HTTP {status}: {_short(text)}", status
                cause = f"HTTP {status}"
                if status not in _RETRY_STATUS and not 500 <= status < 600:
                    self._tally.answered()  # the server answered; the request was wrong
                    raise RequestFailed(last, last_status, attempts)
                retry_after = headers.get("Retry-After")
            self._tally.failed(call, cause, counts_as_failing=last_status != 429)
            if attempts > retries:
                raise RequestFailed(f"{last} (after {attempts} attempts)", last_status, attempts)
            if self._stop.wait(self._delay(attempts - 1, retry_after)):
                continue  # stopped while backing off: raises "stopped" at the top
            self._tally.retried(cause)

    def post_json(self, path: str, payload: Mapping[str, Any]) -> Reply:
        """``POST path`` with a JSON body; see :meth:`request`.

        Raises:
            RequestFailed: no usable answer.
        """
        return self.request("POST", path, payload)

    def get_json(self, path: str) -> Reply:
        """``GET path``; see :meth:`request`.

        Raises:
            RequestFailed: no usable answer.
        """
        return self.request("GET", path)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Progress:
    def __init__(self, total: int, enabled: bool | None, desc: str) -> None:
        show = sys.stderr.isatty() if enabled is None else enabled
        self.bar: tqdm[Any] | None = None
        if show:
            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)

    def update(self, errors: int) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if errors:
                self.bar.set_postfix(errors=errors, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_concurrent(
    items: Sequence[T],
    work: Callable[[T], R],
    *,
    client: HttpClient,
    is_error: Callable[[R], bool],
    on_result: Callable[[R], None] | None = None,
    is_alive: Callable[[], bool] | None = None,
    desc: str = "eval",
) -> list[R]:
    """Run ``work`` over ``items`` on ``client.concurrency`` threads; results in ``items`` order.

    ``work`` must not raise for a failed request: it returns a result that ``is_error`` recognises.
    ``on_result`` is called in the calling thread, once per result, as each finishes (write it to disk
    there: results survive a stop). Finished work arrives through a completion queue, so each wake-up
    costs O(1), not a scan of everything outstanding. Stops early when ``is_alive()`` turns false (checked
    every ``alive_poll_s`` seconds), when errors exceed ``max_error_rate * len(items)``, or, without waiting
    for retries, as soon as more different items failed a request in a row than that bound allows (or
    ``max_consecutive_errors``): what has not started is cancelled, retries give up, and connections still
    waiting for a reply are cut (:meth:`HttpClient.stop`); it then waits at most ``abort_grace_s`` seconds
    for the workers.

    Raises:
        EvalAborted: stopped early; ``partial`` lists the finished results (completion order).
        Exception: whatever ``work`` or ``on_result`` raised (after stopping the rest).
    """
    cfg = client.config
    total = len(items)
    results: list[R | None] = [None] * total
    finished: list[R] = []
    errors = 0
    budget = math.floor(cfg.max_error_rate * total + 1e-9)  # failures the run may have and still count
    done_queue: queue.SimpleQueue[cf.Future[R] | str] = queue.SimpleQueue()
    # a run of failures across different items, with no answer between, trips the stop once it is longer
    # than the bound allows (at least TRIP_FLOOR items: a few flaky first attempts are what retries are for;
    # with 40 questions a bound of 2 would trip on three 500s that completed in a row and would each have
    # been answered on retry)
    client._tally.arm(min(max(budget + 1, TRIP_FLOOR), cfg.max_consecutive_errors), done_queue.put)
    progress = _Progress(total, cfg.progress, desc)
    pool = cf.ThreadPoolExecutor(
        max_workers=min(client.concurrency, max(1, total)), thread_name_prefix="mlaprop"
    )
    futures: dict[cf.Future[R], int] = {}
    abort: str | None = None
    clean = False
    try:
        for i, item in enumerate(items):
            fut = pool.submit(work, item)
            futures[fut] = i
            fut.add_done_callback(done_queue.put)
        remaining = total
        next_poll = time.monotonic() + cfg.alive_poll_s
        while remaining:
            try:
                got = done_queue.get(timeout=max(0.0, next_poll - time.monotonic()))
            except queue.Empty:
                got = None
            if isinstance(got, str):  # the client saw the failing run pass the bound
                client.stop()  # at once; then find out whether the server failing is a server dying
                if is_alive is not None and _dies_within(is_alive, min(1.0, cfg.alive_poll_s)):
                    abort = f"the server process exited with {remaining} of {total} requests unfinished"
                    break
                abort = (
                    f"{got}, more than the {cfg.max_error_rate:.0%} error bound allows of {total} "
                    f"(after {len(finished)} finished); stopped the rest without waiting for their retries"
                )
                break
            if got is not None:
                result = got.result()
                results[futures[got]] = result
                finished.append(result)
                remaining -= 1
                failed = is_error(result)
                errors += failed
                progress.update(errors)
                if on_result is not None:
                    on_result(result)
                if remaining and errors > budget:
                    abort = (
                        f"{errors} of {total} requests failed, over the {cfg.max_error_rate:.0%} bound "
                        f"(after {len(finished)} finished); stopped the rest"
                    )
                    break
            if remaining and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + cfg.alive_poll_s
                if is_alive is not None and not is_alive():
                    abort = f"the server process exited with {remaining} of {total} requests unfinished"
                    break
        clean = abort is None
    finally:
        client._tally.disarm()
        if not clean:
            client.stop()
            for fut in futures:
                fut.cancel()
            cf.wait([f for f in futures if not f.done()], timeout=cfg.abort_grace_s)
        pool.shutdown(wait=clean, cancel_futures=True)
        progress.close()
    if abort is not None:
        raise EvalAborted(abort, tuple(finished))
    return [r for r in results if r is not None]


def _dies_within(is_alive: Callable[[], bool], seconds: float) -> bool:
    """``is_alive()`` turns false within ``seconds`` (a dying server closes its sockets a moment before
    its exit can be seen)."""
    deadline = time.monotonic() + seconds
    while is_alive():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


# --------------------------------------------------------------------------------------------- MGSM eval


@dataclass(frozen=True)
class ItemRecord:
    """The outcome of one MGSM question.

    Attributes:
        qid: question id (``mgsm_en_017``).
        index: 0-based row in the dataset.
        target: the answer as written in the dataset.
        response: the model's reply; ``None`` when the request failed.
        extracted_simple_evals: what simple-evals' parser reads (``""`` for none).
        extracted_robust: what the robust parser reads (``""`` for none).
        correct_simple_evals: right by simple-evals' scoring (``False`` on error).
        correct_robust: right by the robust scoring (``False`` on error).
        error: why the request failed, or ``None``; a failed request is never scored as a wrong answer.
        latency_s: wall time of the successful attempt, seconds.
        completion_tokens: ``usage.completion_tokens`` of the reply, when given.
        finish_reason: ``choices[0].finish_reason`` (``"length"`` means cut at ``max_tokens``).
        attempts: HTTP attempts made.
    """

    qid: str
    index: int
    target: str
    response: str | None
    extracted_simple_evals: str = ""
    extracted_robust: str = ""
    correct_simple_evals: bool = False
    correct_robust: bool = False
    error: str | None = None
    latency_s: float | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    attempts: int = 0

    def extracted(self, parser: Parser) -> str:
        """The answer ``parser`` extracted."""
        return self.extracted_simple_evals if Parser(parser) is Parser.SIMPLE_EVALS else self.extracted_robust

    def correct(self, parser: Parser) -> bool:
        """Right according to ``parser``."""
        return self.correct_simple_evals if Parser(parser) is Parser.SIMPLE_EVALS else self.correct_robust


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation between closest ranks; ``None`` when empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class EvalResult:
    """An MGSM run, finished or stopped.

    Attributes:
        lang: dataset language.
        n_total: items the run was meant to cover.
        records: one per finished item, in dataset order (fewer than ``n_total`` when stopped).
        wall_s: wall time of the run, seconds.
        model: the model name sent in requests.
        aborted: why the run stopped early, or ``None``.
        retry_counts: HTTP attempts and retries (by cause: ``HTTP 503``, ``connection``, ...) of the
            questions' requests; a run with ``errors == 0`` may still have needed retries.
        concurrency: requests in flight at once (after the descriptor limit), 0 when unknown.
    """

    lang: str
    n_total: int
    records: tuple[ItemRecord, ...]
    wall_s: float
    model: str
    aborted: str | None = None
    retry_counts: RetryCounts = RetryCounts()
    concurrency: int = 0

    @property
    def retries(self) -> int:
        """Retried attempts of the questions' requests (5xx, 429 and connection retries included)."""
        return self.retry_counts.retries

    @property
    def answered(self) -> int:
        """Items with a response."""
        return sum(1 for r in self.records if r.error is None)

    @property
    def errors(self) -> int:
        """Items whose request failed."""
        return sum(1 for r in self.records if r.error is not None)

    @property
    def missing(self) -> int:
        """Items never finished (the run stopped first)."""
        return self.n_total - len(self.records)

    def correct(self, parser: Parser) -> int:
        """Right answers according to ``parser``."""
        return sum(1 for r in self.records if r.correct(parser))

    def score(self, parser: Parser, gate: float = DEFAULT_GATE) -> Score | None:
        """Score over the answered items, or ``None`` when none were answered."""
        if self.answered == 0:
            return None
        return score_counts(self.correct(parser), self.answered, gate)

    def verdict(self, parser: Parser, gate: float = DEFAULT_GATE) -> Verdict:
        """Gate verdict counting unanswered items both ways (see :func:`mlaprop.stats.gate_verdict`)."""
        return gate_verdict(self.correct(parser), self.answered, max(1, self.n_total), gate)

    @property
    def disagreements(self) -> tuple[ItemRecord, ...]:
        """Answered items the two parsers score differently."""
        return tuple(
            r for r in self.records if r.error is None and r.correct_simple_evals != r.correct_robust
        )

    @property
    def latencies(self) -> tuple[float, ...]:
        """Latencies of answered items, seconds."""
        return tuple(r.latency_s for r in self.records if r.latency_s is not None)

    @property
    def completion_tokens(self) -> int:
        """Sum of ``usage.completion_tokens`` over answered items."""
        return sum(r.completion_tokens or 0 for r in self.records)

    @property
    def output_tokens_per_s(self) -> float | None:
        """Completion tokens per second of wall time; ``None`` when the server reported no usage."""
        if self.wall_s <= 0 or self.completion_tokens == 0:
            return None
        return self.completion_tokens / self.wall_s


def _record(item: MgsmItem, reply: Reply) -> ItemRecord:
    body = reply.body
    try:
        choice = body["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return ItemRecord(
            qid=item.qid,
            index=item.index,
            target=item.target,
            response=None,
            error=f"malformed reply, no choices[0].message.content: {_short(repr(body))}",
            attempts=reply.attempts,
        )
    text = content if isinstance(content, str) else ""
    usage = body.get("usage") if isinstance(body, dict) else None
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    finish = choice.get("finish_reason") if isinstance(choice, dict) else None
    se = extract(Parser.SIMPLE_EVALS, text, item.lang)
    rb = extract(Parser.ROBUST, text, item.lang)
    return ItemRecord(
        qid=item.qid,
        index=item.index,
        target=item.target,
        response=text,
        extracted_simple_evals=se,
        extracted_robust=rb,
        correct_simple_evals=is_correct(Parser.SIMPLE_EVALS, item.target, se),
        correct_robust=is_correct(Parser.ROBUST, item.target, rb),
        latency_s=reply.latency_s,
        completion_tokens=tokens if isinstance(tokens, int) else None,
        finish_reason=finish if isinstance(finish, str) else None,
        attempts=reply.attempts,
    )


def first_model(client: HttpClient) -> str:
    """The first model id of ``GET /v1/models`` (what SGLang's ``run_eval`` sends when no model is named).

    Raises:
        RequestFailed: the request failed or the answer lists no model.
    """
    reply = client.get_json("/v1/models")
    try:
        return str(reply.body["data"][0]["id"])
    except (KeyError, IndexError, TypeError):
        raise RequestFailed(
            f"/v1/models lists no model: {_short(repr(reply.body))}", 200, reply.attempts
        ) from None


def wait_while_starting(
    client: HttpClient,
    timeout_s: float,
    *,
    notice: Callable[[str], None] | None = None,
    every_s: float = 30.0,
    poll_s: float = 1.0,
) -> float:
    """Wait while the server answers ``GET /health`` with 503, SGLang's answer while it is starting
    (``srt/entrypoints/http_server.py``: ``ServerStatus.Starting``), at most ``timeout_s`` seconds.

    Any other answer (200, another status, no connection) ends the wait at once: a server that is not
    starting is the eval's business, with its own retries. ``notice`` (default: a logging warning) gets one
    line when the wait begins and one every ``every_s`` seconds while it lasts.

    Returns:
        Seconds waited.

    Raises:
        RequestFailed: still 503 after ``timeout_s`` seconds (the reason says so).
    """
    say = notice or _log.warning
    started = time.monotonic()
    next_note = started
    while True:
        try:
            client.request("GET", "/health", parse_json=False, max_retries=0)
            return time.monotonic() - started
        except RequestFailed as exc:
            if exc.status != 503 or client.stopped:
                return time.monotonic() - started
            waited = time.monotonic() - started
            if waited >= timeout_s:
                raise RequestFailed(
                    f"the server at {client.base_url} still says it is starting (GET /health: HTTP 503) "
                    f"after {waited:.0f} s; wait for it to finish loading, or check its log",
                    503,
                    exc.attempts,
                ) from None
            if time.monotonic() >= next_note:
                what = "says it is starting" if waited < poll_s else f"still starting after {waited:.0f} s"
                say(
                    f"the server at {client.base_url} {what} (GET /health: HTTP 503); "
                    f"waiting up to {timeout_s:.0f} s for it"
                )
                next_note = time.monotonic() + every_s
            client._stop.wait(min(poll_s, max(0.0, timeout_s - waited)))


def fetch_server_info(base_url: str, config: ClientConfig | None = None) -> Mapping[str, Any] | None:
    """SGLang's ``GET /get_server_info`` as a mapping, or ``None`` when the server does not answer it
    usefully (another server, an old SGLang, an error); one attempt, the config's connect timeout and a
    read timeout of at most 10 s. Feed it to :func:`default_concurrency`."""
    cfg = replace(config or ClientConfig(), concurrency=1, request_timeout_s=10.0)
    with HttpClient(base_url, cfg) as client:
        try:
            body = client.request("GET", "/get_server_info", max_retries=0).body
        except RequestFailed:
            return None
    return body if isinstance(body, dict) else None


def run_mgsm(
    base_url: str,
    dataset: MgsmDataset,
    *,
    config: ClientConfig | None = None,
    model: str | None = None,
    is_alive: Callable[[], bool] | None = None,
    on_record: Callable[[ItemRecord], None] | None = None,
    limit: int | None = None,
    notice: Callable[[str], None] | None = None,
) -> EvalResult:
    """Ask every question of ``dataset`` (the first ``limit`` when given) and score the replies.

    Each request is SGLang's ``mgsm_<lang>`` request (:func:`mlaprop.mgsm.chat_request`) sent to the
    server root of ``base_url`` (a trailing ``/v1`` is dropped) + ``/v1/chat/completions``; both parsers
    score every reply. ``on_record`` receives each record as it finishes (write it to disk there).
    Before the first question it waits, up to ``config.startup_wait_s``, while the server says it is
    starting (:func:`wait_while_starting`; ``notice`` gets the progress lines). ``model`` defaults to the
    first of ``/v1/models``.

    Raises:
        EvalAborted: the server died, kept starting past ``startup_wait_s``, the model list failed, or
            errors passed ``config.max_error_rate``; ``partial`` is an :class:`EvalResult` of what finished
            (``aborted`` set, ``retry_counts`` filled).
    """
    cfg = config or ClientConfig()
    items = dataset.items if limit is None else dataset.items[: max(0, limit)]
    started = time.monotonic()

    def aborted(reason: str) -> EvalAborted:
        partial = EvalResult(dataset.lang, len(items), (), time.monotonic() - started, "", reason)
        return EvalAborted(reason, partial)

    with HttpClient(base_url, replace(cfg, concurrency=1)) as probe:
        try:
            wait_while_starting(probe, cfg.startup_wait_s, notice=notice, poll_s=min(1.0, cfg.alive_poll_s))
        except RequestFailed as exc:
            raise aborted(exc.reason) from None
        if model is None:
            try:
                model = first_model(probe)
            except RequestFailed as exc:
                raise aborted(f"could not list the server's models: {exc.reason}") from None
    name = model
    with HttpClient(base_url, replace(cfg, concurrency=max(1, min(cfg.concurrency, len(items))))) as client:

        def work(item: MgsmItem) -> ItemRecord:
            try:
                reply = client.post_json("/v1/chat/completions", chat_request(item, name))
            except RequestFailed as exc:
                return ItemRecord(
                    qid=item.qid,
                    index=item.index,
                    target=item.target,
                    response=None,
                    error=exc.reason,
                    attempts=exc.attempts,
                )
            return _record(item, reply)

        try:
            records = run_concurrent(
                items,
                work,
                client=client,
                is_error=lambda r: r.error is not None,
                on_result=on_record,
                is_alive=is_alive,
                desc=f"MGSM-{dataset.lang}",
            )
        except EvalAborted as exc:
            done = tuple(sorted(exc.partial, key=lambda r: r.index))
            partial = EvalResult(
                dataset.lang,
                len(items),
                done,
                time.monotonic() - started,
                name,
                exc.reason,
                client.retry_counts,
                client.concurrency,
            )
            raise EvalAborted(exc.reason, partial) from None
        counts, concurrency = client.retry_counts, client.concurrency
    return EvalResult(
        dataset.lang, len(items), tuple(records), time.monotonic() - started, name, None, counts, concurrency
    )
