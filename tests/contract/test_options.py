"""Contract tests for the shipped option tables (``mlaprop/data/sglang_options.json``) and for extra
arguments drawn from them: the installed SGLang's own parser is the reference.

Run by ``tox -e contract`` for every claimed SGLang release (``tests/contract/run_versions.py``).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mlaprop.compose import UnsupportedCombination, compose
from mlaprop.environment import Environment, InvalidEnvironment, LaunchRequest, Vendor
from tests import strategies as S
from tests.contract.contract import Kind, check, naive_argv
from tests.contract.sglang_sim import SGLang

pytestmark = pytest.mark.contract

REPO = Path(__file__).resolve().parents[2]


def _extractor() -> ModuleType:
    spec = importlib.util.spec_from_file_location("extract_options", REPO / "tools" / "extract_options.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _diff(shipped: dict[str, Any], live: dict[str, Any]) -> list[str]:
    ours = {tuple(o["strings"]): o for o in shipped["options"]}
    theirs = {tuple(o["strings"]): o for o in live["options"]}
    out = [f"missing from the shipped table: {k}" for k in sorted(set(theirs) - set(ours))]
    out += [f"not in SGLang's parser: {k}" for k in sorted(set(ours) - set(theirs))]
    out += [
        f"differs: {theirs[k]} (shipped {ours[k]})"
        for k in sorted(set(ours) & set(theirs))
        if ours[k] != theirs[k]
    ]
    for key in ("allow_abbrev", "implies_deterministic"):
        if shipped.get(key) != live.get(key):
            out.append(f"{key}: SGLang {live.get(key)}, shipped {shipped.get(key)}")
    return out


def test_shipped_option_table_is_sglangs(sglang: SGLang) -> None:
    """The table mlaprop ships for this version equals the one extracted from the installed SGLang's real
    parser (imported with its real dependencies): options, actions, nargs, kept choices, abbreviations and
    the options implying deterministic inference."""
    live = _extractor().extract_installed()
    data = json.loads((REPO / "mlaprop" / "data" / "sglang_options.json").read_text())
    assert sglang.version in data, (
        f"no option table for SGLang {sglang.version}: run python tools/extract_options.py --wheels DIR "
        f"--versions {sglang.version}"
    )
    problems = _diff(data[sglang.version], live)
    assert not problems, (
        f"mlaprop/data/sglang_options.json differs from SGLang {sglang.version}'s parser; regenerate it with "
        "tools/extract_options.py:\n" + "\n".join(problems[:20])
    )


_PLATFORMS = (
    Environment(vendor=Vendor.NVIDIA, arch="sm90", gpu_count=8, cuda_version="12.8"),
    Environment(vendor=Vendor.NVIDIA, arch="sm100", gpu_count=8, cuda_version="12.8"),
    Environment(vendor=Vendor.NVIDIA, arch="sm80", gpu_count=8, cuda_version="12.8"),
    Environment(vendor=Vendor.AMD, arch="gfx942", gpu_count=8, torch_hip=True, cuda_version=None),
)
_STEERING = (
    "--enable-deterministic-inference",
    "--rl-on-policy-target",
    "--attention-backend",
    "--kv-cache-dtype",
    "--tp-size",
    "--disable-custom-all-reduce",
    "--mem-fraction-static",
    "--disable-radix-cache",
)


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_drawn_extra_arguments_agree_with_sglang(sglang: SGLang, data: st.DataObject) -> None:
    """Extra arguments drawn from this version's real option table (abbreviations and ``=`` forms included):
    mlaprop's verdict (refused, or a plan with the predicted backend and deterministic on/off) equals
    SGLang's own pipeline's."""
    env = replace(data.draw(st.sampled_from(_PLATFORMS), label="platform"), sglang_version=sglang.version)
    extra = data.draw(S.sglang_argv(sglang.version, _STEERING, max_options=3), label="extra")
    request = LaunchRequest(extra_args=extra)
    try:
        compose(env, request)
    except InvalidEnvironment as exc:
        # mlaprop's reading refused the argv: SGLang's parser must too (or it is a tp/backend value mlaprop
        # does not model, which SGLang's parser accepts but its server cannot start with)
        event("InvalidEnvironment")
        complaint = sglang.parse(naive_argv(request))
        assert complaint is not None or "tp-size" in str(exc) or "unknown attention backend" in str(exc), (
            f"mlaprop refuses {list(extra)} ({exc}) but SGLang {sglang.version}'s parser accepts it"
        )
        if "parser refuses" in str(exc):
            event("both parsers refuse")
        return
    except UnsupportedCombination:
        pass
    verdict = check(sglang, env, request)
    event(verdict.kind.value)
    assert verdict.kind is not Kind.MISMATCH, str(verdict)
