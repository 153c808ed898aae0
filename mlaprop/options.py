"""The typed options of the main job (``mlaprop run`` / ``mlaprop eval``), validated once, here.

Every rule is one validator function; the options' ``__post_init__`` calls it on the value a library caller
passes, and the command line (:mod:`mlaprop.cli.run`) uses the same function as its argparse type, so the
rule and its message exist once. A violation raises :class:`InvalidOptions` naming the option (its CLI flag)
and what to pass.
"""

from __future__ import annotations

import enum
import math
import shlex
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from mlaprop.determinism import DEFAULT_BATCH_SIZES, DEFAULT_PREFIX_LENGTHS, LONG_PROMPT
from mlaprop.environment import Environment, LaunchRequest
from mlaprop.evalclient import GATE_CONCURRENCY, ClientConfig
from mlaprop.exitcodes import UsageError
from mlaprop.mgsm import LANGUAGES, Parser
from mlaprop.stats import DEFAULT_GATE

__all__ = [
    "CANARY_GATE",
    "DEFAULT_HEARTBEAT_S",
    "MAX_BATCH_SIZE",
    "SMOKE_MODEL_VARIABLE",
    "SMOKE_QUESTIONS",
    "SMOKE_SERVER_ARGS",
    "EvalOptions",
    "InvalidOptions",
    "RunOptions",
    "SmokeModel",
    "base_url",
    "batch_sizes",
    "fraction",
    "non_negative_seconds",
    "positive_int",
    "positive_seconds",
    "prefix_lengths",
    "report_dir",
    "shell_words",
    "sim_words",
    "smoke_model",
]

#: The largest determinism batch: enough to show batch dependence, small enough to finish in bounded time.
MAX_BATCH_SIZE = 1024
#: Extra server arguments in smoke mode: no weights to read (the dummy loader fills every parameter).
SMOKE_SERVER_ARGS: tuple[str, ...] = ("--load-format", "dummy")
#: Questions scored in smoke mode unless ``--limit`` says otherwise.
SMOKE_QUESTIONS = 16
#: The smoke gate on the canary: measured 250/250 on the H200 (SGLang 0.5.11) with the smallest
#: reference logit margin 8.27, so a correct stack scores 1.0; 0.98 leaves 5 questions for a tie broken the
#: other way by a legitimate kernel difference, and a broken kernel scores far below it.
CANARY_GATE = 0.98
#: Environment variable choosing the smoke model (``canary``, ``random``, ``dummy``).
SMOKE_MODEL_VARIABLE = "MLAPROP_SMOKE_MODEL"
#: Seconds between heartbeat lines outside a terminal (readiness, eval, determinism).
DEFAULT_HEARTBEAT_S = 30.0

_T = TypeVar("_T")


class SmokeModel(str, enum.Enum):
    """What smoke mode serves.

    - ``canary``: the trained canary (:mod:`mlaprop.canary`), real weight loading, gated at
      :data:`CANARY_GATE` over all questions, answers compared with its reference forward.
    - ``random``: real-scale random block-FP8 weights (:func:`mlaprop.tinymodel.write_tiny_mla`), real weight
      loading, not gated (it shows batch dependence to the determinism check).
    - ``dummy``: no weights, ``--load-format dummy``, not gated (the server starts and answers).
    """

    CANARY = "canary"
    RANDOM = "random"
    DUMMY = "dummy"

    def __str__(self) -> str:
        return str(self.value)

    @property
    def gated(self) -> bool:
        """The score decides the verdict (only the canary knows the answers)."""
        return self is SmokeModel.CANARY


class InvalidOptions(UsageError):
    """An option of ``run`` / ``eval`` holds a value the job cannot use; the message starts with the
    option's flag and says what to pass."""


# ------------------------------------------------------------------------------------------- validators
# Each takes the command-line text or a library caller's value and returns the typed value, or raises
# ValueError saying what was expected.


def _number(value: object, kind: Callable[[str], _T], what: str) -> _T:
    if isinstance(value, bool):
        raise ValueError(f"expected {what}, got {value!r}")
    try:
        return kind(str(value).strip()) if isinstance(value, str) else kind(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"expected {what}, got {value!r}") from None


def _seconds(value: object, *, positive: bool) -> float:
    want = "> 0" if positive else ">= 0"
    what = f"a finite number of seconds {want}"
    number = _number(value, float, what)
    if not math.isfinite(number) or not (number > 0 if positive else number >= 0):
        raise ValueError(f"expected {what}, got {value!r}")
    return number


def positive_seconds(value: object) -> float:
    """A finite number of seconds > 0."""
    return _seconds(value, positive=True)


def non_negative_seconds(value: object) -> float:
    """A finite number of seconds >= 0."""
    return _seconds(value, positive=False)


def positive_int(value: object) -> int:
    """A whole number >= 1."""
    number = _number(value, int, "a whole number")
    if number < 1:
        raise ValueError(f"expected a number >= 1, got {number}")
    return number


def fraction(value: object) -> float:
    """A number between 0 and 1."""
    number = _number(value, float, "a number between 0 and 1")
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"expected a number between 0 and 1, got {number}")
    return number


def _numbers(value: object) -> tuple[int, ...]:
    if isinstance(value, str):
        try:
            return tuple(int(x) for x in value.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"expected comma-separated whole numbers such as 1,2,4, got {value!r}") from None
    if not isinstance(value, (tuple, list)) or any(
        isinstance(v, bool) or not isinstance(v, int) for v in value
    ):
        raise ValueError(f"expected whole numbers such as (1, 2, 4), got {value!r}")
    return tuple(value)


def batch_sizes(value: object) -> tuple[int, ...]:
    """Determinism batch sizes: one or more, each 1..:data:`MAX_BATCH_SIZE` (``"1,2,4"`` or a tuple)."""
    values = _numbers(value)
    if not values or any(not 1 <= v <= MAX_BATCH_SIZE for v in values):
        raise ValueError(
            f"expected one or more batch sizes from 1 to {MAX_BATCH_SIZE} such as 1,2,4,8,16, got {value!r}"
        )
    return values


def prefix_lengths(value: object) -> tuple[int, ...]:
    """Shared-prefix prompt lengths, characters: each 0 (skipped) .. ``len(LONG_PROMPT)``."""
    values = _numbers(value)
    if any(not 0 <= v <= len(LONG_PROMPT) for v in values):
        raise ValueError(
            f"expected lengths between 0 (skip) and {len(LONG_PROMPT)} characters, got {value!r}"
        )
    return tuple(v for v in values if v > 0)


def report_dir(value: object) -> Path:
    """A folder path (created if missing); not empty."""
    if not str(value).strip():
        raise ValueError("the path is empty; pass a folder, such as --report-dir mlaprop-report")
    return Path(value) if not isinstance(value, Path) else value  # type: ignore[arg-type]


def smoke_model(value: str) -> SmokeModel:
    """``--smoke-model`` / ``MLAPROP_SMOKE_MODEL``: ``canary``, ``random`` or ``dummy`` (case-insensitive).

    Raises:
        ValueError: another value (the message lists the choices).
    """
    try:
        return SmokeModel(value.strip().lower())
    except ValueError:
        choices = ", ".join(m.value for m in SmokeModel)
        raise ValueError(f"expected one of {choices}, got {value!r}") from None


def shell_words(value: object) -> tuple[str, ...]:
    """One shell-quoted string split into words (a tuple of words is taken as is)."""
    if isinstance(value, (tuple, list)):
        return tuple(str(v) for v in value)
    try:
        return tuple(shlex.split(str(value)))
    except ValueError as exc:
        raise ValueError(
            f"not valid shell quoting ({exc}); close every quote, e.g. --sim-args='--sim-seed 3' (the value is not "
            "shown: it may hold a secret)"
        ) from None


def sim_words(value: object) -> tuple[str, ...]:
    """``--sim-args``: shell words of ``--sim-*`` flags and their values only. Any other flag would reach the
    simulated server unchecked (``--enable-deterministic-inference`` on an AMD plan); SGLang options belong
    after ``--`` or in ``--server-args``, where compose reads them."""
    words = shell_words(value)
    for word in words:
        if word.startswith("-") and not word.startswith("--sim-"):
            try:
                float(word)  # a negative number is a value
            except ValueError:
                raise ValueError(
                    f"{word.split('=', 1)[0]} is not a simulated-server flag: --sim-args takes --sim-* flags only; "
                    "pass SGLang options after -- or in --server-args, where mlaprop checks them"
                ) from None
    return words


def base_url(value: object) -> str:
    """An ``http://`` or ``https://`` URL with a host (and a valid port, if any), stripped."""
    text = str(value)
    example = "such as http://127.0.0.1:30000"
    stripped = text.strip()
    if not stripped:
        raise ValueError(f"the URL is empty; pass the server's address, {example}")
    parts = urllib.parse.urlsplit(stripped)
    if parts.scheme not in ("http", "https"):
        hint = f" (did you mean http://{stripped}?)" if "://" not in stripped else ""
        raise ValueError(f"{text!r} is not an http:// or https:// URL{hint}; pass one {example}")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.hostname or port == -1:
        what = "no host" if not parts.hostname else "an invalid port"
        raise ValueError(f"{text!r} has {what}; pass a URL {example}")
    return stripped


def _check(flag: str, check: Callable[[object], _T], value: object) -> _T:
    try:
        return check(value)
    except ValueError as exc:
        raise InvalidOptions(f"{flag}: {exc}") from None


# ---------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate and how; shared by ``mlaprop run`` and ``mlaprop eval``.

    Attributes:
        lang: MGSM language (``en`` is SGLang's gate).
        dataset: an MGSM TSV to use instead of the cached download.
        offline: never download the dataset.
        parser: the extractor whose score gates (both are always reported).
        gate: the score to reach, 0..1.
        limit: only the first ``limit`` questions (``None``: all 250).
        concurrency: requests in flight, >= 1 (``None``: every question in one wave, up to
            :data:`mlaprop.evalclient.GATE_CONCURRENCY`, capped by the server's ``max_running_requests``).
        request_timeout_s: per-request read timeout, seconds > 0.
        max_error_rate: stop once failed requests pass this share of the questions, 0..1.
        report_dir: where ``summary.json`` and ``items.jsonl`` go.
        determinism: run the determinism check (``None`` in ``run``: when the plan is deterministic).
        batch_sizes: determinism batch sizes, each 1..:data:`MAX_BATCH_SIZE`.
        prefix_lengths: determinism shared-prefix lengths, characters.
        model: the model name sent to the server (``None``: the first of ``/v1/models``).
        api_key: sent as a bearer token (``None``: the plan's ``--api-key``, if any).
        progress: show progress bars (``None``: on a terminal).
        gated: the score decides the verdict; ``False`` (smoke runs on random weights) reports it only.
        heartbeat_s: seconds between heartbeat lines when not on a terminal (0: none).

    Raises:
        InvalidOptions: a value is out of range; the message names the flag.
    """

    lang: str = "en"
    dataset: str | None = None
    offline: bool = False
    parser: Parser = Parser.SIMPLE_EVALS
    gate: float = DEFAULT_GATE
    limit: int | None = None
    concurrency: int | None = None
    request_timeout_s: float = 600.0
    max_error_rate: float = 0.05
    report_dir: Path = Path("mlaprop-report")
    determinism: bool | None = None
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    prefix_lengths: tuple[int, ...] = DEFAULT_PREFIX_LENGTHS
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    progress: bool | None = None
    gated: bool = True
    heartbeat_s: float = DEFAULT_HEARTBEAT_S

    def __post_init__(self) -> None:
        if self.lang not in LANGUAGES:
            raise InvalidOptions(f"--lang: expected one of {', '.join(LANGUAGES)}, got {self.lang!r}")
        object.__setattr__(self, "parser", Parser(self.parser))
        object.__setattr__(self, "gate", _check("--gate", fraction, self.gate))
        if self.limit is not None:
            _check("--limit", positive_int, self.limit)
        if self.concurrency is not None:
            _check("--concurrency", positive_int, self.concurrency)
        _check("--request-timeout", positive_seconds, self.request_timeout_s)
        _check("--max-error-rate", fraction, self.max_error_rate)
        object.__setattr__(self, "report_dir", _check("--report-dir", report_dir, self.report_dir))
        _check("--batch-sizes", batch_sizes, self.batch_sizes)
        lengths = _check("--prefix-lengths", prefix_lengths, self.prefix_lengths)
        if len(lengths) != len(self.prefix_lengths):
            raise InvalidOptions(
                f"--prefix-lengths: expected lengths between 1 and {len(LONG_PROMPT)} characters, "
                f"got {self.prefix_lengths!r} (0 skips only on the command line)"
            )
        _check("--heartbeat", non_negative_seconds, self.heartbeat_s)

    def client_config(self, api_key: str | None = None) -> ClientConfig:
        """The client settings these options imply (``api_key``: the plan's, used when none is set here)."""
        return ClientConfig(
            concurrency=self.concurrency or GATE_CONCURRENCY,
            request_timeout_s=self.request_timeout_s,
            max_error_rate=self.max_error_rate,
            api_key=self.api_key or api_key,
            progress=self.progress,
        )


@dataclass(frozen=True)
class RunOptions:
    """The main job's settings beyond the eval's.

    Attributes:
        request: what to ask of SGLang.
        environment: where the server runs; ``None`` detects it (from ``env_vars``).
        env_vars: environment variables for detection and preflight (``None``: ``os.environ``).
        simulate: run the simulated SGLang server instead of SGLang (no GPU needed).
        sim_accuracy: the simulated model's MGSM accuracy, 0..1.
        sim_latency_s: the simulated server's delay per generation request, seconds >= 0.
        sim_args: more ``--sim-*`` arguments for the simulated server (fault injection).
        command_prefix: the server command before ``--model-path`` (default SGLang's launcher, or the
            simulator with ``simulate``).
        ready_timeout_s: how long the server may take to become ready, seconds > 0.
        grace_s: seconds between SIGTERM and SIGKILL at teardown, >= 0.
        echo_server_log: mirror the server log (redacted) to stderr.
        preflight: check GPU, SGLang and model before launching (real runs only).
        smoke: serve a tiny MLA FP8 model instead of the request's model (which one: ``smoke_model``).
        smoke_model: the smoke model (:class:`SmokeModel`; default the canary).

    Raises:
        InvalidOptions: a value is out of range; the message names the flag.
    """

    request: LaunchRequest = field(default_factory=LaunchRequest)
    environment: Environment | None = None
    env_vars: Mapping[str, str] | None = None
    simulate: bool = False
    sim_accuracy: float = 0.9
    sim_latency_s: float = 0.02
    sim_args: tuple[str, ...] = ()
    command_prefix: tuple[str, ...] | None = None
    ready_timeout_s: float = 600.0
    grace_s: float = 10.0
    echo_server_log: bool = False
    preflight: bool = True
    smoke: bool = False
    smoke_model: SmokeModel = SmokeModel.CANARY

    def __post_init__(self) -> None:
        _check("--sim-accuracy", fraction, self.sim_accuracy)
        _check("--sim-latency", non_negative_seconds, self.sim_latency_s)
        object.__setattr__(self, "sim_args", _check("--sim-args", sim_words, self.sim_args))
        sim_flags = [str(a).split("=", 1)[0] for a in self.request.extra_args if str(a).startswith("--sim-")]
        if sim_flags and not self.simulate and self.command_prefix is None:
            # compose passes --sim-* extra arguments through for the simulator; SGLang's parser refuses them
            raise InvalidOptions(
                f"{sim_flags[0]} is a simulated-server flag, but this run launches SGLang, whose parser refuses "
                "it: add --simulate, or remove it from the extra arguments"
            )
        _check("--ready-timeout", positive_seconds, self.ready_timeout_s)
        _check("teardown grace", non_negative_seconds, self.grace_s)
        object.__setattr__(self, "smoke_model", SmokeModel(self.smoke_model))
