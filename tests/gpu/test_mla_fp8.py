"""SGLang's MLA FP8 server test, with launch flags composed for the GPU found: ``tox -e gpu-nvidia`` /
``tox -e gpu-amd`` on GPU runners, ``tox -e gpu-nvidia-sim`` / ``gpu-amd-sim`` on CPU (simulated server).

Detect -> preflight (refuse in seconds: wrong vendor, no visible GPU, SGLang missing, model not cached
offline) -> compose -> launch real SGLang -> MGSM-en (gate 0.8) -> determinism check when the plan carries
``--enable-deterministic-inference`` -> report -> teardown (always).

Settings, from environment variables (the tox envs pass them through):

==========================  ======================================================================
``MLAPROP_EXPECT_VENDOR``   ``nvidia`` / ``amd``: the vendor this run is for (set by the tox env)
``MLAPROP_MODEL``           model path or Hugging Face id (default: the upstream test's model)
``MLAPROP_SERVER_ARGS``     extra SGLang server arguments, one shell-quoted string
``MLAPROP_THRESHOLD``       MGSM-en gate (default 0.8)
``MLAPROP_SMOKE``           ``1``: tiny random-weight MLA FP8 model with ``--load-format dummy``; a short
                            MGSM sample is scored and reported, not gated
``MLAPROP_SIMULATE``        ``1``: the simulated SGLang server (CPU only; what CI runs)
``MLAPROP_DATASET``         an MGSM TSV to use instead of the cached download (offline runners)
``MLAPROP_REPORT_DIR``      report folder (default ``mlaprop-report/gpu-<vendor>``)
``MLAPROP_READY_TIMEOUT``   seconds the server may take to become ready (default 600)
==========================  ======================================================================
"""

from __future__ import annotations

import json

import pytest

from mlaprop.environment import LaunchRequest, Vendor
from mlaprop.runner import EXIT_OK, SMOKE_QUESTIONS, EvalOptions, RunOptions, run
from tests.gpu.conftest import GpuConfig

pytestmark = pytest.mark.gpu


def _run_mla_fp8(cfg: GpuConfig, record_property: pytest.RecordProperty) -> None:
    # In smoke mode cfg.model is already the tiny model; the runner's smoke flag only adds its server args.
    request = LaunchRequest(model=cfg.model, extra_args=cfg.server_args)
    code = run(
        RunOptions(
            request=request,
            environment=cfg.environment,
            simulate=cfg.simulate,
            smoke=cfg.smoke,
            ready_timeout_s=cfg.ready_timeout_s,
            preflight=False,  # done by the gpu_config fixture, before anything else
        ),
        EvalOptions(
            dataset=cfg.dataset,
            gate=cfg.threshold,
            limit=SMOKE_QUESTIONS if cfg.smoke else None,
            gated=not cfg.smoke,
            report_dir=cfg.report_dir,
            progress=False,
        ),
    )
    summary_path = cfg.report_dir / "summary.json"
    record_property("report", str(summary_path.resolve()))
    record_property("server_log", str((cfg.report_dir / "server.log").resolve()))
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    print(f"\nreport: {summary_path.resolve()}\nserver log: {(cfg.report_dir / 'server.log').resolve()}")
    print(summary["message"])
    print("timings (s): " + ", ".join(f"{k} {v}" for k, v in summary["timings_s"].items()))

    plan = summary["plan"]
    assert ("--enable-deterministic-inference" in plan["argv"]) is (cfg.vendor is Vendor.NVIDIA), plan["argv"]
    mgsm = summary["mgsm"]
    assert mgsm is not None and mgsm["answered"] > 0, f"no MGSM question was answered: {summary.get('error')}"
    if plan["deterministic"]:
        det = summary["determinism"]
        assert det is not None and det["passed"], f"determinism check failed: {det}"
    if not cfg.smoke:
        gating = mgsm["scores"][mgsm["gating_parser"]]
        assert gating["score"] >= cfg.threshold, f"MGSM-en {gating['text']}; see {summary_path}"
    assert code == EXIT_OK, f"mlaprop run exited {code}: {summary.get('message')}"


@pytest.mark.nvidia
def test_mla_fp8_nvidia(gpu_config: GpuConfig, record_property: pytest.RecordProperty) -> None:
    """On NVIDIA the plan carries the deterministic flag, the server serves the MLA FP8 model, MGSM-en
    reaches the gate, and outputs do not depend on batch composition."""
    _run_mla_fp8(gpu_config, record_property)


@pytest.mark.amd
def test_mla_fp8_amd(gpu_config: GpuConfig, record_property: pytest.RecordProperty) -> None:
    """On AMD/ROCm the plan leaves the deterministic flag out, the server starts on its default MLA backend
    (``aiter`` at tp=1), and MGSM-en reaches the gate."""
    _run_mla_fp8(gpu_config, record_property)
