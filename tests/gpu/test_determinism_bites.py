"""The determinism check can tell (issue 10's H200 proof, kept in ``tox -e gpu-nvidia``): the ``random``
smoke model (real-scale random block-FP8 weights, real weight loading) is served twice through mlaprop's
own launcher, with the composed plan (``--enable-deterministic-inference``) and with ``--no-deterministic``;
the determinism check alone runs against each, and must PASS with the flag and FAIL without it.

Smoke mode only (``MLAPROP_SMOKE=1``): without it the run is about the real model. On the H200 (SGLang
0.5.11) this model's greedy outputs change with the batch without the flag and are bit-identical with it
(README "Running on GPU runners"). With ``MLAPROP_SIMULATE=1`` the simulated server stands in: it varies
overlapped requests' text unless the flag is given, as a batch-dependent server does.

The two servers run one after the other (each torn down before the next starts), so each has the GPU's
memory to itself. Settings as in ``test_mla_fp8.py``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from mlaprop.compose import compose
from mlaprop.determinism import DeterminismResult, check_determinism
from mlaprop.environment import LaunchPlan, LaunchRequest
from mlaprop.report import determinism_status
from mlaprop.runner import SIMSERVER_COMMAND
from mlaprop.server import DEFAULT_COMMAND_PREFIX, launch
from mlaprop.tinymodel import TinyModelError, write_tiny_mla
from tests.gpu.conftest import GpuConfig

pytestmark = [pytest.mark.gpu, pytest.mark.nvidia]


def _check(cfg: GpuConfig, plan: LaunchPlan, log: Path) -> DeterminismResult:
    """Launch ``plan`` (the simulator's own flags added when simulating), run only the determinism check,
    tear the server down."""
    prefix = SIMSERVER_COMMAND if cfg.simulate else DEFAULT_COMMAND_PREFIX
    extra: list[str] = []
    if cfg.simulate:
        extra = [
            "--sim-platform",
            "cuda",
            "--sim-arch",
            cfg.environment.arch or "sm90",
            "--sim-sglang-version",
            cfg.environment.sglang_version,
            "--sim-latency",
            "0.02",  # requests overlap, as on a real server
        ]
    with launch(
        plan, command_prefix=prefix, extra_args=extra, log_path=log, ready_timeout=cfg.ready_timeout_s
    ) as server:
        return check_determinism(server.base_url, is_alive=server.alive)


def test_determinism_check_bites(gpu_config: GpuConfig, tmp_path: Path) -> None:
    """On the ``random`` smoke model the check PASSes with ``--enable-deterministic-inference`` and FAILs
    without it: the flag is what makes outputs batch-invariant, and the check sees the difference."""
    cfg = gpu_config
    if not cfg.smoke:
        pytest.skip("smoke mode only (MLAPROP_SMOKE=1): it serves the random smoke model")
    try:  # the simulator reads no weights: the dummy folder stands in
        model = write_tiny_mla(tmp_path / "random", weights="dummy" if cfg.simulate else "random")
    except TinyModelError as exc:
        pytest.fail(f"TinyModelError: {exc}", pytrace=False)
    request = LaunchRequest(model=str(model), extra_args=cfg.server_args, tp_size=cfg.tp)
    with_flag = compose(cfg.environment, request)
    without = compose(cfg.environment, replace(request, deterministic=False))
    assert with_flag.deterministic and "--enable-deterministic-inference" in with_flag.argv, with_flag.argv
    assert not without.deterministic and "--enable-deterministic-inference" not in without.argv, without.argv

    on = _check(cfg, with_flag, tmp_path / "server-deterministic.log")
    print(f"\nwith --enable-deterministic-inference: {on.reason}")
    off = _check(cfg, without, tmp_path / "server-no-deterministic.log")
    print(f"without it (--no-deterministic): {off.reason}")

    assert determinism_status(on) == "pass", f"with the flag the check must pass: {on.reason}"
    assert determinism_status(off) == "fail", (
        f"without the flag the check must find batch dependence on the random model: {off.reason}"
    )
