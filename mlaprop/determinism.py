"""Does the server's output depend on batch composition? SGLang's ``test_deterministic.py``, over HTTP.

At temperature 0 with a fixed ``sampling_seed`` a server started with ``--enable-deterministic-inference``
must give one output per prompt however requests are batched: the same text, output token ids and, when
asked for (``return_logprob``), bit-identical output logprobs. The check sends a set of probe prompts the
two ways a server batches them (source: SGLang ``python/sglang/test/test_deterministic.py`` and
``srt/managers/io_struct.py`` ``GenerateReqInput``, 0.5.11):

* a **server-side batch**: one ``POST /generate`` whose ``text`` is a list of N prompts (the answer is a
  list of N ``{"text", "output_ids", "meta_info"}`` objects in the same order), as ``test_deterministic.py``
  sends its ``prefix`` batches;
* **concurrent requests**: N ``POST /generate`` requests with one text each, released together.

The probes mix short and long prompts: :data:`PROMPT_1` (``single``), :data:`PROMPT_2` (``single-mix``)
and prefixes of :data:`LONG_PROMPT` (``prefix-<chars>``: 1 to 4097 characters, so batches hold sequences of
very different lengths that share prefixes in the radix cache).

Schedule: waves
    Wave 0 is the reference: the ``single`` prompt alone, nothing else in flight (it also warms the server:
    SGLang's test notes that a cache flush before any request can hang). Then, for each batch size ``b`` of
    ``batch_sizes`` above 1, ascending, one wave: ``POST /flush_cache`` on an idle server, then a list request
    of ``b`` probes and ``min(b, max_concurrent)`` concurrent single-text requests, all sent together. The
    last wave gets extra list requests of the largest size until the samples reach the power target below
    (more waves of that size when the server's limit would be exceeded). Batch sizes are capped at the
    server's limit (``max_running_requests``, read from ``GET /get_server_info``: the scheduler's
    ``internal_states[*].effective_max_running_requests_per_dp``, else the ``max_running_requests`` server
    argument) when it answers.

What overlapping does and does not do to the measurement
    Inside a wave the server-side batch and the concurrent requests run at the same time, so each is load for
    the other: a sample's batch is the wave's whole in-flight count (``2b`` plus top-ups), not ``b``; the
    report gives both (``batch_sizes`` is the round's ``b``, ``in_flight`` the wave's sequences). That only
    varies the batch compositions further, which is what is being tested, and it is why a wave costs one
    request latency instead of one per round. Waves do **not** overlap each other: each starts from an idle
    server after a cache flush, because (a) SGLang refuses to flush while requests are pending, so the
    shared-prefix probe would never see a cold cache, and (b) overlapping the ladder of sizes would merge its
    load levels into one: every sample of a prompt would run under the same batch, and a batch-size
    dependence could not show. The reference never overlaps anything. So the check costs about ``1 + number
    of sizes above 1`` request latencies (4 with the defaults), plus any extra top-up waves.

Power (the flip model)
    Each answer independently differs from its prompt's batch-invariant output with probability ``p`` (a
    per-request flip rate). A prompt with ``k`` answers gives ``k - 1`` comparisons against its first; with
    ``n`` comparisons in all the check misses every flip with probability ``(1 - p)^n`` (for ``p <= 1/2``
    this is conservative: two flips that agree with each other but not with the rest are caught too). The
    smallest rate caught with probability ``confidence`` is therefore ``1 - (1 - confidence)^(1/n)``; the
    defaults plan at least :func:`samples_needed` (0.01, 0.95) = 299 comparisons, so a server that flips 1
    answer in 100 is caught with at least 95% probability.

Verdict: :class:`Status`
    ``PASS``: every wave answered and every prompt gave exactly one distinct output. ``FAIL``: some prompt
    gave more than one (text, token ids or logprobs), even if the check stopped early: divergent answers are
    evidence whatever happened after. ``ERROR`` (infrastructure, never a determinism verdict): the server
    died (``is_alive()`` false, or connections refused), hung (no answer within the request timeout),
    answered malformed JSON or failed a request after its retries, or the check was interrupted; the first
    such cause stops the check at once (requests in flight are cancelled) and is named in ``cause``.
    ``/flush_cache`` answering busy (HTTP 400, what SGLang answers while requests are pending) is retried
    for up to ``flush_wait_s`` seconds and, if it still refuses, noted: that wave runs on a warm cache, which a
    deterministic server must also answer identically (later flushes are then tried once each).

Resources and stopping
    Threads are bounded independently of batch size: a wave holds at most ``max_concurrent`` concurrent
    requests and at most ``max_concurrent + MAX_LIST_REQUESTS`` requests in all, one thread each whatever a
    list's length, so a 1024-prompt batch costs one thread. The calling thread waits in steps of at most 0.25 s, checking ``is_alive()``, so a
    dead server is noticed within about a quarter of a second; ``KeyboardInterrupt`` or ``SystemExit`` (such
    as :class:`mlaprop.server.Terminated`) cuts the connections of requests in flight, waits at most 1 s for
    their threads, hands the answered waves to ``on_progress`` as an ``ERROR`` result, and propagates.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import enum
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from mlaprop.evalclient import ClientConfig, HttpClient, Reply, RequestFailed

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_CONFIDENCE",
    "DEFAULT_FLIP_RATE",
    "DEFAULT_PREFIX_LENGTHS",
    "LONG_PROMPT",
    "MAX_CONCURRENT",
    "MAX_LIST_REQUESTS",
    "PROMPT_1",
    "PROMPT_2",
    "DeterminismResult",
    "Probe",
    "PromptOutcome",
    "Request",
    "Status",
    "Variant",
    "Wave",
    "check_determinism",
    "generate_request",
    "plan_waves",
    "probes_for",
    "samples_needed",
    "server_limit_of",
    "smallest_flip_rate",
]

#: SGLang's ``test_deterministic.py`` prompts.
PROMPT_1 = "Tell me about Richard Feynman: "
PROMPT_2 = (
    "Generate 1000 random numbers. Go directly into it, don't say Sure and don't say here are numbers. "
    "Just start with a number."
)

#: Wave sizes: 1 is the reference alone; 4 stays under 17 in flight (2b = 8), 16 and 64 go over it.
DEFAULT_BATCH_SIZES = (1, 4, 16, 64)
#: SGLang's prefix lengths (characters of the long prompt).
DEFAULT_PREFIX_LENGTHS = (1, 511, 2048, 4097)
#: SGLang's ``--sampling-seed`` and ``--max-new-tokens`` defaults for the test.
DEFAULT_SEED = 42
DEFAULT_MAX_NEW_TOKENS = 100
#: The per-request flip rate the default plan catches with :data:`DEFAULT_CONFIDENCE`.
DEFAULT_FLIP_RATE = 0.01
DEFAULT_CONFIDENCE = 0.95
#: Concurrent single-text requests per wave (threads); larger batches go as server-side (list) batches.
MAX_CONCURRENT = 64
#: Threads beyond ``max_concurrent`` for list requests (a wave holds at most ``max_concurrent + 8`` requests).
MAX_LIST_REQUESTS = 8
#: How long the calling thread waits between liveness checks, seconds.
_POLL_S = 0.25
#: After a stop, how long to wait for request threads, seconds.
_STOP_GRACE_S = 1.0


def _long_prompt() -> str:
    topics = ("rivers", "bridges", "clocks", "gardens", "lighthouses", "libraries", "trains", "orchards")
    parts = [
        f"Paragraph {i + 1}. The history of {topics[i % len(topics)]} in town number {i * 7 + 3} began "
        f"in year {1800 + i * 13}, when {i + 2} engineers measured {i * 11 + 5} metres of ground and "
        f"wrote down what they saw, one careful line at a time, so that others could continue the work."
        for i in range(40)
    ]
    return "\n".join(parts)


#: A fixed, generated text of about 8,900 characters whose prefixes form the ``prefix`` probe's prompts.
LONG_PROMPT = _long_prompt()


class Status(str, enum.Enum):
    """The check's verdict: ``pass``, ``fail`` (batch dependence seen) or ``error`` (infrastructure)."""

    PASS = "pass"
    FAIL = "fail"
    ERROR = "error"


def generate_request(
    text: str | Sequence[str], max_new_tokens: int, seed: int, *, return_logprob: bool = False
) -> dict[str, Any]:
    """The native ``POST /generate`` body: greedy, fixed seed, ``max_new_tokens`` tokens; a list ``text`` is
    a server-side batch. ``return_logprob`` asks for ``meta_info.output_token_logprobs``."""
    body: dict[str, Any] = {
        "text": text if isinstance(text, str) else list(text),
        "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens, "sampling_seed": seed},
    }
    if return_logprob:
        body["return_logprob"] = True
    return body


def samples_needed(flip_rate: float, confidence: float) -> int:
    """The fewest comparisons ``n`` with ``1 - (1 - flip_rate)^n >= confidence``.

    Raises:
        ValueError: ``flip_rate`` or ``confidence`` outside (0, 1).
    """
    if not (0.0 < flip_rate < 1.0 and 0.0 < confidence < 1.0):
        raise ValueError(f"flip rate and confidence must be within (0, 1), got {flip_rate}, {confidence}")
    n = math.ceil(math.log1p(-confidence) / math.log1p(-flip_rate) - 1e-9)
    return max(1, n)


def smallest_flip_rate(comparisons: int, confidence: float = DEFAULT_CONFIDENCE) -> float | None:
    """The smallest per-request flip rate caught with probability ``confidence`` by ``comparisons``
    independent comparisons: ``1 - (1 - confidence)^(1/n)``; ``None`` for no comparison."""
    if comparisons < 1:
        return None
    return float(1.0 - (1.0 - confidence) ** (1.0 / comparisons))


# --------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Probe:
    """One probe prompt: its label (``single``, ``single-mix``, ``prefix-<chars>``) and text."""

    label: str
    text: str


@dataclass(frozen=True)
class Request:
    """One HTTP request of a wave.

    Attributes:
        kind: ``alone`` (the reference), ``list`` (one request carrying ``len(probes)`` texts) or
            ``concurrent`` (one text, sent together with the wave's others).
        probes: the prompts it carries, in order.
    """

    kind: str
    probes: tuple[Probe, ...]


@dataclass(frozen=True)
class Wave:
    """Requests sent together, after a cache flush when ``flush``; ``size`` is the batch size ``b``."""

    index: int
    size: int
    flush: bool
    requests: tuple[Request, ...]

    @property
    def in_flight(self) -> int:
        """Sequences in flight when every request of the wave is running."""
        return sum(len(r.probes) for r in self.requests)


def probes_for(prompt: str, prefix_lengths: Sequence[int]) -> tuple[Probe, ...]:
    """The probe set: ``prompt`` (``single``), :data:`PROMPT_2` (``single-mix``) and the prefixes."""
    return (
        Probe("single", prompt),
        Probe("single-mix", PROMPT_2),
        *(Probe(f"prefix-{n}", LONG_PROMPT[:n]) for n in prefix_lengths),
    )


def plan_waves(
    batch_sizes: Sequence[int],
    probes: Sequence[Probe],
    *,
    min_samples: int = 0,
    server_limit: int | None = None,
    max_concurrent: int = MAX_CONCURRENT,
) -> tuple[Wave, ...]:
    """The check's waves (pure): the reference alone, one wave per size above 1, top-ups to ``min_samples``.

    Sizes are capped at ``server_limit`` and deduplicated; extra list requests of the largest size are added
    to the last wave while its in-flight count stays within ``server_limit`` (when known) and it has fewer
    than ``max_concurrent + MAX_LIST_REQUESTS`` requests (the thread bound), then to new waves of that size.

    Raises:
        ValueError: no probe, a batch size < 1, ``max_concurrent`` < 1 or ``server_limit`` < 1.
    """
    if not probes:
        raise ValueError("the check needs at least one probe prompt")
    if (
        any(b < 1 for b in batch_sizes)
        or max_concurrent < 1
        or (server_limit is not None and server_limit < 1)
    ):
        raise ValueError(
            f"batch sizes, max_concurrent and the server limit must be >= 1, got {tuple(batch_sizes)}, "
            f"{max_concurrent}, {server_limit}"
        )
    cap = server_limit if server_limit is not None else max(batch_sizes, default=1)
    sizes = sorted({min(b, cap) for b in batch_sizes if min(b, cap) >= 2})
    d = len(probes)
    waves = [Wave(0, 1, False, (Request("alone", (probes[0],)),))]
    offset = 1
    for b in sizes:
        listed = tuple(probes[(offset + i) % d] for i in range(b))
        offset += b
        conc = min(b, max_concurrent)
        together = tuple(Request("concurrent", (probes[(offset + i) % d],)) for i in range(conc))
        offset += conc
        waves.append(Wave(len(waves), b, True, (Request("list", listed), *together)))
    total = sum(w.in_flight for w in waves)
    if not sizes:
        return tuple(waves)
    b = sizes[-1]
    while total < min_samples:
        last = waves[-1]
        fits = server_limit is None or last.in_flight + b <= server_limit
        extra = Request("list", tuple(probes[(offset + i) % d] for i in range(b)))
        offset += b
        if last.size == b and len(last.requests) < max_concurrent + MAX_LIST_REQUESTS and fits:
            waves[-1] = replace(last, requests=(*last.requests, extra))
        else:
            waves.append(Wave(len(waves), b, True, (extra,)))
        total += b
    return tuple(waves)


def server_limit_of(info: Any) -> int | None:
    """The most requests the server runs at once, from a ``GET /get_server_info`` answer (SGLang 0.5.11
    ``http_server.py`` ``server_info``: server args, scheduler info and ``internal_states``): the smallest
    ``effective_max_running_requests_per_dp`` of ``internal_states``, else ``max_running_requests``; ``None``
    when neither is a positive whole number."""
    if not isinstance(info, dict):
        return None
    found: list[int] = []
    states = info.get("internal_states")
    if isinstance(states, list):
        for s in states:
            v = s.get("effective_max_running_requests_per_dp") if isinstance(s, dict) else None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                found.append(v)
    if found:
        return min(found)
    v = info.get("max_running_requests")
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


# --------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Variant:
    """One distinct output of a prompt.

    Attributes:
        text: the generated text (first 200 characters).
        output_ids: the first 32 output token ids, or ``None`` when the server did not return them.
        count: how many samples gave it.
        batch_sizes: the batch sizes ``b`` (sorted, unique) of the waves that gave it (1: the reference).
        at_divergence: 60 characters around where this text first differs from the most frequent one (for
            the most frequent, where the first other one differs); ``""`` when the texts are equal.
        kinds: how the samples were sent (``alone``, ``list``, ``concurrent``; sorted, unique).
        in_flight: the waves' in-flight sequence counts (sorted, unique).
    """

    text: str
    output_ids: tuple[int, ...] | None
    count: int
    batch_sizes: tuple[int, ...]
    at_divergence: str = ""
    kinds: tuple[str, ...] = ()
    in_flight: tuple[int, ...] = ()


@dataclass(frozen=True)
class PromptOutcome:
    """What one prompt gave across all waves.

    Attributes:
        label: ``single``, ``single-mix`` or ``prefix-<chars>``.
        prompt_chars: prompt length, characters.
        samples: outputs received.
        variants: the distinct outputs, most frequent first.
        diverges_at: the first character index where the outputs' texts differ, or ``None``.
        first_token_diff: the first output position whose token id differs between variants, or ``None``.
        max_logprob_diff: the largest absolute difference of an output logprob between a variant and the
            most frequent one, over the positions before their token ids first differ; ``None`` when no
            logprobs were compared (0.0: compared, equal).
    """

    label: str
    prompt_chars: int
    samples: int
    variants: tuple[Variant, ...]
    diverges_at: int | None = None
    first_token_diff: int | None = None
    max_logprob_diff: float | None = None

    @property
    def distinct(self) -> int:
        """Number of distinct outputs."""
        return len(self.variants)

    @property
    def passed(self) -> bool:
        """Exactly one distinct output."""
        return self.samples > 0 and self.distinct == 1


@dataclass(frozen=True)
class DeterminismResult:
    """The determinism check's verdict.

    Attributes:
        passed: ``status`` is :attr:`Status.PASS`.
        outcomes: one per prompt that was answered.
        errors: failed requests and the stop cause, one line each.
        reason: one sentence saying why it passed, failed or could not decide.
        requests: HTTP ``/generate`` requests sent.
        compared_output_ids: the server returned output token ids, and they were compared too.
        batch_sizes: the wave sizes used (after the server's limit), 1 first.
        prefix_lengths: the prefix lengths used, characters.
        seed: the ``sampling_seed`` sent.
        max_new_tokens: tokens generated per request.
        wall_s: wall time of the check, seconds.
        status: ``PASS``, ``FAIL`` or ``ERROR``; derived from ``passed`` when not given.
        cause: for ``ERROR``, what stopped the check (server died, hung, malformed answer, interrupted).
        compared_logprobs: the server returned output logprobs, and they were compared bit for bit.
        samples: answers received (sequences, a list request counting each of its texts).
        comparisons: answers beyond the first of each prompt (the ``n`` of the power statement).
        detectable_flip_rate: the smallest per-request flip rate caught with probability ``confidence``
            given ``comparisons`` (see the module docstring); ``None`` with no comparison.
        confidence: the probability that statement uses (0.95).
        waves: waves answered in full.
        waves_planned: waves planned.
        server_limit: the server's running-request limit used to cap sizes, or ``None`` when unknown.
        notes: what did not go as planned without deciding anything (a cache flush refused, sizes capped).
    """

    passed: bool
    outcomes: tuple[PromptOutcome, ...]
    errors: tuple[str, ...]
    reason: str
    requests: int
    compared_output_ids: bool
    batch_sizes: tuple[int, ...]
    prefix_lengths: tuple[int, ...]
    seed: int
    max_new_tokens: int
    wall_s: float
    status: Status | None = None
    cause: str = ""
    compared_logprobs: bool = False
    samples: int = 0
    comparisons: int = 0
    detectable_flip_rate: float | None = None
    confidence: float = DEFAULT_CONFIDENCE
    waves: int = 0
    waves_planned: int = 0
    server_limit: int | None = None
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.status is None:
            object.__setattr__(self, "status", Status.PASS if self.passed else Status.FAIL)
        elif self.passed != (self.status is Status.PASS):
            raise ValueError(f"passed={self.passed} contradicts status {self.status}")

    def to_json(self) -> dict[str, Any]:
        """The report's view: verdict, cause, power, and distinct outputs per prompt (5 variants at most)."""
        return {
            "status": Status(self.status).value,
            "passed": self.passed,
            "reason": self.reason,
            "cause": self.cause or None,
            "requests": self.requests,
            "samples": self.samples,
            "comparisons": self.comparisons,
            "detectable_flip_rate": self.detectable_flip_rate,
            "confidence": self.confidence,
            "compared_output_ids": self.compared_output_ids,
            "compared_logprobs": self.compared_logprobs,
            "batch_sizes": list(self.batch_sizes),
            "prefix_lengths": list(self.prefix_lengths),
            "server_limit": self.server_limit,
            "waves": self.waves,
            "waves_planned": self.waves_planned,
            "seed": self.seed,
            "max_new_tokens": self.max_new_tokens,
            "wall_s": self.wall_s,
            "errors": list(self.errors[:20]),
            "notes": list(self.notes[:20]),
            "prompts": [
                {
                    "label": o.label,
                    "prompt_chars": o.prompt_chars,
                    "samples": o.samples,
                    "distinct": o.distinct,
                    "diverges_at": o.diverges_at,
                    "first_token_diff": o.first_token_diff,
                    "max_logprob_diff": o.max_logprob_diff,
                    "variants": [
                        {
                            "count": v.count,
                            "batch_sizes": list(v.batch_sizes),
                            "kinds": list(v.kinds),
                            "in_flight": list(v.in_flight),
                            "text": v.text,
                        }
                        for v in o.variants[:5]
                    ],
                }
                for o in self.outcomes
            ],
        }


# --------------------------------------------------------------------------------------------- answers

_Key = tuple[str, "tuple[int, ...] | None", "tuple[float | None, ...] | None"]


@dataclass(frozen=True)
class _Sample:
    key: _Key
    size: int
    kind: str
    in_flight: int


class _Malformed(Exception):
    pass


def _output_ids(body: dict[str, Any]) -> tuple[int, ...] | None:
    ids = body.get("output_ids")
    if ids is None and isinstance(body.get("meta_info"), dict):
        ids = body["meta_info"].get("output_ids")
    if isinstance(ids, list) and all(isinstance(i, int) for i in ids):
        return tuple(ids)
    return None


def _logprobs(body: dict[str, Any]) -> tuple[float | None, ...] | None:
    """``meta_info.output_token_logprobs``: SGLang's ``[logprob, token_id, text_or_null]`` per token."""
    meta = body.get("meta_info")
    rows = meta.get("output_token_logprobs") if isinstance(meta, dict) else None
    if not isinstance(rows, list):
        return None
    out: list[float | None] = []
    for row in rows:
        value = row[0] if isinstance(row, list) and row else None
        out.append(float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None)
    return tuple(out)


def _sample_key(body: Any) -> _Key:
    if not isinstance(body, dict) or not isinstance(body.get("text"), str):
        raise _Malformed(f"an answer without a text field: {str(body)[:200]!r}")
    return (body["text"], _output_ids(body), _logprobs(body))


def _first_difference(a: Sequence[Any], b: Sequence[Any]) -> int | None:
    """The first index where ``a`` and ``b`` differ, or ``None`` when equal."""
    if a == b:
        return None
    for i, (x, y) in enumerate(zip(a, b)):  # noqa: B905 - the shorter one ends the comparison
        if x != y:
            return i
    return min(len(a), len(b))


def _logprob_diff(a: _Key, b: _Key) -> float | None:
    la, lb = a[2], b[2]
    if la is None or lb is None:
        return None
    ids_a, ids_b = a[1], b[1]
    stop = min(len(la), len(lb))
    if ids_a is not None and ids_b is not None:
        first = _first_difference(ids_a, ids_b)
        if first is not None:
            stop = min(stop, first + 1)  # the first differing token's own logprob still compares
    diffs = [abs(x - y) for x, y in zip(la[:stop], lb[:stop]) if x is not None and y is not None]  # noqa: B905
    return max(diffs, default=0.0)


def _outcome(label: str, chars: int, samples: list[_Sample]) -> PromptOutcome:
    groups: dict[_Key, list[_Sample]] = {}
    for s in samples:
        groups.setdefault(s.key, []).append(s)
    ranked = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    ref = ranked[0][0]
    firsts = [_first_difference(ref[0], key[0]) for key, _ in ranked[1:]]
    at = min((d for d in firsts if d is not None), default=None)
    token_firsts = [
        _first_difference(ref[1], key[1])
        for key, _ in ranked[1:]
        if ref[1] is not None and key[1] is not None
    ]
    first_token = min((d for d in token_firsts if d is not None), default=None)
    lp = [_logprob_diff(ref, key) for key, _ in ranked]
    lp_known = [d for d in lp if d is not None]
    variants = []
    for rank, (key, group) in enumerate(ranked):
        text, ids, _ = key
        d = at if rank == 0 else firsts[rank - 1]
        start = max(0, d - 20) if d is not None else 0
        variants.append(
            Variant(
                text=text[:200],
                output_ids=None if ids is None else ids[:32],
                count=len(group),
                batch_sizes=tuple(sorted({s.size for s in group})),
                at_divergence=text[start : start + 60] if d is not None else "",
                kinds=tuple(sorted({s.kind for s in group})),
                in_flight=tuple(sorted({s.in_flight for s in group})),
            )
        )
    return PromptOutcome(
        label, chars, len(samples), tuple(variants), at, first_token, max(lp_known) if lp_known else None
    )


# --------------------------------------------------------------------------------------------- running


class _Stop(Exception):
    """Ends the check early with an infrastructure cause."""


@dataclass
class _State:
    samples: dict[str, list[_Sample]] = field(default_factory=dict)
    chars: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    requests: int = 0
    waves: int = 0
    cause: str = ""


class _Runner:
    """Sends waves on a bounded pool; the calling thread waits in short steps, watching ``is_alive``."""

    def __init__(
        self,
        client: HttpClient,
        pool: cf.ThreadPoolExecutor,
        is_alive: Callable[[], bool] | None,
        body: Callable[[Request], dict[str, Any]],
        state: _State,
    ) -> None:
        self.client = client
        self.pool = pool
        self.is_alive = is_alive
        self.body = body
        self.state = state
        self.pending: list[cf.Future[Any]] = []
        self.flush_gave_up = False
        self._barrier: threading.Barrier | None = None

    def _watch(self, where: str) -> None:
        if self.is_alive is not None and not self.is_alive():
            raise _Stop(f"the server process exited {where}")

    def wait(self, futures: Sequence[cf.Future[Any]], where: str) -> None:
        """Wait for ``futures``, checking the server every :data:`_POLL_S` seconds."""
        pending = set(futures)
        while pending:
            self._watch(where)
            _, pending = cf.wait(pending, timeout=_POLL_S)

    def stop(self) -> None:
        """Cut requests in flight and give their threads at most :data:`_STOP_GRACE_S` seconds."""
        self.client.stop()
        if self._barrier is not None:
            self._barrier.abort()
        for fut in self.pending:
            fut.cancel()
        cf.wait([f for f in self.pending if not f.done()], timeout=_STOP_GRACE_S)

    def call(self, fn: Callable[[], Reply], where: str) -> Reply:
        fut = self.pool.submit(fn)
        self.pending = [fut]
        self.wait([fut], where)
        return fut.result()

    def server_limit(self) -> int | None:
        try:
            reply = self.call(lambda: self.client.get_json("/get_server_info"), "while reading its limit")
        except RequestFailed as exc:
            self.state.notes.append(f"GET /get_server_info: {exc.reason}; batch sizes not capped")
            return None
        return server_limit_of(reply.body)

    def flush(self, wave: Wave, budget_s: float) -> None:
        """``POST /flush_cache`` until it succeeds; busy (400) answers are retried for ``budget_s`` seconds
        (once one flush has given up, later ones are tried once)."""
        if self.flush_gave_up:
            budget_s = 0.0
        deadline = time.monotonic() + budget_s
        # SGLang 0.5.11 waits up to ``timeout`` seconds for an idle scheduler itself; older versions ignore it
        path = f"/flush_cache?timeout={min(budget_s, 5.0):g}"
        delay = 0.05
        tries = 0
        while True:
            tries += 1
            try:
                self.call(
                    lambda: self.client.request("POST", path, parse_json=False), f"before wave {wave.index}"
                )
                if tries > 1:
                    self.state.notes.append(
                        f"POST /flush_cache busy {tries - 1} times before wave {wave.index}; flushed after "
                        f"{budget_s - (deadline - time.monotonic()):.2f} s"
                    )
                return
            except RequestFailed as exc:
                busy = exc.status == 400
                left = deadline - time.monotonic()
                if not busy or left <= 0:
                    self.flush_gave_up = True
                    what = "still busy" if busy else "failed"
                    self.state.notes.append(
                        f"POST /flush_cache {what} after {tries} tries ({exc.reason}); wave {wave.index} "
                        f"(batch size {wave.size}) ran on a warm cache"
                    )
                    return
                end = time.monotonic() + min(delay, left)
                while time.monotonic() < end:  # sleep in steps so death and interrupts are seen
                    self._watch(f"before wave {wave.index}")
                    time.sleep(min(_POLL_S, max(0.0, end - time.monotonic())))
                delay = min(delay * 2, 1.0)

    def run_wave(self, wave: Wave) -> None:
        """Send every request of ``wave`` together; record answers; stop at the first failure."""
        barrier = threading.Barrier(len(wave.requests)) if len(wave.requests) > 1 else None
        self._barrier = barrier
        client = self.client

        def send(req: Request) -> Any:
            if barrier is not None:
                with contextlib.suppress(threading.BrokenBarrierError):  # slow thread start: send anyway
                    barrier.wait(timeout=5.0)
            return client.post_json("/generate", self.body(req)).body

        futures = {self.pool.submit(send, req): req for req in wave.requests}
        self.pending = list(futures)
        self.state.requests += len(futures)
        pending = set(futures)
        where = f"during wave {wave.index} (batch size {wave.size}, {wave.in_flight} in flight)"
        while pending:
            self._watch(where)
            done, pending = cf.wait(pending, timeout=_POLL_S, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                req = futures[fut]
                what = f"wave {wave.index}, {req.kind} request of {len(req.probes)}"
                try:
                    self._record(wave, req, fut.result())
                except RequestFailed as exc:
                    raise _Stop(f"{what}: {_classify(exc)}") from None
                except _Malformed as exc:
                    raise _Stop(f"{what}: malformed answer: {exc}") from None
        self.state.waves += 1

    def _record(self, wave: Wave, req: Request, body: Any) -> None:
        if req.kind == "list":
            if not isinstance(body, list) or len(body) != len(req.probes):
                got = f"a list of {len(body)}" if isinstance(body, list) else type(body).__name__
                raise _Malformed(f"expected a list of {len(req.probes)} answers, got {got}")
            answers = body
        else:
            answers = [body[0] if isinstance(body, list) and len(body) == 1 else body]
        keys = [_sample_key(a) for a in answers]  # all or nothing: a malformed element rejects the request
        for probe, key in zip(req.probes, keys):  # noqa: B905 - lengths checked above
            self.state.chars[probe.label] = len(probe.text)
            self.state.samples.setdefault(probe.label, []).append(
                _Sample(key, wave.size, req.kind, wave.in_flight)
            )


def _classify(exc: RequestFailed) -> str:
    """``exc.reason`` with the infrastructure class in front."""
    reason = exc.reason
    if "read timeout" in reason:
        return f"the server hung: {reason}"
    if exc.status == 200:
        return f"malformed answer: {reason}"
    if exc.status is None and "stopped" not in reason:
        return f"the server stopped answering: {reason}"
    return reason


def check_determinism(
    base_url: str,
    *,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    prefix_lengths: Sequence[int] = DEFAULT_PREFIX_LENGTHS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    seed: int = DEFAULT_SEED,
    prompt: str = PROMPT_1,
    config: ClientConfig | None = None,
    is_alive: Callable[[], bool] | None = None,
    return_logprob: bool = True,
    flip_rate: float = DEFAULT_FLIP_RATE,
    confidence: float = DEFAULT_CONFIDENCE,
    server_limit: int | None = None,
    read_server_limit: bool = True,
    max_concurrent: int = MAX_CONCURRENT,
    flush_wait_s: float = 30.0,
    on_progress: Callable[[DeterminismResult], None] | None = None,
) -> DeterminismResult:
    """Check that outputs do not depend on batch composition (the module docstring gives the schedule, the
    power model and what each status means).

    Args:
        base_url: the server, ``http://host:port``.
        batch_sizes: wave sizes; 1 is always sent (the reference), sizes above 1 make one wave each.
        prefix_lengths: ``LONG_PROMPT`` prefixes used as probes, characters; empty: no prefix probes.
        max_new_tokens: tokens generated per answer.
        seed: ``sampling_params.sampling_seed``.
        prompt: the ``single`` probe (sent alone as the reference).
        config: timeouts, retries, API key (``concurrency`` is replaced by the check's own bound).
        is_alive: the server process is running; checked every 0.25 s.
        return_logprob: ask for output logprobs and compare them bit for bit.
        flip_rate, confidence: the plan adds samples until a flip rate of ``flip_rate`` is caught with
            probability ``confidence``.
        server_limit: cap batch sizes here; ``None`` reads it from ``GET /get_server_info`` when
            ``read_server_limit``.
        max_concurrent: single-text requests per wave (threads).
        flush_wait_s: how long busy ``/flush_cache`` answers are retried before a wave, seconds.
        on_progress: given the result so far (``ERROR``, "unfinished") after each wave, and the partial
            result when an interrupt stops the check (write it to the report there).

    Returns:
        The verdict; ``ERROR`` results keep the waves answered before the stop.

    Raises:
        ValueError: no batch size, a batch size < 1, a prefix length < 1 or longer than :data:`LONG_PROMPT`,
            ``max_new_tokens`` < 1, ``max_concurrent`` < 1, or a rate outside (0, 1).
        KeyboardInterrupt, SystemExit: propagated after in-flight requests are cut (within about 1 s) and
            ``on_progress`` got the partial result.
    """
    sizes = tuple(batch_sizes)
    prefixes = tuple(prefix_lengths)
    if not sizes or any(b < 1 for b in sizes):
        raise ValueError(f"batch sizes must be a non-empty list of whole numbers >= 1, got {sizes}")
    if any(not 1 <= n <= len(LONG_PROMPT) for n in prefixes):
        raise ValueError(
            f"prefix lengths must be between 1 and {len(LONG_PROMPT)} characters, got {prefixes}"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if max_concurrent < 1:
        raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
    needed = samples_needed(flip_rate, confidence)
    started = time.monotonic()
    probes = probes_for(prompt, prefixes)
    widest = max_concurrent + MAX_LIST_REQUESTS  # the thread bound, whatever the batch sizes
    cfg = replace(config or ClientConfig(), concurrency=widest, progress=False)
    state = _State()
    limit = server_limit
    waves: tuple[Wave, ...] = ()

    def body(req: Request) -> dict[str, Any]:
        texts = [p.text for p in req.probes]
        text: str | list[str] = texts if req.kind == "list" else texts[0]
        return generate_request(text, max_new_tokens, seed, return_logprob=return_logprob)

    def result(final: bool) -> DeterminismResult:
        return _result(
            state, waves, probes, prefixes, seed, max_new_tokens, confidence, limit, final, started
        )

    pool = cf.ThreadPoolExecutor(widest, "mlaprop-det")
    clean = False
    with HttpClient(base_url, cfg) as client:
        runner = _Runner(client, pool, is_alive, body, state)
        try:
            try:
                if limit is None and read_server_limit:
                    limit = runner.server_limit()
                waves = plan_waves(
                    sizes,
                    probes,
                    min_samples=needed + len(probes),
                    server_limit=limit,
                    max_concurrent=max_concurrent,
                )
                capped = sorted({b for b in sizes if limit is not None and b > limit})
                if capped:
                    state.notes.append(f"batch sizes {capped} capped at the server's limit of {limit}")
                for wave in waves:
                    if wave.flush:
                        runner.flush(wave, flush_wait_s)
                    runner.run_wave(wave)
                    if on_progress is not None and wave is not waves[-1]:
                        on_progress(result(final=False))
                clean = True
            except _Stop as exc:
                state.cause = str(exc)
                state.errors.append(state.cause)
                runner.stop()
        except BaseException as exc:  # Ctrl-C, SIGTERM: cut what is in flight, keep what was answered
            # a second Ctrl-C while stopping or saving must not lose the partial result: it is swallowed
            # here, and the first one propagates
            with contextlib.suppress(BaseException):
                runner.stop()
            state.cause = f"interrupted ({type(exc).__name__}) during the check"
            state.errors.append(state.cause)
            if on_progress is not None and isinstance(exc, (KeyboardInterrupt, SystemExit)):
                with contextlib.suppress(BaseException):
                    on_progress(result(final=True))
            raise
        finally:  # after a stop, threads still cut off are not waited for
            pool.shutdown(wait=clean, cancel_futures=True)
    return result(final=True)


def _result(
    state: _State,
    waves: tuple[Wave, ...],
    probes: tuple[Probe, ...],
    prefixes: tuple[int, ...],
    seed: int,
    max_new_tokens: int,
    confidence: float,
    limit: int | None,
    final: bool,
    started: float,
) -> DeterminismResult:
    order = {p.label: i for i, p in enumerate(probes)}
    outcomes = tuple(
        _outcome(label, state.chars[label], samples)
        for label, samples in sorted(state.samples.items(), key=lambda kv: order.get(kv[0], len(order)))
    )
    samples = sum(o.samples for o in outcomes)
    comparisons = sum(o.samples - 1 for o in outcomes)
    rate = smallest_flip_rate(comparisons, confidence)
    cause = state.cause
    if not cause and not final:
        cause = f"unfinished: {state.waves} of {len(waves)} waves answered"
    if not cause and state.waves < len(waves):
        cause = f"only {state.waves} of {len(waves)} waves answered"
    if not cause and not outcomes:
        cause = "no answer at all"
    if (
        not cause
        and outcomes
        and all(not k.key[0] and not k.key[1] for g in state.samples.values() for k in g)
    ):
        # SGLang's test_deterministic fails an empty result too: identical nothing is no evidence
        cause = (
            f"every answer was empty ({samples} answers with no text and no output token), so nothing was "
            "compared: check the server's /generate and max_new_tokens"
        )
    if not cause and comparisons == 0:  # one answer compares with nothing: not a pass
        cause = (
            f"no comparison: {samples} answer{'s' if samples != 1 else ''} and none repeated, so batch invariance "
            "was not tested (a batch size above 1 is needed"
            + (
                f"; the server runs at most {limit} request at once"
                if limit is not None and limit <= 1
                else ""
            )
            + ")"
        )
    varied = [o for o in outcomes if not o.passed]
    status = Status.FAIL if varied else Status.ERROR if cause else Status.PASS
    reason = _reason(status, outcomes, varied, cause, samples, comparisons, rate, confidence)
    all_keys = [s.key for group in state.samples.values() for s in group]
    return DeterminismResult(
        passed=status is Status.PASS,
        outcomes=outcomes,
        errors=tuple(state.errors),
        reason=reason,
        requests=state.requests,
        compared_output_ids=any(k[1] is not None for k in all_keys),
        batch_sizes=tuple(sorted({w.size for w in waves})) or (1,),
        prefix_lengths=prefixes,
        seed=seed,
        max_new_tokens=max_new_tokens,
        wall_s=time.monotonic() - started,
        status=status,
        cause=cause,
        compared_logprobs=any(k[2] is not None for k in all_keys),
        samples=samples,
        comparisons=comparisons,
        detectable_flip_rate=rate,
        confidence=confidence,
        waves=state.waves,
        waves_planned=len(waves),
        server_limit=limit,
        notes=tuple(state.notes),
    )


def _power(comparisons: int, rate: float | None, confidence: float) -> str:
    if rate is None:
        return "no comparison, so no power"
    return (
        f"{comparisons} comparisons catch a per-request flip rate of {rate:.2g} (1 in {1 / rate:.0f}) "
        f"with {confidence:.0%} probability"
    )


def _reason(
    status: Status,
    outcomes: tuple[PromptOutcome, ...],
    varied: list[PromptOutcome],
    cause: str,
    samples: int,
    comparisons: int,
    rate: float | None,
    confidence: float,
) -> str:
    if status is Status.FAIL:
        worst = max(varied, key=lambda o: o.distinct)
        if worst.diverges_at is not None:
            where = f"texts differ from character {worst.diverges_at}"
        elif worst.first_token_diff is not None:
            where = f"texts equal, token ids differ from position {worst.first_token_diff}"
        else:
            where = f"texts and token ids equal, logprobs differ by up to {worst.max_logprob_diff:.3g}"
        shown = "; ".join(
            f"{'/'.join(v.kinds)} at batch sizes {list(v.batch_sizes)}: {v.count}x"
            + (f" ...{v.at_divergence!r}" if v.at_divergence else "")
            for v in worst.variants[:3]
        )
        tail = f" (the check then stopped: {cause})" if cause else ""
        return (
            f"fail: {len(varied)} of {len(outcomes)} prompts gave more than one output; "
            f"{worst.label} gave {worst.distinct} distinct outputs in {worst.samples} samples, {where} "
            f"({shown}){tail}"
        )
    if status is Status.ERROR:
        return f"error: {cause}; {samples} answers so far agree, {_power(comparisons, rate, confidence)}"
    return (
        f"pass: {len(outcomes)} prompts, {samples} samples, one distinct output each; "
        f"{_power(comparisons, rate, confidence)}"
    )
