"""Does the server's output depend on batch composition? SGLang's ``test_deterministic.py``, over HTTP.

At temperature 0 with a fixed ``sampling_seed`` a server started with ``--enable-deterministic-inference``
must give one output per prompt however requests are batched. Two probes, as in SGLang's
``python/sglang/test/test_deterministic.py``:

* ``single``: a prompt sent alone, then inside rounds of concurrent requests (batch sizes 1, 2, 4, 8, 16 by
  default), mixed with a second prompt so batches hold different sequences;
* ``prefix``: prompts that are prefixes (1, 511, 2048, 4097 characters by default) of one long text, sent
  together in rounds of those batch sizes, with ``POST /flush_cache`` before each round.

Outputs are compared on ``text`` and, when the server returns them, the output token ids
(``output_ids`` or ``meta_info.output_ids``). Pass means exactly one distinct output per prompt and no
failed request; a probe with no output at all fails.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from mlaprop.evalclient import ClientConfig, HttpClient, RequestFailed

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_PREFIX_LENGTHS",
    "LONG_PROMPT",
    "PROMPT_1",
    "PROMPT_2",
    "DeterminismResult",
    "PromptOutcome",
    "Variant",
    "check_determinism",
    "generate_request",
]

#: SGLang's ``test_deterministic.py`` prompts.
PROMPT_1 = "Tell me about Richard Feynman: "
PROMPT_2 = (
    "Generate 1000 random numbers. Go directly into it, don't say Sure and don't say here are numbers. "
    "Just start with a number."
)

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16)
#: SGLang's prefix lengths (characters of the long prompt).
DEFAULT_PREFIX_LENGTHS = (1, 511, 2048, 4097)
#: SGLang's ``--sampling-seed`` and ``--max-new-tokens`` defaults for the test.
DEFAULT_SEED = 42
DEFAULT_MAX_NEW_TOKENS = 100


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


def generate_request(text: str, max_new_tokens: int, seed: int) -> dict[str, Any]:
    """The native ``POST /generate`` body: greedy, fixed seed, ``max_new_tokens`` tokens."""
    return {
        "text": text,
        "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens, "sampling_seed": seed},
    }


@dataclass(frozen=True)
class Variant:
    """One distinct output of a prompt.

    Attributes:
        text: the generated text (first 200 characters).
        output_ids: the first 32 output token ids, or ``None`` when the server did not return them.
        count: how many samples gave it.
        batch_sizes: the batch sizes (sorted, unique) of the rounds that gave it.
        at_divergence: 60 characters around where this text first differs from the most frequent one (for
            the most frequent, where the first other one differs); ``""`` when the texts are equal.
    """

    text: str
    output_ids: tuple[int, ...] | None
    count: int
    batch_sizes: tuple[int, ...]
    at_divergence: str = ""


@dataclass(frozen=True)
class PromptOutcome:
    """What one prompt gave across all rounds.

    Attributes:
        label: ``single``, ``single-mix`` or ``prefix-<chars>``.
        prompt_chars: prompt length, characters.
        samples: outputs received.
        variants: the distinct outputs, most frequent first.
        diverges_at: the first character index where the outputs' texts differ, or ``None``.
    """

    label: str
    prompt_chars: int
    samples: int
    variants: tuple[Variant, ...]
    diverges_at: int | None = None

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
        passed: every prompt gave exactly one distinct output, every request succeeded, and there was output.
        outcomes: one per prompt.
        errors: failed requests (and failed cache flushes), one line each.
        reason: one sentence saying why it passed or failed.
        requests: generate requests sent.
        compared_output_ids: the server returned output token ids, and they were compared too.
        batch_sizes: the batch sizes used.
        prefix_lengths: the prefix lengths used, characters.
        seed: the ``sampling_seed`` sent.
        max_new_tokens: tokens generated per request.
        wall_s: wall time of the check, seconds.
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

    @property
    def status(self) -> str:
        """``"pass"``; ``"fail"`` when a prompt gave more than one output (quality); ``"error"`` when the
        check could not finish (failed requests, no output, the server gone: infrastructure)."""
        if self.passed:
            return "pass"
        return "fail" if any(not o.passed for o in self.outcomes) else "error"


def _output_ids(body: dict[str, Any]) -> tuple[int, ...] | None:
    ids = body.get("output_ids")
    if ids is None and isinstance(body.get("meta_info"), dict):
        ids = body["meta_info"].get("output_ids")
    if isinstance(ids, list) and all(isinstance(i, int) for i in ids):
        return tuple(ids)
    return None


class _Collector:
    def __init__(self) -> None:
        self.samples: dict[str, list[tuple[str, tuple[int, ...] | None, int]]] = {}
        self.prompt_chars: dict[str, int] = {}
        self.errors: list[str] = []
        self.requests = 0
        self.saw_ids = False

    def outcomes(self) -> tuple[PromptOutcome, ...]:
        out = []
        for label, samples in self.samples.items():
            groups: dict[tuple[str, tuple[int, ...] | None], list[int]] = {}
            for text, ids, bs in samples:
                groups.setdefault((text, ids), []).append(bs)
            ranked = sorted(groups.items(), key=lambda kv: -len(kv[1]))
            ref = ranked[0][0][0]
            firsts = [_first_difference(ref, text) for (text, _), _ in ranked[1:]]
            at = min((d for d in firsts if d is not None), default=None)
            variants = []
            for rank, ((text, ids), sizes) in enumerate(ranked):
                d = at if rank == 0 else firsts[rank - 1]
                start = max(0, d - 20) if d is not None else 0
                variants.append(
                    Variant(
                        text=text[:200],
                        output_ids=None if ids is None else ids[:32],
                        count=len(sizes),
                        batch_sizes=tuple(sorted(set(sizes))),
                        at_divergence=text[start : start + 60] if d is not None else "",
                    )
                )
            out.append(PromptOutcome(label, self.prompt_chars[label], len(samples), tuple(variants), at))
        return tuple(out)


def _first_difference(a: str, b: str) -> int | None:
    """The first index where ``a`` and ``b`` differ, or ``None`` when equal."""
    if a == b:
        return None
    for i, (x, y) in enumerate(zip(a, b)):  # noqa: B905 - the shorter one ends the comparison
        if x != y:
            return i
    return min(len(a), len(b))


def _round(
    client: HttpClient,
    pool: cf.ThreadPoolExecutor,
    batch: Sequence[tuple[str, str]],
    max_new_tokens: int,
    seed: int,
    sink: _Collector,
) -> None:
    """Send ``batch`` ((label, prompt) pairs) concurrently, released together by a barrier."""
    barrier = threading.Barrier(len(batch))

    def one(prompt: str) -> dict[str, Any]:
        with contextlib.suppress(threading.BrokenBarrierError):  # a slow thread start: send anyway
            barrier.wait(timeout=10.0)
        body = client.post_json("/generate", generate_request(prompt, max_new_tokens, seed)).body
        if isinstance(body, list):  # a batched answer: SGLang returns a list for a list of texts
            body = body[0] if body else {}
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            raise RequestFailed(f"/generate answered without a text field: {str(body)[:200]!r}", 200, 1)
        return body

    futures = [(label, prompt, pool.submit(one, prompt)) for label, prompt in batch]
    for label, prompt, fut in futures:
        sink.requests += 1
        sink.prompt_chars[label] = len(prompt)
        try:
            body = fut.result()
        except RequestFailed as exc:
            sink.errors.append(f"{label} (batch of {len(batch)}): {exc.reason}")
            continue
        ids = _output_ids(body)
        sink.saw_ids = sink.saw_ids or ids is not None
        sink.samples.setdefault(label, []).append((body["text"], ids, len(batch)))


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
) -> DeterminismResult:
    """Check that outputs do not depend on batch composition.

    ``single``: ``prompt`` alone (batch size 1), then in each round of ``batch_sizes``: ``prompt`` in the
    even slots and :data:`PROMPT_2` in the odd ones, sent concurrently. ``prefix``: for each batch size, the
    cache is flushed, then prompts ``LONG_PROMPT[:n]`` for ``n`` in ``prefix_lengths`` are sent together,
    cycling to fill the batch (at least one of each). An empty ``prefix_lengths`` skips that probe.
    Requests use ``config``'s timeouts and retries (default: 3 retries, 600 s). Stops between rounds when
    ``is_alive()`` turns false.

    Raises:
        ValueError: no batch size, a batch size < 1, a prefix length < 1 or longer than :data:`LONG_PROMPT`,
            or ``max_new_tokens`` < 1.
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
    started = time.monotonic()
    base = config or ClientConfig()
    widest = max(max(sizes), len(prefixes))
    cfg = replace(base, concurrency=widest)  # one connection per request of the widest round
    sink = _Collector()
    stopped = ""
    with HttpClient(base_url, cfg) as client, cf.ThreadPoolExecutor(widest, "mlaprop-det") as pool:
        rounds: list[tuple[bool, list[tuple[str, str]]]] = [(False, [("single", prompt)])]
        for b in sizes:
            rounds.append(
                (False, [("single", prompt) if i % 2 == 0 else ("single-mix", PROMPT_2) for i in range(b)])
            )
        prefix_prompts = [(f"prefix-{n}", LONG_PROMPT[:n]) for n in prefixes]
        if prefix_prompts:
            for r, b in enumerate(sizes):
                width = max(b, len(prefix_prompts))
                rounds.append((True, [prefix_prompts[(r + i) % len(prefix_prompts)] for i in range(width)]))
        for flush, batch in rounds:
            if is_alive is not None and not is_alive():
                stopped = "the server process exited during the check"
                sink.errors.append(stopped)
                break
            if flush:
                try:
                    client.request("POST", "/flush_cache", parse_json=False)
                except RequestFailed as exc:
                    sink.errors.append(f"POST /flush_cache: {exc.reason}")
            _round(client, pool, batch, max_new_tokens, seed, sink)
    outcomes = sink.outcomes()
    reason = _reason(outcomes, sink.errors, stopped)
    return DeterminismResult(
        passed=reason.startswith("pass"),
        outcomes=outcomes,
        errors=tuple(sink.errors),
        reason=reason,
        requests=sink.requests,
        compared_output_ids=sink.saw_ids,
        batch_sizes=sizes,
        prefix_lengths=prefixes,
        seed=seed,
        max_new_tokens=max_new_tokens,
        wall_s=time.monotonic() - started,
    )


def _reason(outcomes: tuple[PromptOutcome, ...], errors: list[str], stopped: str) -> str:
    if stopped:
        return f"error: {stopped}"
    if not outcomes:
        return "error: no output at all (every request failed)" + (
            f"; first error: {errors[0]}" if errors else ""
        )
    varied = [o for o in outcomes if not o.passed]
    if varied:
        worst = max(varied, key=lambda o: o.distinct)
        where = (
            f"texts differ from character {worst.diverges_at}"
            if worst.diverges_at is not None
            else "texts equal, token ids differ"
        )
        shown = "; ".join(
            f"batch sizes {list(v.batch_sizes)}: {v.count}x"
            + (f" ...{v.at_divergence!r}" if v.at_divergence else "")
            for v in worst.variants[:3]
        )
        return (
            f"fail: {len(varied)} of {len(outcomes)} prompts gave more than one output; "
            f"{worst.label} gave {worst.distinct} distinct outputs in {worst.samples} samples, {where} ({shown})"
        )
    if errors:
        return f"error: {len(errors)} requests failed, so batch independence is unproven; first: {errors[0]}"
    total = sum(o.samples for o in outcomes)
    return f"pass: {len(outcomes)} prompts, {total} samples, one distinct output each"
