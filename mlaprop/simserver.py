"""A simulated SGLang server: a real HTTP process that speaks SGLang's launch flags and HTTP API, for tests.

Run it as ``python -m mlaprop.simserver --model-path M --host H --port P [SGLang flags] [--sim-* flags]``;
in :func:`mlaprop.server.launch` pass ``command_prefix=(sys.executable, "-m", "mlaprop.simserver")``. It
starts in well under a second, needs no GPU and only the standard library plus :mod:`mlaprop.capabilities`.

SGLang flags
    Flags it validates as SGLang's parser does: ``--kv-cache-dtype`` (invalid -> argparse usage error,
    exit 2), ``--attention-backend`` / ``--prefill-attention-backend`` / ``--decode-attention-backend``,
    ``--tp-size`` (``--tp``), ``--port``. Flags it uses: ``--enable-deterministic-inference``, ``--api-key``
    (requests other than ``/health*`` need ``Authorization: Bearer KEY``, else 401), ``--served-model-name``.
    Any other ``--flag [value]`` is accepted and logged (SGLang itself would reject an unknown flag).

SGLang's argument rules, for a simulated platform (``capabilities_for(version)``, ``backend_runs_on``)
    - ``--enable-deterministic-inference`` with an explicit backend outside the version's allow-list, or on
      versions before 0.5.12 (no ``deterministic_resolves_first``) with no backend on ROCm where the default
      is ``aiter`` (16 or 128 KV heads per rank), prints SGLang's traceback ending
      ``ValueError: Currently only [...] attention backends are supported for deterministic inference, but you
      explicitly specified 'aiter'.`` to stderr after the import delay and exits 1 (source: ``sglang/srt/
      server_args.py`` ``_handle_deterministic_inference``; ``srt/arg_groups/pipeline.py`` from 0.5.20).
    - from 0.5.12 deterministic inference with no backend falls back to ``triton`` (Blackwell, DeepSeek model)
      or ``fa3``; deterministic + a backend outside the radix list raises SGLang's DeepSeek ``ValueError``.
    - ``fa3`` with ``--kv-cache-dtype fp8_e5m2`` switches to ``triton``.
    - a resolved backend with no kernels on the simulated GPU (``fa3`` on ROCm) fails at "model load" with a
      ``RuntimeError`` traceback, exit 1; so does ``triton`` on ROCm with ``SGLANG_ROCM_FUSED_DECODE_MLA=1``
      on versions where that path applies to every backend (sglang issue 23536).
    The model is treated as DeepSeek-family MLA (the test model). Log lines follow SGLang's
    (``Attention backend: triton``, ``The server is fired up and ready to roll!``).

Platform flags
    ``--sim-platform {cuda,rocm}`` (default cuda), ``--sim-arch`` (default sm90 / gfx942),
    ``--sim-sglang-version`` (default the newest known), ``--sim-kv-heads N`` (default 16; per rank N // tp),
    ``--sim-import-delay S`` (default 0.05: time before arguments are checked, like importing torch).

Scripted faults (each one flag)
    ``--sim-crash-at-start RC``    exit with RC (0 included) after the import delay, logging why and when.
    ``--sim-never-healthy``        serve HTTP, but ``/health`` and ``/health_generate`` answer 503 forever.
    ``--sim-healthy-after S``      ``/health_generate`` answers 503 until S seconds after start (default 0).
    ``--sim-models-early``         ``/v1/models`` answers 200 before the server is ready (others 503).
    ``--sim-grandchild``           double-fork a grandchild into a new session (re-parented to PID 1 or the
                                   nearest subreaper) that keeps the server's listening socket open and
                                   outlives the server; ``--sim-grandchild-ignore-sigterm`` makes it ignore
                                   SIGTERM too. Its pid is logged (``grandchild pid N``).
    ``--sim-children N``           fork N children in the server's process group (like SGLang's scheduler
                                   and detokenizer) that sleep until killed.
    ``--sim-ignore-sigterm``       the server ignores SIGTERM (only SIGKILL stops it).
    ``--sim-die-after-requests K`` exit 1 right after answering the K-th generation request.
    ``--sim-error-every N``        answer every N-th generation request with HTTP ``--sim-error-status``
                                   (default 500); ``--sim-error-rate P`` instead a seeded fraction P.
    ``--sim-malformed-every N``    answer every N-th generation request with 200 and a truncated JSON body;
                                   ``--sim-malformed-rate P`` a seeded fraction P.
    ``--sim-max-lifetime S``       exit after S seconds whatever happens (default 600; children and the
                                   grandchild too), so a leaked simulator cannot live for ever.
    ``--sim-hang-from K``          the K-th generation request and every later one never answer (a hang).
    Batch-dependence faults (they apply even with ``--enable-deterministic-inference``; "in flight" counts
    sequences, a ``/generate`` list of N texts counting N):
    ``--sim-vary-from N``          an answer changes with its batch once N or more sequences were in flight.
    ``--sim-vary-lists``           answers inside a list request change with the list's length.
    ``--sim-flip-rate P``          each sequence generated with others in flight changes one token with
                                   probability P (seeded by ``--sim-seed`` and the sequence number).
    ``--sim-flush-busy-rate P``    ``/flush_cache`` answers 400 "Flush cache failed." with probability P
                                   (seeded); it always does while generation requests are in flight, as
                                   SGLang does (``scheduler.py`` ``flush_cache``: not idle -> no flush).
    Generation requests are ``POST /v1/chat/completions`` and ``POST /generate``, numbered from 1 in arrival
    order; the seeded choice for request n depends only on ``--sim-seed`` and n.

Simulated model
    ``--sim-dataset PATH`` (an MGSM TSV: ``question<TAB>integer``, commas allowed in the integer) and
    ``--sim-accuracy P`` (default 1.0): a request whose prompt contains a dataset question gets step-by-step
    text whose last line is ``Answer: <n>``, correct for exactly ``round(P * rows)`` rows (a fixed choice
    seeded by ``--sim-seed``) and ``target + 1`` otherwise. Other prompts get deterministic filler text of
    256 words, cut at the request's max tokens. ``--sim-latency S`` delays every generation request. Unless
    ``--enable-deterministic-inference`` is given, a request that overlapped with others (more than one
    generation request in flight at once) gets slightly different text and ``output_ids`` (one word changed,
    never the ``Answer:`` line), the way batch size changes outputs in real non-deterministic serving.
    Tokens are whitespace-separated pieces; ``output_ids`` are their CRC32 modulo 102400.

Endpoints
    ``GET /health``, ``GET /health_generate``, ``GET /v1/models``, ``POST /v1/chat/completions`` (OpenAI shape
    with ``usage.completion_tokens``), ``POST /generate`` (``{"text", "sampling_params"}`` -> ``{"text",
    "output_ids", "meta_info": {"output_ids", "completion_tokens", "prompt_tokens", "finish_reason", ...}}``;
    a list of texts gives a list in the same order; ``"return_logprob": true`` adds
    ``meta_info.output_token_logprobs``, SGLang's ``[logprob, token_id, null]`` per output token),
    ``POST``/``GET /flush_cache`` (200 ``Cache flushed...``, 400 ``Flush cache failed.`` while busy),
    ``GET /get_server_info`` (server arguments, ``max_running_requests`` (``--max-running-requests``, default
    none) and ``internal_states[0].effective_max_running_requests_per_dp`` (that, or 2048), as SGLang 0.5.11).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import select
import signal
import socket
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TextIO, cast

from mlaprop.capabilities import NEWEST, backend_runs_on, capabilities_for
from mlaprop.environment import AttentionBackend, KVCacheDtype, Vendor

__all__ = ["DatasetRow", "SimModel", "load_dataset", "main", "resolve_attention_backend"]

_B = AttentionBackend
_VOCAB = 102400
# SGLang backend names beyond mlaprop's enum that its parser also accepts.
_OTHER_BACKENDS = ("cutedsl_mla", "dual_chunk_flash_attn", "flex_attention", "intel_amx", "nsa", "trtllm_mha")
_FILLER_TEXT = (
    "the model considers each part of the request and writes a short plain answer about it while keeping "
    "every step simple clear and easy to check for a reader who wants to follow along"
)
_FILLER = tuple(_FILLER_TEXT.split())
_FILLER_WORDS = 256  # a filler answer "wants" this many tokens; shorter max tokens cut it (reason "length")
_REASONING_TEXT = (
    "Let's solve this step by step. First we read the problem and note every quantity it gives. "
    "Then we combine the quantities in the order the question asks and check the arithmetic."
)
_REASONING = tuple(_REASONING_TEXT.split())


# --------------------------------------------------------------------------------------------------- rules


def _handle_deterministic_inference(message: str) -> NoReturn:
    """Raise SGLang's ``ValueError`` from a frame named as SGLang's (``ServerArgs._handle_deterministic_inference``),
    so the simulated traceback reads like the real one."""
    raise ValueError(message) from None


def resolve_attention_backend(
    *,
    version: str,
    vendor: Vendor,
    arch: str,
    attention_backend: str | None,
    deterministic: bool,
    kv_cache_dtype: str,
    tp_size: int = 1,
    kv_heads: int = 16,
) -> tuple[str, list[str]]:
    """The attention backend SGLang ``version`` resolves to for the test model, and the lines it logs.

    The resolution is :func:`mlaprop.compose.resolve_backend` (one rule source: the simulator and ``compose``
    cannot disagree), with the radix-list check on; a CUDA version is taken as new enough.

    Raises:
        ValueError: SGLang's deterministic-inference message (allow-list or DeepSeek radix list), exactly.
        mlaprop.environment.InvalidEnvironment: unknown version or architecture.
    """
    from mlaprop.compose import SGLangRefusal, deterministic_error_printed, resolve_backend

    caps = capabilities_for(version)
    log: list[str] = []
    known = {b.value for b in AttentionBackend}
    if attention_backend is not None and attention_backend not in known:
        # a backend mlaprop does not model: outside every deterministic allow-list
        if deterministic:
            raise ValueError(deterministic_error_printed(caps, attention_backend))
        return attention_backend, log
    try:
        kv = KVCacheDtype(kv_cache_dtype)
    except ValueError:
        kv = KVCacheDtype.AUTO
    try:
        backend, steps = resolve_backend(
            rocm=vendor is Vendor.AMD,
            arch=arch,
            cuda_version=None,
            capabilities=caps,
            deterministic=deterministic,
            explicit=AttentionBackend(attention_backend) if attention_backend is not None else None,
            kv_cache_dtype=kv,
            tp_size=max(tp_size, 1),
            kv_heads=kv_heads,
            deepseek_family=True,
            check_radix=True,
        )
    except SGLangRefusal as exc:
        _handle_deterministic_inference(exc.sglang_message)
    for step in steps:
        if "deterministic pass" in step.reason:
            log.append(
                f"Attention backend not specified. Falling back to '{step.reason.split(' picks ')[1].split()[0]}' "
                "for deterministic inference. You can explicitly set --attention-backend to one of "
                f"{caps.printed(caps.deterministic_backends)}."
            )
        elif "fp8_e5m2" in step.reason:
            log.append(
                "FlashAttention3 only supports fp8_e4m3 if using FP8; Setting attention backend to triton."
            )
        elif not step.reason.startswith("explicit"):
            switched = any("fp8_e5m2" in later.reason for later in steps)
            log.append(
                f"Attention backend not specified. Use {'fa3' if switched else backend} backend by default."
            )
    return backend.value, log


# --------------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class DatasetRow:
    """One MGSM row: the question and its integer answer."""

    question: str
    answer: int


def load_dataset(path: str | os.PathLike[str]) -> tuple[DatasetRow, ...]:
    """Read an MGSM TSV (``question<TAB>integer``; ``2,125`` reads as 2125; blank lines skipped; a UTF-8
    byte-order mark and CRLF line ends are accepted).

    Raises:
        ValueError: a line without a tab or whose answer is not an integer (the message names the line).
        OSError: the file cannot be read.
    """
    rows = []
    # utf-8-sig drops a byte-order mark (else the first question never matches a prompt); lines are split on
    # LF only and a CR before it dropped, as mlaprop.mgsm reads the file
    text = Path(path).read_text(encoding="utf-8-sig")
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        question, tab, answer = line.rpartition("\t")
        try:
            if not tab:
                raise ValueError
            rows.append(DatasetRow(question.strip(), int(answer.strip().replace(",", ""))))
        except ValueError:
            raise ValueError(f"{path}:{number}: expected 'question<TAB>integer', got {line[:80]!r}") from None
    return tuple(rows)


def _pieces(text: str) -> list[str]:
    """Split into tokens that join back to ``text``: words with their leading space, and newlines."""
    out: list[str] = []
    for i, line in enumerate(text.split("\n")):
        if i:
            out.append("\n")
        out.extend(w if j == 0 else " " + w for j, w in enumerate(line.split(" ")))
    return out


def _seed(*parts: object) -> int:
    return zlib.crc32("\x1f".join(map(str, parts)).encode())


@dataclass(frozen=True)
class SimModel:
    """The simulated model: answers MGSM questions with a fixed accuracy, filler text otherwise.

    Attributes:
        rows: dataset rows (may be empty).
        correct: indices of rows answered correctly.
        deterministic: outputs do not depend on how many requests were in flight.
        seed: seed of every choice.
        vary_from: with N > 0, answers change with their batch once N or more sequences were in flight,
            deterministic or not (a fault).
        vary_lists: answers inside a list request change with its length (a fault).
        flip_rate: chance that a sequence generated with others in flight changes one token (a fault).
    """

    rows: tuple[DatasetRow, ...] = ()
    correct: frozenset[int] = frozenset()
    deterministic: bool = False
    seed: int = 0
    vary_from: int = 0
    vary_lists: bool = False
    flip_rate: float = 0.0

    @classmethod
    def build(cls, rows: Sequence[DatasetRow], accuracy: float, deterministic: bool, seed: int) -> SimModel:
        """A model correct on exactly ``round(accuracy * len(rows))`` rows chosen with ``seed``.

        Raises:
            ValueError: ``accuracy`` outside [0, 1].
        """
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"--sim-accuracy must be within [0, 1], got {accuracy}")
        k = round(accuracy * len(rows))
        chosen = frozenset(random.Random(seed).sample(range(len(rows)), k))
        return cls(tuple(rows), chosen, deterministic, seed)

    def find(self, prompt: str) -> int | None:
        """Index of the dataset row whose question appears in ``prompt`` (the longest match), or ``None``."""
        best: int | None = None
        for i, row in enumerate(self.rows):
            longer = best is None or len(row.question) > len(self.rows[best].question)
            if row.question and longer and row.question in prompt:
                best = i
        return best

    def variation(self, batch: int, listed: int = 0, draw: float = 1.0) -> object:
        """What makes an answer differ from the batch-invariant one (``None``: nothing). ``batch``: most
        sequences in flight during it; ``listed``: its list request's length (0: a single text); ``draw``: a
        uniform [0, 1) number for the flip fault."""
        if batch > 1 and (not self.deterministic or (self.vary_from and batch >= self.vary_from)):
            return batch
        if self.vary_lists and listed:
            return ("list", listed)
        if self.flip_rate and batch > 1 and draw < self.flip_rate:
            return ("flip", draw)
        return None

    def generate(
        self, prompt: str, max_tokens: int, batch: int, *, variation: object = "batch"
    ) -> tuple[str, list[int], str]:
        """Text, output ids and finish reason (``stop`` or ``length``) for ``prompt``.

        ``batch`` is the largest number of generation requests in flight during this one. By default, when it
        is above 1 and the model is not deterministic, one word of the body changes (seeded by prompt and
        batch); an explicit ``variation`` (from :meth:`variation`; ``None`` for none) decides instead.
        """
        if variation == "batch":
            variation = batch if batch > 1 and not self.deterministic else None
        index = self.find(prompt)
        if index is not None:
            row = self.rows[index]
            value = row.answer if index in self.correct else row.answer + 1
            body = list(_REASONING)
            tail = f"\nAnswer: {value}"
        else:
            rng = random.Random(_seed(self.seed, "filler", prompt))
            body = [rng.choice(_FILLER) for _ in range(_FILLER_WORDS)]
            tail = ""
        if variation is not None:
            key = batch if isinstance(variation, int) else variation  # an int keeps the old seeding
            rng = random.Random(_seed(self.seed, "batch", prompt, key))
            pos = rng.randrange(min(len(body), max(max_tokens, 1)))  # a word that is emitted
            body[pos] = rng.choice([w for w in _FILLER if w != body[pos]])
        pieces = _pieces(" ".join(body) + tail)
        finish = "stop"
        if len(pieces) > max_tokens:
            pieces, finish = pieces[: max(max_tokens, 0)], "length"
        ids = [zlib.crc32(p.strip().encode() or b"\n") % _VOCAB for p in pieces]
        return "".join(pieces), ids, finish


# --------------------------------------------------------------------------------------------------- server


@dataclass(frozen=True)
class _Config:
    args: argparse.Namespace
    unknown: tuple[str, ...]
    backend: str
    model: SimModel
    started: float  # monotonic


class _InFlight:
    """Generation requests in flight; each remembers the most it saw at once (its "batch")."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[int, int] = {}
        self._weight: dict[int, int] = {}
        self._next = 0

    def enter(self, weight: int = 1) -> int:
        """Register a request carrying ``weight`` sequences; returns its key."""
        with self._lock:
            self._next += 1
            key = self._next
            self._seen[key] = 0
            self._weight[key] = weight
            n = sum(self._weight.values())
            for k in self._seen:
                self._seen[k] = max(self._seen[k], n)
            return key

    def leave(self, key: int) -> int:
        with self._lock:
            self._weight.pop(key, None)
            return self._seen.pop(key)

    @property
    def busy(self) -> bool:
        """Some generation request is in flight."""
        with self._lock:
            return bool(self._seen)


class _State:
    def __init__(self, config: _Config, out: TextIO) -> None:
        self.config = config
        self.out = out
        self.ready = threading.Event()
        self.inflight = _InFlight()
        self._lock = threading.Lock()
        self._count = 0
        self._counters: dict[str, int] = {}

    def log(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with self._lock:
            self.out.write(f"[{stamp}] {message}\n")
            self.out.flush()

    def number(self) -> int:
        with self._lock:
            self._count += 1
            return self._count

    def numbers(self, kind: str, n: int) -> range:
        """``n`` consecutive numbers of the ``kind`` counter (sequences, flushes), from 1."""
        with self._lock:
            first = self._counters.get(kind, 0) + 1
            self._counters[kind] = first + n - 1
            return range(first, first + n)


def _chance(seed: int, kind: str, n: int) -> float:
    return random.Random(_seed(seed, kind, n)).random()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # TCP_NODELAY: small answers go out at once (see _send)
    server_version = "mlaprop-simserver"

    @property
    def state(self) -> _State:
        return cast(_State, getattr(self.server, "state"))  # noqa: B009 (set by _serve)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # access lines are written by _access, health polls left out (they would bury the cause)

    def _access(self, code: int) -> None:
        if not self.path.startswith("/health"):
            host, port = self.client_address[:2]
            reason = self.responses.get(code, ("",))[0]
            self.state.log(f'INFO:     {host}:{port} - "{self.command} {self.path} HTTP/1.1" {code} {reason}')

    def _send(self, code: int, body: bytes, content_type: str = "application/json") -> None:
        # Status line, headers and body in one write: written apart (send_response/end_headers, then the
        # body), the body waited on Nagle's algorithm for the client's delayed ACK, ~40 ms per request on
        # a reused connection.
        reason = self.responses.get(code, ("",))[0]
        head = (
            f"{self.protocol_version} {code} {reason}\r\n"
            f"Server: {self.version_string()}\r\n"
            f"Date: {self.date_time_string()}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.wfile.write(head.encode("latin-1") + body)
        self.wfile.flush()
        self._access(code)

    def _json(self, code: int, payload: object) -> None:
        self._send(code, json.dumps(payload).encode())

    def _error(self, code: int, message: str) -> None:
        self._json(code, {"object": "error", "message": message, "type": "BadRequestError", "code": code})

    def _authorized(self) -> bool:
        key = self.state.config.args.api_key
        if key is None or self.path.startswith("/health"):
            return True
        if self.headers.get("Authorization", "") == f"Bearer {key}":
            return True
        self._error(401, "Unauthorized")
        return False

    def do_GET(self) -> None:
        st = self.state
        args = st.config.args
        path = self.path.split("?", 1)[0]
        if not self._authorized():
            return
        if path in ("/health", "/health_generate"):
            if st.ready.is_set():
                self._send(200, b"")
            else:
                self._send(503, b"")
        elif path in ("/v1/models", "/get_model_info"):
            if not st.ready.is_set() and not args.sim_models_early:
                self._error(503, "server is starting")
                return
            name = args.served_model_name or args.model_path
            self._json(
                200,
                {
                    "object": "list",
                    "data": [{"id": name, "object": "model", "owned_by": "sglang", "root": args.model_path}],
                },
            )
        elif path == "/flush_cache":
            self._flush_cache()
        elif path == "/get_server_info":
            self._json(200, self._server_info())
        else:
            self._error(404, f"Not Found: {path}")

    def do_POST(self) -> None:
        st = self.state
        path = self.path.split("?", 1)[0]
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not self._authorized():
            return
        if path == "/flush_cache":
            self._flush_cache()
            return
        if path not in ("/v1/chat/completions", "/generate"):
            self._error(404, f"Not Found: {path}")
            return
        if not st.ready.is_set():
            self._error(503, "server is starting")
            return
        try:
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError as exc:
            self._error(400, f"invalid JSON body: {exc}")
            return
        self._generation(path, body)

    def _flush_cache(self) -> None:
        """SGLang 0.5.11 ``/flush_cache``: 400 while requests are pending (or by ``--sim-flush-busy-rate``)."""
        st = self.state
        args = st.config.args
        (n,) = st.numbers("flush", 1)
        if st.inflight.busy or (
            args.sim_flush_busy_rate and _chance(args.sim_seed, "flush", n) < args.sim_flush_busy_rate
        ):
            self._send(400, b"Flush cache failed.\n", "text/plain")
            return
        self._send(
            200,
            b"Cache flushed.\nPlease check backend logs for more details. (When there are running or waiting "
            b"requests, the operation will not be performed.)\n",
            "text/plain",
        )

    def _server_info(self) -> dict[str, Any]:
        """SGLang's ``/get_server_info`` shape: server arguments, scheduler info, ``internal_states``."""
        args = self.state.config.args
        info = {k: v for k, v in sorted(vars(args).items()) if not k.startswith("sim_") and k != "api_key"}
        limit = args.max_running_requests or 2048
        info["internal_states"] = [
            {"effective_max_running_requests_per_dp": limit, "last_gen_throughput": 0.0}
        ]
        info["version"] = args.sim_sglang_version
        return info

    def _generation(self, path: str, body: dict[str, Any]) -> None:
        st = self.state
        args = st.config.args
        n = st.number()
        texts = body.get("text") if path == "/generate" else None
        key = st.inflight.enter(max(1, len(texts)) if isinstance(texts, list) else 1)
        try:
            if args.sim_hang_from and n >= args.sim_hang_from:
                st.log(f"simulated hang of generation request {n} (--sim-hang-from)")
                _sleep_until_killed(args.sim_max_lifetime)
            if args.sim_latency > 0:
                time.sleep(args.sim_latency)
        finally:
            batch = st.inflight.leave(key)
        if (args.sim_error_every and n % args.sim_error_every == 0) or (
            args.sim_error_rate and _chance(args.sim_seed, "error", n) < args.sim_error_rate
        ):
            message = f"simulated internal server error for request {n} (--sim-error-*)"
            self._json(
                args.sim_error_status, {"object": "error", "message": message, "code": args.sim_error_status}
            )
        elif (args.sim_malformed_every and n % args.sim_malformed_every == 0) or (
            args.sim_malformed_rate and _chance(args.sim_seed, "malformed", n) < args.sim_malformed_rate
        ):
            self._send(200, b'{"id": "simulated-malformed", "choices": [{"message": {"content": "Answer')
        else:
            try:
                payload = (
                    self._chat(body, batch) if path == "/v1/chat/completions" else self._generate(body, batch)
                )
            except (TypeError, ValueError, KeyError) as exc:
                self._error(400, f"bad request: {exc}")
            else:
                self._json(200, payload)
        if args.sim_die_after_requests and n >= args.sim_die_after_requests:
            st.log(
                f"RuntimeError: simulated crash after {n} generation requests (--sim-die-after-requests); "
                "exiting with code 1"
            )
            os._exit(1)

    def _chat(self, body: dict[str, Any], batch: int) -> dict[str, Any]:
        st = self.state
        messages = body["messages"]
        if not isinstance(messages, list):
            raise TypeError("messages must be a list")
        if body.get("stream"):
            raise ValueError("streaming is not supported by the simulated server")
        texts = []
        for m in messages:
            content = m.get("content", "")
            if isinstance(content, list):
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            texts.append(str(content))
        prompt = "\n".join(texts)
        max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 2048)
        text, ids, finish = st.config.model.generate(prompt, max_tokens, batch)
        prompt_tokens = len(prompt.split())
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or st.config.args.served_model_name or st.config.args.model_path,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(ids),
                "total_tokens": prompt_tokens + len(ids),
            },
        }

    def _generate(self, body: dict[str, Any], batch: int) -> dict[str, Any] | list[dict[str, Any]]:
        st = self.state
        params = body.get("sampling_params") or {}
        max_tokens = int(params.get("max_new_tokens", 128))
        texts = body["text"]
        listed = len(texts) if isinstance(texts, list) else 0
        model = st.config.model
        args = st.config.args

        def one(prompt: str, seq: int) -> dict[str, Any]:
            draw = _chance(args.sim_seed, "flip", seq)
            variation = model.variation(batch, listed, draw)
            text, ids, finish = model.generate(str(prompt), max_tokens, batch, variation=variation)
            reason: dict[str, Any] = {"type": finish}
            if finish == "length":
                reason["length"] = max_tokens
            meta: dict[str, Any] = {
                "id": uuid.uuid4().hex,
                "finish_reason": reason,
                "prompt_tokens": len(str(prompt).split()),
                "completion_tokens": len(ids),
                "cached_tokens": 0,
                "output_ids": ids,
            }
            if body.get("return_logprob"):
                meta["output_token_logprobs"] = [
                    [-(_seed(prompt, i, t) % 5000) / 1000.0 - 0.001, t, None] for i, t in enumerate(ids)
                ]
            return {"text": text, "output_ids": ids, "meta_info": meta}

        seqs = st.numbers("sequence", max(1, listed))
        if isinstance(texts, list):
            return [one(t, seq) for t, seq in zip(texts, seqs)]  # noqa: B905 - one number per text
        return one(texts, seqs[0])


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the MGSM client opens up to 1024 connections at once

    def __init__(self, address: tuple[str, int], state: _State) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.state = state
        super().__init__(address, _Handler)


# --------------------------------------------------------------------------------------------------- startup


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch_server.py", allow_abbrev=False)
    p.add_argument("--model-path", "--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    backends = sorted({b.value for b in AttentionBackend} | set(_OTHER_BACKENDS))
    p.add_argument("--kv-cache-dtype", default="auto", choices=[d.value for d in KVCacheDtype])
    p.add_argument("--attention-backend", default=None, choices=backends)
    p.add_argument("--prefill-attention-backend", default=None, choices=backends)
    p.add_argument("--decode-attention-backend", default=None, choices=backends)
    p.add_argument("--tp-size", "--tp", type=int, default=1)
    p.add_argument("--enable-deterministic-inference", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--api-key", default=None)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--sim-platform", choices=("cuda", "rocm"), default="cuda")
    p.add_argument("--sim-arch", default=None)
    p.add_argument("--sim-sglang-version", default=NEWEST)
    p.add_argument("--sim-kv-heads", type=int, default=16)
    p.add_argument("--sim-import-delay", type=float, default=0.05)
    p.add_argument("--sim-crash-at-start", type=int, default=None, metavar="RC")
    p.add_argument("--sim-never-healthy", action="store_true")
    p.add_argument("--sim-healthy-after", type=float, default=0.0, metavar="S")
    p.add_argument("--sim-models-early", action="store_true")
    p.add_argument("--sim-grandchild", action="store_true")
    p.add_argument("--sim-grandchild-ignore-sigterm", action="store_true")
    p.add_argument("--sim-children", type=int, default=0, metavar="N")
    p.add_argument("--sim-ignore-sigterm", action="store_true")
    p.add_argument("--sim-die-after-requests", type=int, default=0, metavar="K")
    p.add_argument("--sim-error-every", type=int, default=0, metavar="N")
    p.add_argument("--sim-error-rate", type=float, default=0.0, metavar="P")
    p.add_argument("--sim-error-status", type=int, default=500)
    p.add_argument("--sim-malformed-every", type=int, default=0, metavar="N")
    p.add_argument("--sim-malformed-rate", type=float, default=0.0, metavar="P")
    p.add_argument("--sim-max-lifetime", type=float, default=600.0, metavar="S")
    p.add_argument("--max-running-requests", type=int, default=None)
    p.add_argument("--sim-hang-from", type=int, default=0, metavar="K")
    p.add_argument("--sim-vary-from", type=int, default=0, metavar="N")
    p.add_argument("--sim-vary-lists", action="store_true")
    p.add_argument("--sim-flip-rate", type=float, default=0.0, metavar="P")
    p.add_argument("--sim-flush-busy-rate", type=float, default=0.0, metavar="P")
    p.add_argument("--sim-dataset", default=None, metavar="PATH")
    p.add_argument("--sim-accuracy", type=float, default=1.0, metavar="P")
    p.add_argument("--sim-latency", type=float, default=0.0, metavar="S")
    p.add_argument("--sim-seed", type=int, default=0)
    return p


def _import_delay(argv: Sequence[str]) -> float:
    """``--sim-import-delay`` read before the real parse (SGLang imports torch before parsing)."""
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--sim-import-delay=") else None
        if arg == "--sim-import-delay" and i + 1 < len(argv):
            value = argv[i + 1]
        if value is not None:
            try:
                return max(0.0, float(value))
            except ValueError:
                return 0.0
    return 0.05


def _sleep_until_killed(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 1.0))


def _fork_children(count: int, lifetime: float) -> list[int]:
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                _sleep_until_killed(lifetime)
            finally:
                os._exit(0)
        pids.append(pid)
    return pids


def _fork_grandchild(ignore_sigterm: bool, lifetime: float) -> int:
    """Double-fork a process into a new session; it inherits every open fd (the listening socket too)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # intermediate: new session, fork again, exit so the grandchild is re-parented
        try:
            os.close(r)
            os.setsid()
            if os.fork() == 0:
                try:
                    signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_sigterm else signal.SIG_DFL)
                    os.write(w, f"{os.getpid()}\n".encode())
                    os.close(w)
                    _sleep_until_killed(lifetime)
                finally:
                    os._exit(0)
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    ready, _, _ = select.select([r], [], [], 5.0)
    data = os.read(r, 64) if ready else b""
    os.close(r)
    return int(data.strip() or 0)


def prepare_server_args(argv: Sequence[str], out: TextIO, started: float) -> _Config:
    """Parse and resolve arguments the way SGLang's ``prepare_server_args`` does.

    Raises:
        SystemExit: argparse usage error (exit 2).
        ValueError: SGLang's deterministic-inference errors.
    """
    parser = _parser()
    args, unknown = parser.parse_known_args(list(argv))
    typos = [u.split("=", 1)[0] for u in unknown if u.startswith("--sim-")]
    if typos:  # permissive for SGLang's flags, never for its own: a fault that is not injected passes the run
        parser.error(f"unknown simulator flags: {' '.join(typos)} (see python -m mlaprop.simserver --help)")
    vendor = Vendor.AMD if args.sim_platform == "rocm" else Vendor.NVIDIA
    if args.sim_arch is None:
        args.sim_arch = "gfx942" if vendor is Vendor.AMD else "sm90"
    fields = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(args).items()) if not k.startswith("sim_"))
    out.write(f"server_args=ServerArgs({fields})\n")
    if unknown:
        out.write(
            f"WARNING: accepting unknown arguments (the simulator is permissive): {' '.join(unknown)}\n"
        )
    out.flush()
    explicit = args.attention_backend
    if explicit is None and args.prefill_attention_backend == args.decode_attention_backend:
        explicit = args.prefill_attention_backend
    backend, lines = resolve_attention_backend(
        version=args.sim_sglang_version,
        vendor=vendor,
        arch=args.sim_arch,
        attention_backend=explicit,
        deterministic=args.enable_deterministic_inference,
        kv_cache_dtype=args.kv_cache_dtype,
        tp_size=args.tp_size,
        kv_heads=args.sim_kv_heads,
    )
    for line in lines:
        out.write(f"WARNING: {line}\n")
    rows = load_dataset(args.sim_dataset) if args.sim_dataset else ()
    model = replace(
        SimModel.build(rows, args.sim_accuracy, args.enable_deterministic_inference, args.sim_seed),
        vary_from=args.sim_vary_from,
        vary_lists=args.sim_vary_lists,
        flip_rate=args.sim_flip_rate,
    )
    return _Config(args, tuple(unknown), backend, model, started)


def _load_model(config: _Config) -> None:
    """Simulated model load: fails like SGLang at run time when the backend cannot run here.

    Raises:
        RuntimeError: no kernels for the backend on this GPU, or the ROCm fused-decode-MLA failure.
    """
    args = config.args
    vendor = Vendor.AMD if args.sim_platform == "rocm" else Vendor.NVIDIA
    known = config.backend in {b.value for b in AttentionBackend}
    if known and not backend_runs_on(
        AttentionBackend(config.backend), vendor, args.sim_arch, args.sim_sglang_version
    ):
        raise RuntimeError(
            f"attention backend '{config.backend}' has no kernels for this GPU "
            f"({args.sim_platform} {args.sim_arch}); it passed argument checking but cannot run"
        )
    fused = os.environ.get("SGLANG_ROCM_FUSED_DECODE_MLA", "").strip().lower() in ("1", "true")
    caps = capabilities_for(args.sim_sglang_version)
    if (
        vendor is Vendor.AMD
        and fused
        and config.backend != "aiter"
        and caps.rocm_fused_decode_mla_any_backend
    ):
        raise RuntimeError(
            "SGLANG_ROCM_FUSED_DECODE_MLA=1 applies the fused decode path to attention backend 'triton', "
            "which reads aiter-specific metadata (simulated sglang issue 23536)"
        )


def _fileno(out: TextIO) -> int | None:
    try:
        return out.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None


def _sigterm_handler(
    fd: int | None, end: Callable[[int], object] = os._exit
) -> Callable[[int, FrameType | None], None]:
    """The server's SIGTERM handler: one log line written straight to ``fd``, then ``end(0)`` (``os._exit``).

    It takes no lock: a second SIGTERM runs the handler again on the main thread, inside the first one, and a
    handler that waited for the (non-reentrant) log lock there would wait for ever. ``os.write`` bypasses
    ``out``'s buffer, so what other threads left unflushed is lost, not interleaved.
    """
    said = False

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        nonlocal said
        if not said and fd is not None:
            line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] Received SIGTERM; shutting down.\n"
            with contextlib.suppress(OSError):
                os.write(fd, line.encode())
            said = True  # after the write: a signal that re-enters before it writes the line again, not never
        end(0)

    return on_sigterm


def _serve(config: _Config, out: TextIO) -> int:
    args = config.args
    state = _State(config, out)
    try:
        httpd = _Server((args.host, args.port), state)
    except OSError as exc:
        state.log(
            f"ERROR:    [Errno {exc.errno}] error while attempting to bind on address "
            f"({args.host!r}, {args.port}): {exc.strerror.lower() if exc.strerror else exc}"
        )
        return 1
    lifetime = args.sim_max_lifetime
    if args.sim_grandchild:
        pid = _fork_grandchild(args.sim_grandchild_ignore_sigterm, lifetime)
        state.log(f"grandchild pid {pid} in a new session, holding port {args.port}; it outlives this server")
    for pid in _fork_children(args.sim_children, lifetime):
        state.log(f"child pid {pid} (simulated scheduler) started")

    if args.sim_ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        state.log("ignoring SIGTERM (--sim-ignore-sigterm)")
    else:
        signal.signal(signal.SIGTERM, _sigterm_handler(_fileno(out)))

    def become_ready() -> None:
        if args.sim_never_healthy:
            state.log("simulated: /health_generate answers 503 for ever (--sim-never-healthy)")
            return
        delay = config.started + args.sim_healthy_after - time.monotonic()
        if delay > 0:
            state.log(f"simulated: healthy after {args.sim_healthy_after:g} s (--sim-healthy-after)")
            time.sleep(delay)
        state.ready.set()
        state.log(f"The server is fired up and ready to roll! (t={time.time():.6f})")

    state.log(f"Attention backend: {config.backend}")
    state.log(f"Uvicorn running on http://{args.host}:{args.port} (Press CTRL+C to quit)")
    threading.Thread(target=become_ready, daemon=True).start()
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    _sleep_until_killed(lifetime)
    state.log(f"simulated server reached --sim-max-lifetime {lifetime:g} s; exiting")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulated server (blocks until killed or ``--sim-max-lifetime``); returns the exit code.

    Raises:
        SystemExit: argparse usage error (exit 2).
        ValueError, RuntimeError: SGLang's argument errors and simulated run-time failures (exit 1 as a
            traceback when run as ``python -m mlaprop.simserver``).
    """
    started = time.monotonic()
    argv = list(sys.argv[1:] if argv is None else argv)
    out = sys.stdout
    time.sleep(_import_delay(argv))
    config = prepare_server_args(argv, out, started)
    rc = config.args.sim_crash_at_start
    if rc is not None:
        out.write(
            f"RuntimeError: simulated crash at start-up (--sim-crash-at-start): exiting with code {rc} "
            f"at t={time.time():.6f}\n"
        )
        return int(rc)
    out.write("Load weight begin. (simulated)\n")
    out.flush()
    _load_model(config)
    return _serve(config, out)


if __name__ == "__main__":
    sys.exit(main())
