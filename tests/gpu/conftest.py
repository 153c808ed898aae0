"""Shared set-up of the GPU tests: settings from the environment, and the preflight that refuses a wrong
setup in seconds, before any launch (a skip would be a green run that tested nothing)."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlaprop.ci import envbool
from mlaprop.detect import detect_environment
from mlaprop.environment import DEFAULT_MODEL, Environment, Vendor
from mlaprop.preflight import preflight


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


@pytest.fixture
def gpu_config(request: pytest.FixtureRequest, tmp_path: Path) -> GpuConfig:
    """Settings for this test's vendor (its ``nvidia`` / ``amd`` marker), after the preflight passed.

    In smoke mode the model is the tiny MLA FP8 model written under ``tmp_path``."""
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
    model = env.get("MLAPROP_MODEL") or DEFAULT_MODEL
    if smoke:
        from mlaprop.tinymodel import write_tiny_mla

        model = str(write_tiny_mla(tmp_path / "tiny-mla-fp8"))
    environment = detect_environment()
    preflight(environment, expect=vendor, model=model, need_sglang=not simulate, environ=env)
    return GpuConfig(
        vendor=vendor,
        environment=environment,
        model=model,
        server_args=tuple(shlex.split(env.get("MLAPROP_SERVER_ARGS", ""))),
        threshold=float(env.get("MLAPROP_THRESHOLD") or 0.8),
        smoke=smoke,
        simulate=simulate,
        dataset=env.get("MLAPROP_DATASET") or None,
        report_dir=Path(env.get("MLAPROP_REPORT_DIR") or f"mlaprop-report/gpu-{vendor.value}"),
        ready_timeout_s=float(env.get("MLAPROP_READY_TIMEOUT") or 600),
    )
