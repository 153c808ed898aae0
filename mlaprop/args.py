"""SGLang server arguments, read exactly as a given SGLang version's ``launch_server`` parser reads them. Pure.

SGLang's parser is plain :mod:`argparse` (``srt/server_args.py`` ``prepare_server_args``: an
``argparse.ArgumentParser`` filled by ``ServerArgs.add_cli_args``, ``allow_abbrev`` left on). So it takes
unique prefixes (``--enable-det`` is ``--enable-deterministic-inference``), ``--opt=value`` forms, and keeps
the last of a repeated option. :func:`read_server_args` rebuilds that parser from the option table of the
SGLang version (``mlaprop/data/sglang_options.json``, extracted from SGLang's own parser per release by
``tools/extract_options.py``; ``tests/contract/test_options.py`` regenerates it from the installed SGLang
and compares) and reads an argv with it, so every check mlaprop makes applies to what SGLang will read.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType
from typing import Any, NoReturn

from packaging.version import InvalidVersion, Version

from mlaprop.environment import InvalidEnvironment, LaunchPlan
from mlaprop.redact import MASK, is_secret_name

__all__ = [
    "DETERMINISTIC_OPTION",
    "LAUNCHER_OWNED",
    "REFUSED",
    "Option",
    "OptionSpec",
    "OptionTable",
    "ServerArgs",
    "flatten",
    "option_table",
    "read_server_args",
    "table_versions",
]

DETERMINISTIC_OPTION = "--enable-deterministic-inference"
#: Options the launcher sets itself (``mlaprop.server``); a user may not pass them as extra arguments.
LAUNCHER_OWNED: frozenset[str] = frozenset({"--model-path", "--host", "--port"})
#: Options mlaprop cannot check when given as extra arguments, with why: ``--config`` makes SGLang read more
#: options from a file (``prepare_server_args``), ``--help`` makes it print help and exit.
REFUSED: Mapping[str, str] = MappingProxyType(
    {
        "--config": "SGLang reads further options from that file, which mlaprop cannot check; pass them as "
        "extra arguments instead",
        "--help": "SGLang would print its help and exit instead of serving",
    }
)
#: Spellings mlaprop emits where SGLang accepts several for one option.
_PREFERRED = ("--tp-size", "--dp-size", "--pp-size", "--ep-size", "--model-path")


@dataclass(frozen=True)
class OptionSpec:
    """One option of SGLang's parser.

    Attributes:
        strings: every option string (``("--tensor-parallel-size", "--tp-size")``).
        action: argparse action class name (``"_StoreAction"``, ``"_StoreTrueAction"``, ``"_AppendAction"``,
            or one of SGLang's own action classes).
        nargs: argparse ``nargs`` (``None`` one value, ``0`` a switch, ``"?"``, ``"*"``, ``"+"`` or a count).
        choices: the accepted values, kept for the options mlaprop checks; ``None`` otherwise.
        type: ``"int"`` or ``"float"`` when SGLang's parser converts the value so (and exits 2 when it cannot).
    """

    strings: tuple[str, ...]
    action: str
    nargs: int | str | None
    choices: tuple[str, ...] | None = None
    type: str | None = None

    @property
    def name(self) -> str:
        """The spelling mlaprop emits: ``--tp-size`` for tp, else the longest ``--`` string."""
        for s in _PREFERRED:
            if s in self.strings:
                return s
        longs = [s for s in self.strings if s.startswith("--")] or list(self.strings)
        return max(longs, key=lambda s: (len(s), s))

    @property
    def switch(self) -> bool:
        """Takes no value (``store_true`` and friends)."""
        return self.nargs == 0


@dataclass(frozen=True)
class OptionTable:
    """The options of one SGLang version's ``launch_server`` parser.

    Attributes:
        version: the SGLang release the table was extracted from (``"0.5.11"``).
        allow_abbrev: the parser takes unique prefixes (``True`` in every known release).
        options: every option but ``--help``.
        implies_deterministic: options that turn deterministic inference on by themselves
            (``--rl-on-policy-target`` from 0.5.5: ``_handle_deterministic_inference``).
    """

    version: str
    allow_abbrev: bool
    options: tuple[OptionSpec, ...]
    implies_deterministic: tuple[str, ...] = ()

    @functools.cached_property
    def by_string(self) -> Mapping[str, OptionSpec]:
        """Every option string to its option."""
        return {s: o for o in self.options for s in o.strings}

    def resolve(self, token: str) -> OptionSpec | None:
        """The option a ``--name`` / ``--name=value`` token means to argparse: exact, else the unique option
        whose string starts with it (when ``allow_abbrev``); ``None`` when unknown or ambiguous."""
        name = token.split("=", 1)[0] if "=" in token and token not in self.by_string else token
        if name in self.by_string:
            return self.by_string[name]
        if not self.allow_abbrev or not name.startswith("--"):
            return None
        hits = {o for s, o in self.by_string.items() if s.startswith(name)}
        return next(iter(hits)) if len(hits) == 1 else None


@dataclass(frozen=True)
class Option:
    """One option as SGLang reads it: ``name`` in mlaprop's spelling, ``values`` as given (``()`` for a switch).

    Attributes:
        name: the option (``--tp-size``).
        values: its argument tokens.
        written: the option token as the user wrote it (``--tp-s``, ``--tp-size=8``).
        abbreviated: ``written`` is a unique prefix argparse expanded, not one of the option's strings.
    """

    name: str
    values: tuple[str, ...] = ()
    written: str = ""
    abbreviated: bool = False

    @property
    def value(self) -> str | None:
        """The single value, or ``None`` for a switch."""
        return self.values[-1] if self.values else None

    def tokens(self) -> tuple[str, ...]:
        """The option as argv tokens in mlaprop's spelling (``--name=value`` for a value that starts with ``-``)."""
        if len(self.values) == 1 and self.values[0].startswith("-"):
            return (f"{self.name}={self.values[0]}",)
        return (self.name, *self.values)


@dataclass(frozen=True)
class ServerArgs:
    """An argv as SGLang's parser reads it.

    Attributes:
        version: SGLang version whose option table read it.
        options: every option read, in order, repeats folded (the last wins; ``append`` options keep all),
            in mlaprop's spelling.
        attention_backend: ``--attention-backend``, or the value of ``--prefill-attention-backend`` and
            ``--decode-attention-backend`` when both are given and equal (SGLang then makes it the attention
            backend, over ``--attention-backend``), or ``None`` (SGLang then chooses).
        kv_cache_dtype: ``--kv-cache-dtype`` or ``None`` (SGLang's default ``auto``).
        tp_size: ``--tp-size`` / ``--tensor-parallel-size`` as written, or ``None`` (1).
        deterministic: SGLang will run deterministic inference: ``--enable-deterministic-inference`` or an
            option implying it (``--rl-on-policy-target``).
        deterministic_by: the option that turned it on, ``None`` when off.
        api_key, load_format, model_path, host, port: those options' values, or ``None``.
        repeated: options given more than once (argparse keeps the last).
    """

    version: str
    options: tuple[Option, ...]
    attention_backend: str | None = None
    kv_cache_dtype: str | None = None
    tp_size: str | None = None
    deterministic: bool = False
    deterministic_by: str | None = None
    api_key: str | None = None
    load_format: str | None = None
    model_path: str | None = None
    host: str | None = None
    port: str | None = None
    repeated: tuple[str, ...] = ()
    _by_name: Mapping[str, Option] = field(default_factory=dict, repr=False, compare=False)

    def get(self, name: str) -> Option | None:
        """The option ``name`` (mlaprop's spelling), or ``None``."""
        return self._by_name.get(name)

    def spelled(self, name: str) -> str:
        """How the user wrote option ``name`` when it was not written in full, for messages:
        ``"`--enable-det` is SGLang's `--enable-deterministic-inference`"``; ``""`` when written in full."""
        opt = self.get(name)
        if opt is None or not opt.abbreviated:
            return ""
        return f"`{opt.written.split('=', 1)[0]}` is SGLang's `{name}`"

    def abbreviations(self) -> str:
        """Every abbreviated option, as :meth:`spelled` words it, joined by ``"; "``; ``""`` when none."""
        return "; ".join(self.spelled(o.name) for o in self.options if o.abbreviated)


class _ArgvError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _ArgvError(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise _ArgvError(message or f"exit {status}")


class _Record(argparse.Action):
    """Records each occurrence in order: (option, values)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: Any = None,
    ) -> None:
        seen: list[tuple[str, tuple[str, ...], str]] = getattr(namespace, "_seen", [])
        if values is None or values is True:
            vals: tuple[str, ...] = ()
        elif isinstance(values, list):
            vals = tuple(str(v) for v in values)
        else:
            vals = (str(values),)
        seen.append((self.dest, vals, str(option_string)))
        namespace._seen = seen


@functools.cache
def _data() -> Mapping[str, Any]:
    text = resources.files("mlaprop").joinpath("data/sglang_options.json").read_text()
    return json.loads(text)  # type: ignore[no-any-return]


def table_versions() -> tuple[str, ...]:
    """The SGLang releases whose option tables are shipped, oldest first."""
    return tuple(sorted(_data(), key=Version))


@functools.cache
def option_table(version: str) -> OptionTable:
    """The option table for SGLang ``version``: its release's, or the newest release not newer than it
    (pre-releases and local builds read as their release; newer versions as the newest table).

    Raises:
        InvalidEnvironment: ``version`` is not a version, or older than every shipped table.
    """
    try:
        v = Version(str(version).strip())
    except InvalidVersion:
        raise InvalidEnvironment(f"SGLang version {version!r} is not a version number") from None
    known = [k for k in table_versions() if Version(k) <= Version(v.base_version)]
    if not known:
        raise InvalidEnvironment(
            f"no SGLang option table for {version}: mlaprop has {table_versions()[0]} to {table_versions()[-1]}"
        )
    raw = _data()[known[-1]]
    options = tuple(
        OptionSpec(
            strings=tuple(o["strings"]),
            action=o["action"],
            nargs=o["nargs"],
            choices=tuple(o["choices"]) if o.get("choices") is not None else None,
            type=o.get("type"),
        )
        for o in raw["options"]
    )
    return OptionTable(
        known[-1], bool(raw["allow_abbrev"]), options, tuple(raw.get("implies_deterministic", ()))
    )


def _checked(kind: str) -> Any:
    """An argparse ``type`` that fails as SGLang's ``int`` / ``float`` does but keeps the text as written."""
    convert = {"int": int, "float": float}[kind]

    def check(value: str) -> str:
        convert(value)
        return value

    check.__name__ = kind  # argparse says "invalid int value: 'x'", as SGLang's parser does
    return check


@functools.cache
def _parser(version: str) -> _Parser:
    table = option_table(version)
    parser = _Parser(prog="sglang serve", allow_abbrev=table.allow_abbrev, add_help=False)
    parser.add_argument("-h", "--help", action=_Record, nargs=0, dest="--help")
    for opt in table.options:
        nargs: Any = opt.nargs
        if opt.action in ("_StoreTrueAction", "_StoreFalseAction", "_StoreConstAction", "_CountAction"):
            nargs = 0
        if opt.action == "BooleanOptionalAction":
            nargs = 0
        extra: dict[str, Any] = {"type": _checked(opt.type)} if opt.type in ("int", "float") else {}
        parser.add_argument(
            *opt.strings, action=_Record, nargs=nargs, dest=opt.name, choices=opt.choices, **extra
        )
    return parser


def read_server_args(argv: Sequence[str], version: str) -> ServerArgs:
    """Read ``argv`` as SGLang ``version``'s ``launch_server`` parser reads it.

    Args:
        argv: server argument tokens (``["--tp-s", "8", "--enable-det"]``).
        version: the SGLang version (``"0.5.11"``); its option table is used (see :func:`option_table`).

    Returns:
        A :class:`ServerArgs`; prefixes are expanded, ``=`` forms split, repeats folded (last wins).

    Raises:
        InvalidEnvironment: SGLang's parser would exit with status 2 on ``argv`` (an unknown or ambiguous
            option, a missing value, a value outside the choices, a stray token); the message is argparse's,
            with the SGLang version.
    """
    for tok in argv:
        if not isinstance(tok, str):
            raise InvalidEnvironment(f"server argument {tok!r} is not a string")
    table = option_table(version)
    ns = argparse.Namespace()
    try:
        _parser(table.version).parse_args(list(argv), namespace=ns)
    except _ArgvError as exc:
        raise InvalidEnvironment(
            f"SGLang {table.version}'s parser refuses these server arguments ({_masked(str(exc), argv, table)}); "
            "SGLang options are written "
            "--name value or --name=value (e.g. --attention-backend triton)"
        ) from None
    seen: list[tuple[str, tuple[str, ...], str]] = getattr(ns, "_seen", [])
    written = _written_tokens(argv, table)
    folded: dict[str, Option] = {}
    repeated: list[str] = []
    appends = {o.name for o in table.options if o.action == "_AppendAction"}
    for index, (name, values, _full) in enumerate(seen):
        token = written[index] if index < len(written) else name
        short = token.split("=", 1)[0] not in table.by_string and token not in ("-h", "--help")
        if name in appends and name in folded:
            old = folded.pop(name)
            folded[name] = Option(name, old.values + values, token, short or old.abbreviated)
        else:
            if name in folded and name not in repeated:
                repeated.append(name)
            folded.pop(name, None)
            folded[name] = Option(name, values, token, short)
    options = tuple(folded.values())
    by_name = dict(folded)

    def value(*names: str) -> str | None:
        for n in names:
            if n in by_name and by_name[n].values:
                return by_name[n].value
        return None

    det_by: str | None = None
    if DETERMINISTIC_OPTION in by_name:
        det_by = DETERMINISTIC_OPTION
    else:
        for implied in table.implies_deterministic:
            spec = table.by_string.get(implied)
            if spec is not None and spec.name in by_name:
                det_by = spec.name
    # SGLang's _handle_attention_backend_compatibility (``_attention_backend_default`` from 0.5.20): equal
    # prefill and decode backends become the attention backend, over an explicit --attention-backend too.
    prefill, decode = value("--prefill-attention-backend"), value("--decode-attention-backend")
    attention_backend = prefill if prefill is not None and prefill == decode else value("--attention-backend")
    return ServerArgs(
        version=table.version,
        options=options,
        attention_backend=attention_backend,
        kv_cache_dtype=value("--kv-cache-dtype"),
        tp_size=value("--tp-size"),
        deterministic=det_by is not None,
        deterministic_by=det_by,
        api_key=value("--api-key"),
        load_format=value("--load-format"),
        model_path=value("--model-path"),
        host=value("--host"),
        port=value("--port"),
        repeated=tuple(repeated),
        _by_name=MappingProxyType(by_name),
    )


def _masked(message: str, argv: Sequence[str], table: OptionTable) -> str:
    """``message`` with the value of every secret option in ``argv`` (``--api-key``, ``--hf-token``, their
    prefixes and ``=`` forms; :func:`mlaprop.redact.is_secret_name`) replaced by ``***``."""
    secrets: list[str] = []
    for i, tok in enumerate(argv):
        head, eq, tail = tok.partition("=")
        spec = table.resolve(tok)
        if is_secret_name(head) or (spec is not None and is_secret_name(spec.name)):
            value = tail if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if value:
                secrets.append(value)
    for secret in sorted(secrets, key=len, reverse=True):
        message = message.replace(secret, MASK)
    return message


def _written_tokens(argv: Sequence[str], table: OptionTable) -> list[str]:
    """The option tokens of ``argv`` in order, as written (argparse has accepted ``argv`` already)."""
    out = []
    for tok in argv:
        head = tok.split("=", 1)[0]
        known = tok == "-h" or table.resolve(tok) is not None or (len(head) > 2 and "--help".startswith(head))
        if tok.startswith("-") and known and len(tok) > 1 and not _is_number(tok):
            out.append(tok)
    return out


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def flatten(options: Iterable[Option]) -> tuple[str, ...]:
    """Options back to argv tokens, in mlaprop's spelling."""
    return tuple(t for o in options for t in o.tokens())


def split_simulator_args(tokens: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split extra arguments into SGLang's and the simulated server's own ``--sim-*`` flags
    (:mod:`mlaprop.simserver`; ``--sim-x value`` or ``--sim-x=value``). SGLang's parser would refuse the latter;
    they are passed through, after SGLang's, for a server command that is the simulator."""
    ours: list[str] = []
    sim: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if isinstance(tok, str) and tok.startswith("--sim-"):
            sim.append(tok)
            if "=" not in tok and i + 1 < len(tokens) and not str(tokens[i + 1]).startswith("--"):
                sim.append(tokens[i + 1])
                i += 1
        else:
            ours.append(tok)
        i += 1
    return tuple(ours), tuple(sim)


def read_plan(plan: LaunchPlan) -> ServerArgs:
    """``plan`` as SGLang ``plan.sglang_version`` reads it: ``--model-path`` ``plan.model`` and ``plan.argv``
    (the simulated server's ``--sim-*`` flags left out; ``host``/``port`` are the launcher's and read ``None``).

    Raises:
        InvalidEnvironment: SGLang's parser would refuse the plan (never for a plan ``compose`` returned).
    """
    argv = split_simulator_args(plan.argv)[0]
    return read_server_args(["--model-path", plan.model, *argv], plan.sglang_version)
