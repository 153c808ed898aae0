"""The seed failure, on the server mlaprop launches: deterministic inference with the ``aiter`` attention
backend. ``compose`` refuses to build such a plan; given to the launcher as a raw argv, SGLang itself exits
with its deterministic-backend ``ValueError`` and the launcher reports it within a second of the exit.

Runs in ``tox -e gpu-nvidia`` against real SGLang (any version rejects ``aiter`` with the flag) and in
``tox -e gpu-nvidia-sim`` against the simulated server. Settings as in ``test_mla_fp8.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from mlaprop.compose import UnsupportedCombination, compose
from mlaprop.environment import AttentionBackend, LaunchPlan, LaunchRequest
from mlaprop.runner import SIMSERVER_COMMAND, SMOKE_SERVER_ARGS
from mlaprop.server import DEFAULT_COMMAND_PREFIX, ServerExited, launch
from tests.gpu.conftest import GpuConfig

pytestmark = [pytest.mark.gpu, pytest.mark.nvidia]


#: Runs the server command, then writes the wall-clock time of its exit to the file named by the
#: environment variable before exiting with its exit code: the reference for how fast the launcher reports.
_EXIT_STAMP_SHIM = """
import os, subprocess, sys, time
code = subprocess.call(sys.argv[1:])
with open(os.environ["MLAPROP_TEST_EXIT_STAMP"], "w") as f:
    f.write(repr(time.time()))
sys.exit(code)
"""


RAW_ARGV = (
    "--trust-remote-code",
    "--kv-cache-dtype",
    "fp8_e5m2",
    "--attention-backend",
    "aiter",
    "--enable-deterministic-inference",
)


def test_aiter_with_deterministic_is_refused_by_compose_and_by_sglang(
    gpu_config: GpuConfig, tmp_path: Path
) -> None:
    """``compose`` refuses ``aiter`` + deterministic naming the allow-list; the same flags as a raw argv make
    SGLang exit 1 with ``ValueError: Currently only [...]``, reported by the launcher as ``ServerExited``
    within a second of the server's exit, with nothing left running."""
    cfg = gpu_config
    env, model = cfg.environment, cfg.model
    with pytest.raises(UnsupportedCombination) as refused:
        compose(env, LaunchRequest(model=model, attention_backend=AttentionBackend.AITER))
    assert "attention backend aiter cannot be used with deterministic inference" in str(refused.value)
    assert "triton" in str(refused.value)

    extra = cfg.server_args
    if cfg.smoke:
        extra = (*SMOKE_SERVER_ARGS, *extra)
    raw = LaunchPlan(
        argv=(*RAW_ARGV, *extra),
        env={},
        attention_backend=AttentionBackend.AITER,
        deterministic=True,
        decisions=(),
        model=model,
        sglang_version=env.sglang_version,
    )
    log = tmp_path / "seed-failure.log"
    prefix = SIMSERVER_COMMAND if cfg.simulate else DEFAULT_COMMAND_PREFIX
    shim = tmp_path / "exit_stamp.py"
    shim.write_text(_EXIT_STAMP_SHIM)
    stamp = tmp_path / "exit-stamp"
    started = time.time()
    with (
        pytest.raises(ServerExited) as exited,
        launch(
            raw,
            command_prefix=(sys.executable, str(shim), *prefix),
            env={"MLAPROP_TEST_EXIT_STAMP": str(stamp)},
            log_path=log,
            ready_timeout=600,
            grace=10,
        ),
    ):
        pytest.fail("the server became ready with aiter + deterministic inference")
    reported_at = time.time()
    err = exited.value
    exited_at = float(stamp.read_text())
    exit_to_error = reported_at - exited_at
    print(
        f"\nseed failure: exit code {err.returncode} after {exited_at - started:.1f} s; reported "
        f"{exit_to_error:.3f} s after the server exited\n{err.headline}\nlog tail:\n"
        + "\n".join(err.log_tail[-5:]),
        file=sys.stderr,
    )
    assert err.returncode == 1
    tail = "\n".join(err.log_tail)
    assert "ValueError: Currently only" in tail
    assert "attention backends are supported for deterministic inference" in tail
    assert "'aiter'" in tail
    assert exit_to_error < 1.0
