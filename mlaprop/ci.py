"""SGLang's CI environment variables, parsed the two ways SGLang parses them. Pure.

SGLang reads ``SGLANG_IS_IN_CI_AMD`` twice, differently:

- ``sglang/test/test_utils.py`` ``is_in_amd_ci()``: true when the lower-cased value is ``"true"`` or ``"1"``,
  false for everything else (the MLA FP8 test uses this one to leave the deterministic flag out);
- ``sglang/srt/environ.py`` ``EnvBool`` (behind ``sglang.utils.is_in_ci``): true for ``true/1/yes/y``,
  false for ``false/0/no/n`` (lower-cased, not stripped), anything else warns and falls back to the
  default (false).

So ``SGLANG_IS_IN_CI_AMD=yes`` is false to the test file and true to the launcher. mlaprop treats the
variable as an AMD signal when either parser says true, and reports the disagreement.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlaprop.environment import CIMarkers

__all__ = ["MarkerReading", "envbool", "is_in_amd_ci_test_utils", "read_amd_marker"]

_ENVBOOL_TRUE = frozenset({"true", "1", "yes", "y"})
_ENVBOOL_FALSE = frozenset({"false", "0", "no", "n"})


def is_in_amd_ci_test_utils(value: str | None) -> bool:
    """``sglang.test.test_utils.is_in_amd_ci`` for a raw value (``None`` = unset): ``"true"``/``"1"``,
    case-insensitive, and nothing else. Surrounding whitespace is not stripped (SGLang does not strip)."""
    return value is not None and value.lower() in ("true", "1")


def envbool(value: str | None, default: bool = False) -> bool:
    """SGLang's ``EnvBool`` for a raw value: ``true/1/yes/y`` -> True, ``false/0/no/n`` -> False
    (case-insensitive; surrounding whitespace is not stripped, so ``" 1"`` is unrecognised), unset or anything
    else -> ``default``."""
    if value is None:
        return default
    v = value.lower()
    if v in _ENVBOOL_TRUE:
        return True
    if v in _ENVBOOL_FALSE:
        return False
    return default


@dataclass(frozen=True)
class MarkerReading:
    """How SGLang reads ``SGLANG_IS_IN_CI_AMD``.

    Attributes:
        raw: the raw value, ``None`` when unset.
        test_utils: what ``is_in_amd_ci()`` (the MLA FP8 test) returns.
        envbool: what ``EnvBool`` (the launcher side) returns.
    """

    raw: str | None
    test_utils: bool
    envbool: bool

    @property
    def is_amd_signal(self) -> bool:
        """Either parser says AMD CI: mlaprop keeps the deterministic flag away."""
        return self.test_utils or self.envbool

    @property
    def parsers_disagree(self) -> bool:
        """The two SGLang parsers give different answers for this value (``"yes"``, ``"y"``)."""
        return self.test_utils != self.envbool

    @property
    def unrecognised(self) -> bool:
        """Set, but neither a true nor a false spelling for ``EnvBool`` (SGLang warns and uses false)."""
        return self.raw is not None and self.raw.lower() not in _ENVBOOL_TRUE | _ENVBOOL_FALSE


def read_amd_marker(ci: CIMarkers) -> MarkerReading:
    """Read ``SGLANG_IS_IN_CI_AMD`` from raw CI markers both ways."""
    raw = ci.sglang_is_in_ci_amd
    return MarkerReading(raw=raw, test_utils=is_in_amd_ci_test_utils(raw), envbool=envbool(raw))
