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
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlaprop.ci import envbool
from mlaprop.detect import detect_environment
from mlaprop.environment import DEFAULT_MODEL, LaunchRequest, Vendor
from mlaprop.preflight import preflight
from mlaprop.runner import EXIT_OK, SMOKE_QUESTIONS, EvalOptions, RunOptions, run

pytestmark = pytest.mark.gpu


@dataclass(frozen=True)
class GpuConfig:
    """This run's settings, read from the environment."""

    model: str
    server_args: tuple[str, ...]
    threshold: float
    smoke: bool
    simulate: bool
    dataset: str | None
    report_dir: Path
    ready_timeout_s: float

    @classmethod
    def from_environ(cls, vendor: Vendor) -> GpuConfig:
        env = os.environ
        return cls(
            model=env.get("MLAPROP_MODEL") or DEFAULT_MODEL,
            server_args=tuple(shlex.split(env.get("MLAPROP_SERVER_ARGS", ""))),
            threshold=float(env.get("MLAPROP_THRESHOLD") or 0.8),
            smoke=envbool(env.get("MLAPROP_SMOKE")),
            simulate=envbool(env.get("MLAPROP_SIMULATE")),
            dataset=env.get("MLAPROP_DATASET") or None,
            report_dir=Path(env.get("MLAPROP_REPORT_DIR") or f"mlaprop-report/gpu-{vendor.value}"),
            ready_timeout_s=float(env.get("MLAPROP_READY_TIMEOUT") or 600),
        )


def _run_mla_fp8(vendor: Vendor, record_property: pytest.RecordProperty) -> None:
    cfg = GpuConfig.from_environ(vendor)
    expect = os.environ.get("MLAPROP_EXPECT_VENDOR")
    if expect and expect != vendor.value:
        pytest.fail(
            f"MLAPROP_EXPECT_VENDOR={expect} but this is the {vendor.value} test: run `tox -e gpu-{expect}`, "
            f"which selects -m '{expect}'"
        )
    env = detect_environment()
    # Refuse within seconds, before any launch: a skip here would be a green run that tested nothing.
    preflight(env, expect=vendor, model=cfg.model, need_sglang=not cfg.simulate, environ=os.environ)
    request = LaunchRequest(model=cfg.model, extra_args=cfg.server_args)
    code = run(
        RunOptions(
            request=request,
            environment=env,
            simulate=cfg.simulate,
            smoke=cfg.smoke,
            ready_timeout_s=cfg.ready_timeout_s,
            preflight=False,
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
    assert ("--enable-deterministic-inference" in plan["argv"]) is (vendor is Vendor.NVIDIA), plan["argv"]
    mgsm = summary["mgsm"]
    assert mgsm is not None and mgsm["answered"] > 0, f"no MGSM question was answered: {summary.get('error')}"
    if plan["deterministic"]:
        det = summary["determinism"]
        assert det is not None and det["passed"], f"determinism check failed: {det}"
    if not cfg.smoke:
        gating = mgsm["scores"][mgsm["gating_parser"]]
        assert gating["score"] >= cfg.threshold, f"MGSM-en {gating['text']}; see {summary_path}"
    assert code == EXIT_OK, f"mlaprop run exited {code}: {summary.get('verdict') or summary.get('error')}"


@pytest.mark.nvidia
def test_mla_fp8_nvidia(record_property: pytest.RecordProperty) -> None:
    """On NVIDIA the plan carries the deterministic flag, the server serves the MLA FP8 model, MGSM-en
    reaches the gate, and outputs do not depend on batch composition."""
    _run_mla_fp8(Vendor.NVIDIA, record_property)


@pytest.mark.amd
def test_mla_fp8_amd(record_property: pytest.RecordProperty) -> None:
    """On AMD/ROCm the plan leaves the deterministic flag out, the server starts on its default MLA backend
    (``aiter`` at tp=1), and MGSM-en reaches the gate."""
    _run_mla_fp8(Vendor.AMD, record_property)
