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
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

__all__ = ["MASK", "is_secret_name", "redact", "redact_argv", "redact_env"]

#: What a secret value is replaced by.
MASK = "***"

_SECRET_NAMES = frozenset({"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "API_KEY", "TOKEN", "SECRET", "PASSWORD"})
#: Secret flags of ``sglang.launch_server``; argparse also accepts any unique prefix of them (``--api-ke``).
_SECRET_FLAGS = ("--api-key", "--admin-api-key", "--hf-token")
_SECRET_SUFFIXES = ("_API_KEY", "_TOKEN", "_SECRET", "_PASSWORD")

# A secret-named key, as an env var, a flag (dashes) or a Python attribute, optionally quoted, then
# "=" or ":" and the value (optionally quoted). The value stops at whitespace, a quote, a comma or a bracket.
_NAME = r"[A-Za-z0-9_-]*(?:api[_-]key|[_-]token|[_-]secret|[_-]password)|hf_token|token|secret|password"
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
    if key in _SECRET_NAMES or key.endswith(_SECRET_SUFFIXES):
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


def redact(text: str) -> str:
    """``text`` with every secret value (see the module docstring) replaced by ``***``."""
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
