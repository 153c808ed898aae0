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
``MLAPROP_THRESHOLD``       MGSM-en gate (default 0.8; 0.98 for the canary in smoke mode)
``MLAPROP_SMOKE``           ``1``: a tiny MLA FP8 model instead (``MLAPROP_SMOKE_MODEL``)
``MLAPROP_SMOKE_MODEL``     ``canary`` (default: trained to answer MGSM-en, built on this GPU or cached,
                            real weight loading, gated over all 250 questions), ``random`` (real-scale
                            random weights; 16 questions, not gated) or ``dummy`` (``--load-format
                            dummy``; 16 questions, not gated). The simulated server stands in for all
                            three (it reads no weights; the canary's stand-in answers every question)
``MLAPROP_SIMULATE``        ``1``: the simulated SGLang server (CPU only; what CI runs)
``MLAPROP_DATASET``         an MGSM TSV to use instead of the cached download (offline runners)
``MLAPROP_REPORT_DIR``      report folder (default ``mlaprop-report/gpu-<vendor>``)
``MLAPROP_READY_TIMEOUT``   seconds the server may take to become ready (default 600)
``MLAPROP_TP``              tensor parallel size (default 1); composed like ``mlaprop compose --tp N``,
                            so a tp that does not divide the model's 16 heads (3) or exceeds the
                            visible GPUs is refused before any launch
==========================  ======================================================================

With Hugging Face offline mode on (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``, read as
``huggingface_hub`` reads them) the MGSM file is never downloaded: set ``MLAPROP_DATASET`` or fill the cache.

What a CI job sees: the JUnit XML (``--junitxml``) gets the run's verdict, score, interval, n, minimum
detectable drop, backend, deterministic flag, SGLang version and GPU as properties
(:func:`mlaprop.cireport.junit_properties`); with ``GITHUB_STEP_SUMMARY`` set, a Markdown summary is
appended there; every failure names its cause on its first line.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from mlaprop.cireport import append_step_summary, junit_properties
from mlaprop.environment import LaunchRequest, Vendor
from mlaprop.runner import EXIT_OK, SMOKE_QUESTIONS, EvalOptions, RunOptions, run
from tests.gpu.conftest import GpuConfig

pytestmark = pytest.mark.gpu


def _read_summary(cfg: GpuConfig) -> dict[str, Any]:
    path = cfg.report_dir / "summary.json"
    problem = None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        data, problem = None, f"{type(exc).__name__}: {exc}"
    if not isinstance(data, dict):  # failed outside the except block: the cause stays the first line
        pytest.fail(
            f"no readable summary.json: {path} ({problem or 'not a JSON object'}); the run stopped before "
            "writing it",
            pytrace=False,
        )
    return data


def _cause(summary: dict[str, Any]) -> str | None:
    """The first line of a run that did not finish (dataset, compose, launch, eval or teardown error)."""
    error = summary.get("error")
    if not isinstance(error, dict):
        return None
    message = str(error.get("message") or "").strip()
    first = message.splitlines()[0] if message else ""
    hint = ""
    if error.get("stage") == "dataset":
        hint = "; set MLAPROP_DATASET to an MGSM TSV (offline runners), or fill the mlaprop cache"
    return f"{error.get('type', 'Error')} at the {error.get('stage', '?')} stage: {first.rstrip('.')}{hint}"


def _run_mla_fp8(cfg: GpuConfig, record_property: pytest.RecordProperty) -> None:
    # In smoke mode cfg.model is already the tiny model; the runner's smoke flag only adds its server args.
    request = LaunchRequest(model=cfg.model, extra_args=cfg.server_args, tp_size=cfg.tp)
    code = run(
        RunOptions(
            request=request,
            environment=cfg.environment,
            simulate=cfg.simulate,
            # the simulated server stands in for the canary, which answers every question
            sim_accuracy=1.0 if cfg.smoke and cfg.gated else 0.9,
            smoke=cfg.smoke,
            smoke_model=cfg.smoke_model,
            ready_timeout_s=cfg.ready_timeout_s,
            preflight=False,  # done by the gpu_config fixture, before anything else
        ),
        EvalOptions(
            dataset=cfg.dataset,
            offline=cfg.offline,
            gate=cfg.threshold,
            limit=None if cfg.gated else SMOKE_QUESTIONS,
            gated=cfg.gated,
            report_dir=cfg.report_dir,
            progress=False,
        ),
    )
    summary_path = cfg.report_dir / "summary.json"
    record_property("report", str(summary_path.resolve()))
    record_property("server_log", str((cfg.report_dir / "server.log").resolve()))
    summary = _read_summary(cfg)
    for name, value in junit_properties(summary):
        record_property(name, value)
    try:
        append_step_summary(summary)
    except OSError as exc:
        print(f"note: could not append to GITHUB_STEP_SUMMARY ({exc})")
    print(f"\nreport: {summary_path.resolve()}\nserver log: {(cfg.report_dir / 'server.log').resolve()}")
    print(summary.get("message"))
    print("timings (s): " + ", ".join(f"{k} {v}" for k, v in (summary.get("timings_s") or {}).items()))

    cause = _cause(summary)
    if cause is not None:
        pytest.fail(cause, pytrace=False)
    plan = summary.get("plan")
    assert isinstance(plan, dict), f"no plan in {summary_path}: {summary.get('message')}"
    assert ("--enable-deterministic-inference" in plan["argv"]) is (cfg.vendor is Vendor.NVIDIA), plan["argv"]
    mgsm = summary.get("mgsm")
    assert mgsm is not None and mgsm["answered"] > 0, (
        f"no MGSM question was answered: {summary.get('message')}"
    )
    if plan["deterministic"]:
        det = summary.get("determinism")
        assert det is not None and det["passed"], f"determinism check failed: {(det or {}).get('reason')}"
    if cfg.smoke:
        smoke = summary.get("smoke") or {}
        assert smoke.get("model") == cfg.smoke_model.value, smoke
        if cfg.gated and not cfg.simulate:  # the canary on a real server: compared with its reference
            ref = smoke.get("reference")
            assert ref is not None and ref["total"] == mgsm["answered"], smoke
            print(f"canary vs reference: {ref['same_answer']}/{ref['total']} answers agree")
    if cfg.gated:
        gating = mgsm["scores"][mgsm["gating_parser"]]
        assert gating["score"] >= cfg.threshold, (
            f"MGSM-en below the gate: {gating['text']}; see {summary_path}"
        )
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
