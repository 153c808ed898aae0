"""Hide secrets in text shown to people: printed commands, mirrored server logs, error messages, reports.

A secret is the value of a secret-named flag or variable, or a token recognisable on its own:

- flags ``--api-key VALUE`` / ``--api-key=VALUE`` and any flag whose name ends in ``api-key``, ``-token``,
  ``-secret`` or ``-password`` (``--admin-api-key``, ``--hf-token``);
- variables ``HF_TOKEN``, ``HUGGING_FACE_HUB_TOKEN`` and any name ending in ``_API_KEY``, ``_TOKEN``,
  ``_SECRET`` or ``_PASSWORD`` (case-insensitive, so SGLang's logged ``ServerArgs(api_key='...')`` counts),
  written ``NAME=value``, ``NAME: value``, ``'NAME': 'value'`` or as a mapping key;
- Hugging Face tokens ``hf_`` followed by 10 or more letters/digits, anywhere;
- ``Authorization: Bearer VALUE`` (and any ``Bearer VALUE`` of 8 or more token characters);
- credentials in URLs, ``http://user:password@host`` -> ``http://***@host``.

Each secret value is replaced by ``***``; the name stays, so the reader still sees *which* secret was set.
``None`` and empty values are left alone (nothing to hide), and so are all-digit values of names other than
API keys (SGLang logs counts such as ``#new-token: 7``). Pure functions, no I/O.

Patterns miss a secret that appears without its name (a bare value in an exception text, a Python-repr'd argv
list, an HTTP error body). :class:`Redactor` closes that gap: built from every secret mlaprop knows
(:meth:`Redactor.from_sources`: the ``--api-key`` family in argv, secret-named environment variables, URL
credentials), it masks those *values* wherever they appear, in every encoding a log, a report or an error
message gives them (bare, shell-quoted, Python repr, JSON-escaped, URL-encoded), and then applies
:func:`redact`. :class:`LogFilter` is its streaming form for a server log: bytes in, redacted complete lines
out, each line cut at a bounded length (so memory stays bounded whatever the server writes).
"""

from __future__ import annotations

import json
import re
import shlex
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

__all__ = [
    "MASK",
    "MAX_LINE_BYTES",
    "MIN_SECRET_LENGTH",
    "LogFilter",
    "Redactor",
    "is_secret_name",
    "redact",
    "redact_argv",
    "redact_env",
    "secrets_in",
]

#: What a secret value is replaced by.
MASK = "***"

_SECRET_NAMES = frozenset(
    {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "API_KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "AUTH"}
)
#: Secret flags of ``sglang.launch_server``; argparse also accepts any unique prefix of them (``--api-ke``).
_SECRET_FLAGS = ("--api-key", "--admin-api-key", "--hf-token")
_SECRET_SUFFIXES = ("_API_KEY", "_TOKEN", "_SECRET", "_PASSWORD", "_PASSWD", "_AUTH", "_CREDENTIALS")
#: Parts that make any name a secret wherever they sit (``AWS_SECRET_ACCESS_KEY``, ``GCP_PRIVATE_KEY_ID``).
_SECRET_PARTS = ("SECRET", "PASSWORD", "PASSWD", "ACCESS_KEY", "PRIVATE_KEY")

# A secret-named key, as an env var, a flag (dashes) or a Python attribute, optionally quoted, then
# "=" or ":" and the value (optionally quoted). The value stops at whitespace, a quote, a comma or a bracket.
_NAME = (
    r"[A-Za-z0-9_-]*(?:api[_-]key|[_-]token|[_-]secret|[_-]password|[_-]passwd|[_-]auth"
    r"|[_-]access[_-]key|[_-]secret[_-]key|[_-]private[_-]key)|hf_token|token|secret|password|passwd"
)
_ASSIGNMENT = re.compile(
    rf"""(?ix)
    (?<![A-Za-z0-9_-])
    (?P<key>(?:--)?(?:{_NAME}))
    (?P<sep>['"]?\s*[=:]\s*(?:['"])?)
    (?!None(?:[\s'",)}}\]]|$))
    (?P<value>[^\s'",)}}\]]+)
    """
)
# A secret-named key with a quoted value, which may hold spaces and commas: api_key='my secret,key'.
_QUOTED = re.compile(
    rf"""(?ix)
    (?<![A-Za-z0-9_-])
    (?P<key>(?:--)?(?:{_NAME}))
    (?P<sep>['"]?\s*[=:]\s*)
    (?P<quote>['"])(?P<value>[^'"\n]*)(?P=quote)
    """
)
# Any flag followed by its value as the next word ("--api-key VALUE", "--api-ke 'a b'"); masked when the
# flag names a secret (see is_secret_name).
_FLAG_SPACE = re.compile(
    r"(?<![A-Za-z0-9_-])(?P<key>--[A-Za-z0-9][A-Za-z0-9-]*)(?P<sep>\s+)"
    r"(?P<value>(?!--)(?:'[^'\n]*'|\"[^\"\n]*\"|[^\s'\"]+))"
)
# Any flag with "=value": masked when the flag names a secret.
_FLAG_EQ = re.compile(r"(?<![A-Za-z0-9_-])(?P<key>--[A-Za-z0-9][A-Za-z0-9-]*)(?P<sep>=)(?P<value>[^\s]+)")
_AUTHORIZATION = re.compile(
    r"(?i)(?P<key>\bauthorization)(?P<sep>['\"]?\s*[:=]\s*['\"]?(?:(?:bearer|basic|token)\s+)?)"
    r"(?P<value>[^\s'\",)}\]]+)"
)
_BEARER = re.compile(r"(?i)(?P<key>\bbearer)(?P<sep>\s+)(?P<value>[A-Za-z0-9._~+/=-]{8,})")
_HF_TOKEN = re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{10,}")
# Credentials in a URL: scheme://user:password@host
_URL_USERINFO = re.compile(r"(?i)(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<userinfo>[^\s/@'\"]+)@")


def _mask_value(match: re.Match[str]) -> str:
    key, value = match.group("key"), match.group("value")
    if value.isdigit() and "api" not in key.lower():
        return match.group(0)  # "#new-token: 7" in SGLang's batch logs is a count, not a secret
    return f"{key}{match.group('sep')}{MASK}"


def is_secret_name(name: str) -> bool:
    """Whether a variable or flag name (``HF_TOKEN``, ``--api-key``, ``api_key``) names a secret; a flag
    that argparse would expand to a secret flag (``--api-ke``, ``--admin-api``) counts too."""
    stripped = name.strip()
    key = stripped.lstrip("-").replace("-", "_").upper()
    if key in _SECRET_NAMES or key.endswith(_SECRET_SUFFIXES) or any(p in key for p in _SECRET_PARTS):
        return True
    if stripped.startswith("--") and len(stripped) >= 5:
        return any(f.startswith(stripped.lower()) for f in _SECRET_FLAGS)
    return False


def _mask_quoted(match: re.Match[str]) -> str:
    if not match.group("value"):
        return match.group(0)
    q = match.group("quote")
    return f"{match.group('key')}{match.group('sep')}{q}{MASK}{q}"


def _mask_flag(match: re.Match[str]) -> str:
    if not is_secret_name(match.group("key")):
        return match.group(0)
    return _mask_value(match)


# Cheap pre-check on the lower-cased text: a line without a hit cannot match any pattern below (the checks
# are a superset of them), so redact() leaves it alone. Each check starts with a literal, which the regex
# engine scans for quickly; this makes a flood of SGLang's "#token: 1234" lines cheap.
_V = r"""[\s'",)}\]]"""
_KEY_VALUE = (
    r"""['"]?\s*[=:](?=\s*['"]|\s*(?!none(?:""" + _V + r"""|$))(?!\d+(?:""" + _V + r"""|$))[^\s'",)}\]])"""
)
_PRECHECKS = (
    *(re.compile(k + _KEY_VALUE) for k in ("token", "secret", "password", "passwd", "auth")),
    *(re.compile(k + _KEY_VALUE) for k in ("access_key", "access-key", "private_key", "private-key")),
    *(re.compile(k + r"""['"]?\s*[=:]""") for k in ("api_key", "api-key")),  # digits count for API keys
    re.compile(r"--(?:api|adm|hf-|[a-z0-9-]*(?:key|token|secret|password|passwd|auth))"),
)
_PRECHECK_WORDS = ("authoriz", "bearer", "hf_", "://")


def _may_hold_secret(low: str) -> bool:
    """Whether lower-cased ``low`` may hold something a pattern masks (``False``: it surely does not)."""
    return any(w in low for w in _PRECHECK_WORDS) or any(p.search(low) for p in _PRECHECKS)


def redact(text: str) -> str:
    """``text`` with every secret value (see the module docstring) replaced by ``***``.

    Only lines the cheap pre-check flags (and the line after each, where a flag's value may sit) go through
    the patterns, so long texts of ordinary log lines cost one scan.
    """
    low = text.lower()
    if not _may_hold_secret(low):
        return text
    if "\n" not in text:
        return _redact_patterns(text)
    lines = text.split("\n")
    lows = low.split("\n")
    if len(lines) != len(lows):  # pragma: no cover - lower() never adds or removes newlines
        return _redact_patterns(text)
    needed = [False] * (len(lines) + 1)
    for i, line in enumerate(lows):
        if _may_hold_secret(line):
            needed[i] = needed[i + 1] = True
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not needed[i]:
            out.append(lines[i])
            i += 1
            continue
        j = i
        while j < len(lines) and needed[j]:
            j += 1
        out.append(_redact_patterns("\n".join(lines[i:j])))
        i = j
    return "\n".join(out)


def _redact_patterns(text: str) -> str:
    text = _QUOTED.sub(_mask_quoted, text)
    text = _FLAG_SPACE.sub(_mask_flag, text)
    text = _FLAG_EQ.sub(_mask_flag, text)
    text = _ASSIGNMENT.sub(_mask_value, text)
    text = _AUTHORIZATION.sub(_mask_value, text)
    text = _BEARER.sub(_mask_value, text)
    text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    return _HF_TOKEN.sub(MASK, text)


def redact_argv(argv: Iterable[str]) -> list[str]:
    """``argv`` with the values of secret flags (``--api-key VALUE``, ``--api-key=VALUE``) and any secret
    found by :func:`redact` inside an argument replaced by ``***``; the argument count is unchanged."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        arg = str(arg)
        if hide_next and not arg.startswith("--"):
            out.append(MASK)
            hide_next = False
            continue
        hide_next = False
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if is_secret_name(name):
                if eq:
                    out.append(f"{name}={MASK}" if value else arg)
                else:
                    out.append(arg)
                    hide_next = True
                continue
        out.append(redact(arg))
    return out


def redact_env(mapping: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``mapping`` where secret-named variables' values are ``***`` and other values are passed
    through :func:`redact` (an ``hf_...`` token in any variable is hidden too)."""
    return {k: (MASK if v and is_secret_name(k) else redact(str(v))) for k, v in mapping.items()}


# --------------------------------------------------------------------------------------------------- by value

#: Shorter values are masked by pattern only: masking ``abc`` or ``1`` wherever it appears would garble the
#: text and hide nothing worth hiding.
MIN_SECRET_LENGTH = 4
_NOT_SECRETS = frozenset({"true", "false", "none", "null", "yes", "no", "auto", "0", "1"})


def _is_maskable(value: str) -> bool:
    v = value.strip()
    if len(v) < MIN_SECRET_LENGTH or v.lower() in _NOT_SECRETS:
        return False
    return not (v.isdigit() and len(v) < 8)  # ports, counts


def _url_credentials(text: str) -> list[str]:
    """The userinfo (``user:password``) and password of every URL in ``text``."""
    found = []
    for m in _URL_USERINFO.finditer(text):
        userinfo = m.group("userinfo")
        found.append(userinfo)
        _, colon, password = userinfo.partition(":")
        if colon and password:
            found.append(password)
            found.append(urllib.parse.unquote(password))
    return found


def secrets_in(argv: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> list[str]:
    """Every secret value in ``argv`` and ``environ``, in order of appearance, deduplicated.

    argv: the value of every flag :func:`is_secret_name` accepts, in any spelling SGLang's argparse accepts
    (``--api-key V``, ``--api-key=V``, unique prefixes such as ``--api-ke V``, ``--admin-api-key``,
    ``--hf-token``); URL credentials in any argument. environ: the value of every secret-named variable
    (``HF_TOKEN``, ``OPENAI_API_KEY``, ``*_API_KEY``, ``*_TOKEN``, ``*_SECRET``, ``*_PASSWORD``); URL credentials
    in any value (``HTTPS_PROXY=http://user:pw@proxy``); Hugging Face tokens (``hf_...``) in any value.
    Values shorter than :data:`MIN_SECRET_LENGTH` or such as ``true`` / ``none`` are left out.
    """
    found: list[str] = []
    args = [str(a) for a in argv]
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if is_secret_name(name):
                if eq:
                    found.append(value)
                elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                    found.append(args[i + 1])
        found.extend(_url_credentials(arg))
        found.extend(_HF_TOKEN.findall(arg))
    for name, value in (environ or {}).items():
        value = str(value)
        if is_secret_name(name):
            found.append(value)
        found.extend(_url_credentials(value))
        found.extend(_HF_TOKEN.findall(value))
    out: list[str] = []
    for value in found:
        value = value.strip()
        if _is_maskable(value) and value not in out:
            out.append(value)
    return out


def _encodings(secret: str) -> set[str]:
    """The spellings of ``secret`` a log, report or message can hold."""
    forms = {
        secret,
        repr(secret)[1:-1],  # Python repr inside quotes: escaped backslashes and quotes
        repr(secret.encode("utf-8", "backslashreplace"))[2:-1],  # bytes repr
        json.dumps(secret)[1:-1],  # JSON string, ASCII-escaped
        json.dumps(secret, ensure_ascii=False)[1:-1],
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote(secret),
        urllib.parse.quote_plus(secret),
        shlex.quote(secret),
        secret.encode("unicode_escape").decode("ascii"),
    }
    # double encodings: a JSON document holding a repr, a URL-encoded JSON value
    forms |= {json.dumps(f)[1:-1] for f in list(forms)}
    return {f for f in forms if len(f) >= MIN_SECRET_LENGTH}


@dataclass(frozen=True)
class Redactor:
    """Masks known secret values (in every encoding, see :func:`_encodings`) and then every pattern
    :func:`redact` knows. Callable ``str -> str``; pure and thread-safe.

    Build it once per job from what the job knows (:meth:`from_sources`) and pass every text shown to people
    through it: printed commands, the live server log, error messages, ``summary.json``, ``items.jsonl``,
    JUnit properties.

    Attributes:
        secrets: the raw secret values (at least :data:`MIN_SECRET_LENGTH` characters each).
        then: another redactor (any ``str -> str``, such as a job's) applied last, or ``None``.
    """

    secrets: tuple[str, ...] = ()
    then: Callable[[str], str] | None = field(default=None, compare=False)
    _pattern: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)
    _forms: tuple[str, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        forms: set[str] = set()
        for secret in self.secrets:
            if _is_maskable(secret):
                forms |= _encodings(secret)
        ordered = tuple(sorted(forms, key=lambda f: (-len(f), f)))  # longest first: no half-masked forms
        object.__setattr__(self, "_forms", ordered)
        if ordered:
            object.__setattr__(self, "_pattern", re.compile("|".join(map(re.escape, ordered))))

    @classmethod
    def from_sources(
        cls,
        *,
        argv: Iterable[str] = (),
        environ: Mapping[str, str] | None = None,
        extra: Iterable[str] = (),
    ) -> Redactor:
        """A redactor for every secret in ``argv`` (the server command line, ``plan.argv``), ``environ``
        (the server's environment: ``os.environ`` merged with ``plan.env``) and ``extra`` (values the caller
        knows otherwise, such as ``mlaprop.args.read_plan(plan).api_key``). See :func:`secrets_in` for what counts."""
        values = secrets_in(argv, environ)
        for value in extra:
            if value and _is_maskable(str(value).strip()) and str(value).strip() not in values:
                values.append(str(value).strip())
        return cls(tuple(values))

    def with_secrets(self, more: Iterable[str]) -> Redactor:
        """This redactor plus the values in ``more``."""
        return Redactor(tuple(dict.fromkeys([*self.secrets, *more])), self.then)

    def followed_by(self, other: Callable[[str], str]) -> Redactor:
        """This redactor, then ``other`` (a :class:`Redactor`'s secrets are merged instead)."""
        if isinstance(other, Redactor):
            merged = self.with_secrets(other.secrets)
            return merged if other.then is None else merged.followed_by(other.then)
        if self.then is None:
            return Redactor(self.secrets, other)
        first = self.then
        return Redactor(self.secrets, lambda text: other(first(text)))

    def mask_values(self, text: str) -> str:
        """``text`` with every known secret value, in every encoding, replaced by ``***`` (no patterns)."""
        if self._pattern is None or not any(f in text for f in self._forms):  # substring tests are cheap
            return text
        return self._pattern.sub(MASK, text)

    def __call__(self, text: str) -> str:
        """``text`` with known secret values and every secret pattern replaced by ``***``."""
        text = redact(self.mask_values(text))
        return text if self.then is None else self.then(text)

    def mask_partial_tail(self, text: str) -> str:
        """``text`` (a line cut short) with a trailing beginning of a known secret masked as well, so a cut
        through the middle of a secret shows none of it (4 characters or more are masked)."""
        for form in self._forms:
            for k in range(len(form) - 1, MIN_SECRET_LENGTH - 1, -1):
                if text.endswith(form[:k]):
                    return text[: len(text) - k] + MASK
        return text

    def lines(self, lines: Iterable[str]) -> Iterator[str]:
        """Streaming filter: each line of ``lines``, redacted (line ends kept)."""
        for line in lines:
            yield self(line)


#: Longest line a :class:`LogFilter` passes on, in bytes; the rest of a longer line is dropped and counted.
MAX_LINE_BYTES = 16 * 1024


class LogFilter:
    """Streaming redaction of a log: :meth:`feed` bytes as they come, get back complete redacted lines.

    Memory is bounded: at most ``max_line`` bytes of an unfinished line are held; the rest of a longer line is
    dropped and the line ends with ``[mlaprop: N bytes cut]``. Invalid UTF-8 becomes U+FFFD. Lines are
    redacted in blocks (one :class:`Redactor` call per :meth:`feed`), which keeps a flood of short lines
    cheap. Not thread-safe (one reader).
    """

    def __init__(self, redactor: Redactor | None = None, max_line: int = MAX_LINE_BYTES) -> None:
        if max_line < 64:
            raise ValueError(f"max_line must be >= 64 bytes, got {max_line}")
        self._redact = redactor or Redactor()
        self._max = max_line
        self._partial = bytearray()
        self._cut = 0  # bytes dropped from the current line
        self.lines_cut = 0  # lines that were cut so far
        self.bytes_cut = 0

    def _finish_cut(self) -> bytes:
        kept = self._partial.decode("utf-8", errors="replace")
        line = self._redact.mask_partial_tail(self._redact(kept)) + f" [mlaprop: {self._cut} bytes cut]\n"
        self.lines_cut += 1
        self.bytes_cut += self._cut
        self._partial.clear()
        self._cut = 0
        return line.encode("utf-8")

    def feed(self, data: bytes) -> bytes:
        """Take the next bytes of the log; return the redacted complete lines they finish (maybe ``b""``)."""
        last_nl = data.rfind(b"\n")
        if last_nl < 0:
            self._append(data)
            return b""
        head, tail = data[: last_nl + 1], data[last_nl + 1 :]
        out: list[bytes] = []
        if (
            not self._partial
            and not self._cut
            and (len(head) <= self._max or max(map(len, head.split(b"\n"))) <= self._max)
        ):
            out.append(self._redact_block(head))  # fast path: whole lines, none too long
        else:
            block: list[bytes] = []
            for piece in head[:-1].split(b"\n"):
                self._append(piece)
                if self._cut:
                    if block:
                        out.append(self._redact_block(b"".join(block)))
                        block = []
                    out.append(self._finish_cut())
                else:
                    block.append(bytes(self._partial) + b"\n")
                    self._partial.clear()
            if block:
                out.append(self._redact_block(b"".join(block)))
        self._append(tail)
        return b"".join(out)

    def _append(self, piece: bytes) -> None:
        room = self._max - len(self._partial)
        if self._cut or len(piece) > room:
            self._partial += piece[: max(room, 0)]
            self._cut += len(piece) - max(room, 0)
        else:
            self._partial += piece

    def _redact_block(self, block: bytes | bytearray) -> bytes:
        return self._redact(bytes(block).decode("utf-8", errors="replace")).encode("utf-8")

    def close(self) -> bytes:
        """The last, unterminated line (redacted, with a newline added), or ``b""``."""
        if self._cut:
            return self._finish_cut()
        if not self._partial:
            return b""
        text = self._partial.decode("utf-8", errors="replace")
        self._partial.clear()
        return (self._redact.mask_partial_tail(self._redact(text)) + "\n").encode("utf-8")
