"""Shared set-up of the GPU tests: settings from the environment, and the preflight that refuses a wrong
setup in seconds, before any launch (a skip would be a green run that tested nothing)."""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import pytest

from mlaprop import options
from mlaprop.canary import CanaryError
from mlaprop.ci import envbool
from mlaprop.detect import detect_environment
from mlaprop.environment import DEFAULT_MODEL, Environment, InvalidEnvironment, Vendor
from mlaprop.options import CANARY_GATE, SMOKE_MODEL_VARIABLE, SmokeModel, smoke_model
from mlaprop.preflight import PreflightError, hf_offline, preflight

T = TypeVar("T")


@dataclass(frozen=True)
class GpuConfig:
    """One GPU run's settings (see ``test_mla_fp8.py`` for the variables) and its detected environment."""

    vendor: Vendor
    environment: Environment
    model: str
    server_args: tuple[str, ...]
    threshold: float
    smoke: bool
    simulate: bool
    dataset: str | None
    report_dir: Path
    ready_timeout_s: float
    tp: int = 1
    offline: bool = False
    smoke_model: SmokeModel = SmokeModel.CANARY

    @property
    def gated(self) -> bool:
        """The MGSM score gates: always on the real model; in smoke mode only on the canary."""
        return not self.smoke or self.smoke_model.gated


def _env_number(name: str, value: str | None, default: T, check: Callable[[object], T], form: str) -> T:
    """``value`` of the variable ``name`` read by ``check`` (one of :mod:`mlaprop.options`' validators, the
    same rules as the CLI's flags); ``default`` when unset or empty; a set-up failure naming it otherwise."""
    if value is None or value == "":
        return default
    try:
        return check(value)
    except ValueError:
        pytest.fail(f"{name}={value!r} is not {form}", pytrace=False)


def _positive_int(name: str, value: str | None, default: int) -> int:
    return _env_number(name, value, default, options.positive_int, f"a whole number >= 1 (e.g. {name}=2)")


def _fraction(name: str, value: str | None, default: float) -> float:
    return _env_number(name, value, default, options.fraction, f"a score between 0 and 1 (e.g. {name}=0.8)")


def _positive_float(name: str, value: str | None, default: float) -> float:
    return _env_number(name, value, default, options.positive_seconds, "a number > 0")


def smoke_model_folder(choice: SmokeModel, simulate: bool, dataset: str | None, tmp_path: Path) -> Path:
    """The smoke model's folder: the canary (cached, or trained now on this GPU; a missing torch or GPU
    fails the test with the fix), real-scale random weights, or the dummy folder. The simulated server reads
    no weights, so there the dummy folder stands in for every choice."""
    from mlaprop.tinymodel import TinyModelError, write_tiny_mla

    try:
        if simulate or choice is SmokeModel.DUMMY:
            return write_tiny_mla(tmp_path / "tiny-mla-fp8")
        if choice is SmokeModel.RANDOM:
            return write_tiny_mla(tmp_path / "tiny-mla-fp8-random", weights="random")
        from mlaprop.canary import ensure_canary

        return ensure_canary(dataset, log=lambda line: print(f"canary: {line}", flush=True))
    except (CanaryError, TinyModelError) as exc:
        pytest.fail(
            f"{type(exc).__name__}: {exc} (or pick another smoke model: {SMOKE_MODEL_VARIABLE}=random|dummy)",
            pytrace=False,
        )


@pytest.fixture
def gpu_config(request: pytest.FixtureRequest, tmp_path: Path) -> GpuConfig:
    """Settings for this test's vendor (its ``nvidia`` / ``amd`` marker), after the preflight passed.

    In smoke mode the model is the smoke model (``MLAPROP_SMOKE_MODEL``, default the canary, gated at 0.98;
    :func:`smoke_model_folder`). Every refusal fails the
    test with its cause on the first line (``PreflightError: wrong GPU vendor ...``), never a traceback."""
    vendor = Vendor.NVIDIA if request.node.get_closest_marker("nvidia") else Vendor.AMD
    env = os.environ
    expect = env.get("MLAPROP_EXPECT_VENDOR")
    if expect and expect != vendor.value:
        pytest.fail(
            f"MLAPROP_EXPECT_VENDOR={expect} but this is the {vendor.value} test: run `tox -e gpu-{expect}`, "
            f"which selects -m 'gpu and {expect}'"
        )
    smoke = envbool(env.get("MLAPROP_SMOKE"))
    simulate = envbool(env.get("MLAPROP_SIMULATE"))
    tp = _positive_int("MLAPROP_TP", env.get("MLAPROP_TP"), 1)
    try:
        choice = smoke_model(env.get(SMOKE_MODEL_VARIABLE) or SmokeModel.CANARY.value)
    except ValueError as exc:
        pytest.fail(f"{SMOKE_MODEL_VARIABLE}: {exc}", pytrace=False)
    default_gate = CANARY_GATE if smoke and choice is SmokeModel.CANARY else 0.8
    threshold = _fraction("MLAPROP_THRESHOLD", env.get("MLAPROP_THRESHOLD"), default_gate)
    ready_timeout_s = _positive_float("MLAPROP_READY_TIMEOUT", env.get("MLAPROP_READY_TIMEOUT"), 600.0)
    try:
        server_args = tuple(shlex.split(env.get("MLAPROP_SERVER_ARGS", "")))
    except ValueError as exc:
        pytest.fail(
            f"MLAPROP_SERVER_ARGS is not valid shell quoting ({exc}): close every quote", pytrace=False
        )
    model = env.get("MLAPROP_MODEL") or DEFAULT_MODEL
    if smoke:
        model = str(smoke_model_folder(choice, simulate, env.get("MLAPROP_DATASET") or None, tmp_path))
    try:
        environment = detect_environment(hardware_speaks=not simulate)  # an override never hides ROCm
        if simulate and tp > environment.gpu_count:
            # the simulated platform has as many GPUs as the plan asks for (as `mlaprop compose --tp N`
            # previews); real runs keep the detected count, so compose refuses a tp above it
            environment = replace(environment, gpu_count=tp)
        preflight(environment, expect=vendor, model=model, need_sglang=not simulate, environ=env)
    except (PreflightError, InvalidEnvironment) as exc:
        pytest.fail(f"{type(exc).__name__}: {exc}", pytrace=False)
    offline, _ = hf_offline(env)
    return GpuConfig(
        vendor=vendor,
        environment=environment,
        model=model,
        server_args=server_args,
        threshold=threshold,
        smoke=smoke,
        simulate=simulate,
        dataset=env.get("MLAPROP_DATASET") or None,
        report_dir=Path(env.get("MLAPROP_REPORT_DIR") or f"mlaprop-report/gpu-{vendor.value}"),
        ready_timeout_s=ready_timeout_s,
        tp=tp,
        offline=offline,
        smoke_model=choice,
    )
