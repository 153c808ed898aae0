"""Reading and writing SGLang server arguments (``--name value`` / ``--name=value`` / ``--flag``). Pure.

mlaprop only needs to know which options are switches and which take a value, for the options it
composes and the ones users commonly add; an unknown option takes the next token as its value unless that
token is itself an option.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mlaprop.environment import InvalidEnvironment

__all__ = [
    "LAUNCHER_OWNED",
    "SWITCHES",
    "VALUE_OPTIONS",
    "Option",
    "canonical",
    "flatten",
    "parse_args",
]

#: ``store_true`` switches of ``sglang.launch_server`` (``srt/server_args.py``) that mlaprop meets.
SWITCHES: frozenset[str] = frozenset(
    {
        "--trust-remote-code",
        "--enable-deterministic-inference",
        "--disable-cuda-graph",
        "--skip-server-warmup",
        "--disable-radix-cache",
        "--enable-dp-attention",
        "--disable-custom-all-reduce",
        "--enable-torch-compile",
        "--log-requests",
        "--enable-metrics",
        "--disable-overlap-schedule",
        "--enable-mixed-chunk",
        "--skip-tokenizer-init",
        "--enable-nan-detection",
        "--disable-chunked-prefix-cache",
        "--enable-cache-report",
        "--show-time-cost",
        "--disable-shared-experts-fusion",
        "--enable-two-batch-overlap",
    }
)

#: Options of ``sglang.launch_server`` that always take a value.
VALUE_OPTIONS: frozenset[str] = frozenset(
    {
        "--attention-backend",
        "--prefill-attention-backend",
        "--decode-attention-backend",
        "--kv-cache-dtype",
        "--tp-size",
        "--dp-size",
        "--ep-size",
        "--pp-size",
        "--mem-fraction-static",
        "--load-format",
        "--grammar-backend",
        "--context-length",
        "--max-running-requests",
        "--max-total-tokens",
        "--chunked-prefill-size",
        "--api-key",
        "--served-model-name",
        "--quantization",
        "--dtype",
        "--random-seed",
        "--sampling-backend",
        "--cuda-graph-max-bs",
        "--log-level",
        "--moe-a2a-backend",
        "--moe-runner-backend",
        "--watchdog-timeout",
        "--download-dir",
        "--tokenizer-path",
        "--revision",
        "--device",
        "--model-path",
        "--model",
        "--host",
        "--port",
    }
)

#: Aliases SGLang accepts for one option, mapped to the spelling mlaprop emits.
_ALIASES: dict[str, str] = {
    "--tensor-parallel-size": "--tp-size",
    "--tp": "--tp-size",
    "--data-parallel-size": "--dp-size",
    "--model": "--model-path",
}

#: Options the launcher sets itself (``mlaprop.server``); a user may not pass them as extra arguments.
LAUNCHER_OWNED: frozenset[str] = frozenset({"--model-path", "--host", "--port"})


def canonical(name: str) -> str:
    """The spelling mlaprop emits for option ``name`` (``--tensor-parallel-size`` -> ``--tp-size``).

    SGLang's argparse also accepts unique prefixes of its options; a prefix of a launcher-owned option
    (``--por`` for ``--port``, ``--hos``, ``--model-pa``) is expanded so it cannot slip past the refusal.
    """
    name = _ALIASES.get(name, name)
    if name in SWITCHES or name in VALUE_OPTIONS or len(name) < 4:
        return name
    owned = [o for o in LAUNCHER_OWNED if o.startswith(name)]
    return owned[0] if len(owned) == 1 else name


@dataclass(frozen=True)
class Option:
    """One parsed server option: ``name`` in canonical spelling, ``value`` ``None`` for a switch."""

    name: str
    value: str | None

    def tokens(self) -> tuple[str, ...]:
        """The option as argv tokens: ``("--name", "value")`` or ``("--name",)``."""
        return (self.name,) if self.value is None else (self.name, self.value)


def _is_option(token: str) -> bool:
    if token.startswith("--"):
        return True
    if token.startswith("-") and len(token) > 1:
        try:
            float(token)
        except ValueError:
            return True
    return False


def parse_args(tokens: Sequence[str]) -> list[Option]:
    """Parse SGLang server arguments into options, in order (duplicates kept).

    Args:
        tokens: argv tokens, e.g. ``["--attention-backend", "triton", "--disable-cuda-graph"]``.

    Raises:
        InvalidEnvironment: a token is not an option where one is expected (``"triton"`` alone, ``"-x"``),
            an option that takes a value has none, or a switch is given a value (``--trust-remote-code=1``).
            The message names the token and says how to write it.
    """
    out: list[Option] = []
    i = 0
    toks = list(tokens)
    while i < len(toks):
        tok = toks[i]
        if not isinstance(tok, str):
            raise InvalidEnvironment(f"server argument {tok!r} is not a string")
        if not tok.startswith("--") or tok == "--" or tok.strip() != tok or len(tok) < 3:
            raise InvalidEnvironment(
                f"server argument {tok!r} is not an option: SGLang options are written --name value or "
                "--name=value (e.g. --attention-backend triton)"
            )
        if "=" in tok:
            raw, value = tok.split("=", 1)
            name = canonical(raw)
            if name in SWITCHES:
                raise InvalidEnvironment(f"{raw} is a switch and takes no value; write {raw} alone")
            if value == "":
                raise InvalidEnvironment(f"{raw} needs a value: write {raw} VALUE or {raw}=VALUE")
            out.append(Option(name, value))
            i += 1
            continue
        name = canonical(tok)
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        if name in SWITCHES:
            out.append(Option(name, None))
            i += 1
        elif nxt is not None and isinstance(nxt, str) and not _is_option(nxt):
            out.append(Option(name, nxt))
            i += 2
        elif name in VALUE_OPTIONS:
            raise InvalidEnvironment(f"{tok} needs a value: write {tok} VALUE or {tok}=VALUE")
        else:
            out.append(Option(name, None))
            i += 1
    return out


def flatten(options: Iterable[Option]) -> tuple[str, ...]:
    """Options back to argv tokens."""
    return tuple(t for o in options for t in o.tokens())
