"""The MGSM eval client: pooled session, bounded retries with backoff, concurrent work that stops in time.

A failed request is an *error*, never a wrong answer: :meth:`HttpClient.post_json` raises
:class:`RequestFailed`, and :func:`run_concurrent` counts it. The whole run stops early, in bounded time,
when the server process dies (an ``is_alive`` callable) or the error rate passes a bound, raising
:class:`EvalAborted` with what was finished.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import math
import random
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import requests
import urllib3
from requests.adapters import HTTPAdapter
from tqdm import tqdm

from mlaprop.mgsm import MgsmDataset, MgsmItem, Parser, chat_request, extract, is_correct
from mlaprop.stats import DEFAULT_GATE, Score, Verdict, gate_verdict
from mlaprop.stats import score as score_counts

__all__ = [
    "ClientConfig",
    "EvalAborted",
    "EvalResult",
    "HttpClient",
    "ItemRecord",
    "Reply",
    "RequestFailed",
    "first_model",
    "percentile",
    "run_concurrent",
    "run_mgsm",
]

T = TypeVar("T")
R = TypeVar("R")

_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class ClientConfig:
    """How an eval talks to the server.

    Attributes:
        concurrency: requests in flight at once (threads, and HTTP connections in the pool). 64 is SGLang's
            ``run_eval`` default; a CPU test server may want fewer.
        request_timeout_s: read timeout of one attempt, seconds (2048 generated tokens on a slow GPU
            can take minutes).
        connect_timeout_s: TCP connect timeout of one attempt, seconds.
        max_retries: retries after the first attempt, on connection errors, timeouts of the connect phase,
            HTTP 429 and 5xx; other failures are not retried.
        backoff_s: first retry delay, seconds; doubles each retry (with jitter), capped at ``backoff_max_s``.
            A ``Retry-After`` header (seconds) is honoured up to the cap.
        backoff_max_s: the cap on one retry delay, seconds.
        max_error_rate: stop once failed requests exceed this share of all the items (the run could no
            longer end under it).
        max_consecutive_errors: stop after this many failed requests in a row with no success between
            (a server that stopped answering), whatever the share.
        alive_poll_s: how often the server process is checked while waiting, seconds.
        abort_grace_s: after a stop, how long to wait for requests still in flight, seconds.
        api_key: sent as ``Authorization: Bearer <key>`` (SGLang ``--api-key``); never logged or reported.
        progress: show a tqdm bar; ``None`` shows it only when stderr is a terminal.
    """

    concurrency: int = 64
    request_timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    max_retries: int = 3
    backoff_s: float = 0.5
    backoff_max_s: float = 8.0
    max_error_rate: float = 0.05
    max_consecutive_errors: int = 16
    alive_poll_s: float = 1.0
    abort_grace_s: float = 5.0
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
        for name in ("request_timeout_s", "connect_timeout_s", "alive_poll_s"):
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


class _Sockets:
    """The connections a client opened, so :meth:`HttpClient.stop` can cut the ones waiting on a reply."""

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


class HttpClient:
    """A ``requests.Session`` sized to ``config.concurrency`` with bounded, stoppable retries.

    Thread-safe for concurrent ``post_json`` calls. :meth:`stop` makes pending retries give up at once and
    cuts the connections of requests still waiting for a reply (so a hung server cannot hold a stopped run
    until the read timeout). :meth:`close` (or the context manager) releases the connections.
    """

    def __init__(self, base_url: str, config: ClientConfig | None = None, *, seed: int = 0) -> None:
        self.base_url = base_url.rstrip("/")
        self.config = config or ClientConfig()
        self._stop = threading.Event()
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._sockets = _Sockets()
        self.session = requests.Session()
        adapter = _tracked_adapter(self.config.concurrency, self._sockets)
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

    def close(self) -> None:
        """Close pooled connections."""
        self.session.close()

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
        self, method: str, path: str, payload: Mapping[str, Any] | None = None, *, parse_json: bool = True
    ) -> Reply:
        """Send ``method path`` (with a JSON body when given) and return the decoded JSON of a 200 answer
        (its text with ``parse_json=False``).

        Retries connection errors, connect timeouts, HTTP 429 and 5xx up to ``config.max_retries`` times
        with exponential backoff; a read timeout (``config.request_timeout_s``), another 4xx, or a non-JSON
        body fails at once.

        Raises:
            RequestFailed: no usable answer; ``reason`` says why.
        """
        cfg = self.config
        url = f"{self.base_url}{path}"
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
                resp = self.session.request(
                    method, url, json=payload, timeout=(cfg.connect_timeout_s, cfg.request_timeout_s)
                )
            except (requests.ConnectionError, requests.ConnectTimeout) as exc:
                if self._stop.is_set():
                    raise RequestFailed("stopped while waiting for the reply", None, attempts) from None
                last, last_status = f"{type(exc).__name__}: {_short(str(exc))}", None
            except requests.Timeout:
                if self._stop.is_set():
                    raise RequestFailed("stopped while waiting for the reply", None, attempts) from None
                raise RequestFailed(
                    f"no answer within {cfg.request_timeout_s:g} s (read timeout)", None, attempts
                ) from None
            except requests.RequestException as exc:
                if self._stop.is_set():
                    raise RequestFailed("stopped while waiting for the reply", None, attempts) from None
                raise RequestFailed(f"{type(exc).__name__}: {_short(str(exc))}", None, attempts) from None
            else:
                latency = time.monotonic() - started
                if resp.status_code == 200:
                    if not parse_json:
                        return Reply(body=resp.text, latency_s=latency, attempts=attempts)
                    try:
                        body = resp.json()
                    except ValueError:
                        raise RequestFailed(
                            f"HTTP 200 with a body that is not JSON: {_short(resp.text)!r}", 200, attempts
                        ) from None
                    return Reply(body=body, latency_s=latency, attempts=attempts)
                last, last_status = f"HTTP {resp.status_code}: {_short(resp.text)}", resp.status_code
                if resp.status_code not in _RETRY_STATUS and not 500 <= resp.status_code < 600:
                    raise RequestFailed(last, last_status, attempts)
                retry_after = resp.headers.get("Retry-After")
            if attempts > cfg.max_retries:
                raise RequestFailed(f"{last} (after {attempts} attempts)", last_status, attempts)
            self._stop.wait(self._delay(attempts - 1, retry_after))

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
    """Run ``work`` over ``items`` on ``client.config.concurrency`` threads; results in ``items`` order.

    ``work`` must not raise for a failed request: it returns a result that ``is_error`` recognises.
    ``on_result`` is called in the calling thread, once per result, as each finishes (write it to disk
    there: results survive a stop). Stops early when ``is_alive()`` turns false (checked every
    ``alive_poll_s`` seconds), when errors exceed ``max_error_rate * len(items)``, or after
    ``max_consecutive_errors`` errors in a row: what has not started is cancelled, retries give up, and
    connections still waiting for a reply are cut (:meth:`HttpClient.stop`); it then waits at most
    ``abort_grace_s`` seconds for the workers.

    Raises:
        EvalAborted: stopped early; ``partial`` lists the finished results (completion order).
        Exception: whatever ``work`` or ``on_result`` raised (after stopping the rest).
    """
    cfg = client.config
    total = len(items)
    results: list[R | None] = [None] * total
    finished: list[R] = []
    errors = 0
    streak = 0
    progress = _Progress(total, cfg.progress, desc)
    pool = cf.ThreadPoolExecutor(
        max_workers=min(cfg.concurrency, max(1, total)), thread_name_prefix="mlaprop"
    )
    futures: dict[cf.Future[R], int] = {}
    abort: str | None = None
    clean = False
    try:
        futures = {pool.submit(work, item): i for i, item in enumerate(items)}
        pending = set(futures)
        while pending:
            done, pending = cf.wait(pending, timeout=cfg.alive_poll_s, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                result = fut.result()
                results[futures[fut]] = result
                finished.append(result)
                failed = is_error(result)
                errors += failed
                streak = streak + 1 if failed else 0
                progress.update(errors)
                if on_result is not None:
                    on_result(result)
            if pending:
                abort = _stop_reason(cfg, errors, streak, len(finished), total, is_alive)
                if abort is not None:
                    break
        clean = abort is None
    finally:
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


def _stop_reason(
    cfg: ClientConfig,
    errors: int,
    streak: int,
    finished: int,
    total: int,
    is_alive: Callable[[], bool] | None,
) -> str | None:
    if errors > cfg.max_error_rate * total:
        return (
            f"{errors} of {total} requests failed, over the {cfg.max_error_rate:.0%} bound "
            f"(after {finished} finished); stopped the rest"
        )
    if streak >= cfg.max_consecutive_errors:
        return (
            f"the last {streak} requests all failed (after {finished} of {total} finished); stopped the rest"
        )
    if is_alive is not None and not is_alive():
        return f"the server process exited with {total - finished} of {total} requests unfinished"
    return None


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
    """

    lang: str
    n_total: int
    records: tuple[ItemRecord, ...]
    wall_s: float
    model: str
    aborted: str | None = None

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


def run_mgsm(
    base_url: str,
    dataset: MgsmDataset,
    *,
    config: ClientConfig | None = None,
    model: str | None = None,
    is_alive: Callable[[], bool] | None = None,
    on_record: Callable[[ItemRecord], None] | None = None,
    limit: int | None = None,
) -> EvalResult:
    """Ask every question of ``dataset`` (the first ``limit`` when given) and score the replies.

    Each request is SGLang's ``mgsm_<lang>`` request (:func:`mlaprop.mgsm.chat_request`) sent to
    ``base_url`` + ``/v1/chat/completions``; both parsers score every reply. ``on_record`` receives each
    record as it finishes (write it to disk there). ``model`` defaults to the first of ``/v1/models``.

    Raises:
        EvalAborted: the server died, the model list failed, or errors passed ``config.max_error_rate``;
            ``partial`` is an :class:`EvalResult` of what finished (``aborted`` set).
    """
    cfg = config or ClientConfig()
    items = dataset.items if limit is None else dataset.items[: max(0, limit)]
    started = time.monotonic()
    with HttpClient(base_url, cfg) as client:
        if model is None:
            try:
                model = first_model(client)
            except RequestFailed as exc:
                reason = f"could not list the server's models: {exc.reason}"
                raise EvalAborted(
                    reason, EvalResult(dataset.lang, len(items), (), time.monotonic() - started, "", reason)
                ) from None
        name = model

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
            partial = EvalResult(dataset.lang, len(items), done, time.monotonic() - started, name, exc.reason)
            raise EvalAborted(exc.reason, partial) from None
    return EvalResult(dataset.lang, len(items), tuple(records), time.monotonic() - started, name)
