"""The GPU test file from a CI job's view (issue 13, and issue 16's tp setting): ``tests/gpu`` run as the
``gpu-*-sim`` tox envs run it (a pytest subprocess against the simulated server, on the CPU), checking what a
job shows: the JUnit XML properties, the ``GITHUB_STEP_SUMMARY`` file, and a failure whose first line names
its cause (tp=3 refused before launch, an offline runner without ``MLAPROP_DATASET``, a missed gate, a bad
setting)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlaprop.stats import minimum_detectable_drop
from tests.conftest import shared_dir

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Outcome:
    code: int
    output: str
    junit: ET.Element
    step_summary: str | None
    report: Path

    def testcase(self, name: str) -> ET.Element:
        (case,) = [c for c in self.junit.iter("testcase") if c.get("name") == name]
        return case

    def properties(self, name: str) -> dict[str, str]:
        return {p.get("name", ""): p.get("value", "") for p in self.testcase(name).iter("property")}

    def failure_message(self, name: str) -> str:
        case = self.testcase(name)
        failed = case.find("failure")
        if failed is None:
            failed = case.find("error")
        assert failed is not None, f"{name} did not fail:\n{self.output}"
        return failed.get("message", "")


def _gpu_sim(vendor: str, arch: str, extra: dict[str, str], base: Path, name: str) -> Outcome:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLAPROP_", "SGLANG_", "HF_", "GITHUB_"))}
    env.update(
        {
            "MLAPROP_SIMULATE": "1",
            "MLAPROP_DATASET": str(shared_dir() / "data" / "mgsm" / "mgsm_en.tsv"),
            "MLAPROP_EXPECT_VENDOR": vendor,
            "MLAPROP_VENDOR": vendor,
            "MLAPROP_ARCH": arch,
            "MLAPROP_REPORT_DIR": str(base / name / "report"),
            "GITHUB_STEP_SUMMARY": str(base / name / "step-summary.md"),
            "XDG_CACHE_HOME": str(base / name / "cache"),  # an empty mlaprop cache
            "COLUMNS": "400",
        }
    )
    env.update(extra)
    env = {k: v for k, v in env.items() if v != "<unset>"}
    junit = base / name / "junit.xml"
    (base / name).mkdir(parents=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/gpu/test_mla_fp8.py", "-m", f"gpu and {vendor}",
         "-p", "no:cacheprovider", "-rA", f"--junitxml={junit}", "-o", "junit_family=xunit1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    summary = base / name / "step-summary.md"
    return Outcome(
        code=proc.returncode,
        output=proc.stdout + proc.stderr,
        junit=ET.parse(junit).getroot(),
        step_summary=summary.read_text(encoding="utf-8") if summary.exists() else None,
        report=base / name / "report",
    )


CASES: dict[str, tuple[str, str, dict[str, str]]] = {
    # dummy smoke model: 16 questions, not gated
    "nvidia-tp2": (
        "nvidia",
        "sm90",
        {"MLAPROP_TP": "2", "MLAPROP_SMOKE": "1", "MLAPROP_SMOKE_MODEL": "dummy"},
    ),
    "nvidia-tp3": ("nvidia", "sm90", {"MLAPROP_TP": "3"}),
    "amd-missed-gate": ("amd", "gfx942", {"MLAPROP_THRESHOLD": "0.95"}),
    "offline-no-dataset": ("nvidia", "sm90", {"MLAPROP_DATASET": "<unset>", "HF_HUB_OFFLINE": "ON"}),
    "bad-tp": ("nvidia", "sm90", {"MLAPROP_TP": "two"}),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Every case's run, started together (each is a separate pytest process with its own simulated server)."""
    base = tmp_path_factory.mktemp("ci-view")
    model = base / "local-model"  # a local folder passes the model preflight when offline
    model.mkdir()
    (model / "config.json").write_text("{}")
    cases = dict(CASES)
    cases["offline-no-dataset"][2]["MLAPROP_MODEL"] = str(model)
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = {n: pool.submit(_gpu_sim, v, a, extra, base, n) for n, (v, a, extra) in cases.items()}
        return {n: f.result() for n, f in futures.items()}


def test_tp2_passes_and_the_job_shows_the_result(outcomes: dict[str, Outcome]) -> None:
    """``MLAPROP_TP=2`` (smoke) on the simulated H200: the plan carries ``--tp-size 2``, the test passes, the JUnit
    XML holds verdict, score, interval, backend, deterministic flag, SGLang version and GPU, and the step
    summary gets a Markdown block with the same verdict and score."""
    o = outcomes["nvidia-tp2"]
    assert o.code == 0, o.output
    props = o.properties("test_mla_fp8_nvidia")
    summary = json.loads((o.report / "summary.json").read_text())
    scored = summary["mgsm"]["scores"]["simple-evals"]
    assert props["verdict"] == "pass" and props["exit_code"] == "0"
    assert props["score"] == f"{scored['score']:.3f}"
    assert props["interval"] == f"{scored['ci95'][0]:.3f}-{scored['ci95'][1]:.3f}"
    mdd = minimum_detectable_drop(scored["score"], scored["n"])
    assert props["n"] == "16" and props.get("minimum_detectable_drop") == (
        None if mdd is None else f"{mdd:.3f}"
    )
    assert props["backend"] == "triton" and props["deterministic"] == "true"
    assert props["sglang_version"] == summary["environment"]["sglang_version"]
    assert props["gpu"] == "nvidia sm90 x2"
    assert props["report"].endswith("summary.json")
    argv = summary["plan"]["argv"]
    assert argv[argv.index("--tp-size") + 1] == "2"
    assert o.step_summary is not None
    head = o.step_summary.splitlines()[0]
    assert head == f"### mlaprop: PASS - MGSM-en {scored['score']:.3f} on nvidia sm90 x2, SGLang 0.5.23"
    assert "| tp | 2 |" in o.step_summary and "| minimum detectable drop | " in o.step_summary


def test_tp3_is_refused_before_launch_with_the_cause_first(outcomes: dict[str, Outcome]) -> None:
    """``MLAPROP_TP=3``: compose refuses (3 does not divide 16 heads) before any server starts; the failure's
    first line says so; the JUnit properties say error; the step summary names the compose stage."""
    o = outcomes["nvidia-tp3"]
    assert o.code == 1, o.output
    msg = o.failure_message("test_mla_fp8_nvidia")
    assert msg.startswith(
        "Failed: UnsupportedCombination at the compose stage: tensor parallel size 3 does not divide the "
        "model's 16 attention heads"
    ), msg
    assert not (o.report / "server.log").exists()
    props = o.properties("test_mla_fp8_nvidia")
    assert props["verdict"] == "error" and props["exit_code"] == "2"
    assert props["error"].startswith("compose: UnsupportedCombination: tensor parallel size 3")
    assert o.step_summary is not None and "**compose failed**: UnsupportedCombination" in o.step_summary


def test_missed_gate_fails_naming_the_score(outcomes: dict[str, Outcome]) -> None:
    """AMD with a 0.95 gate: the failure's first line gives the score and the gate; verdict ``fail``; the
    plan has no deterministic flag (``deterministic`` property false)."""
    o = outcomes["amd-missed-gate"]
    assert o.code == 1, o.output
    msg = o.failure_message("test_mla_fp8_amd")
    assert msg.startswith("AssertionError: MGSM-en below the gate: 0.900 (225/250"), msg
    props = o.properties("test_mla_fp8_amd")
    assert props["verdict"] == "fail" and props["deterministic"] == "false" and props["gate"] == "0.95"
    assert props["gpu"] == "amd gfx942 x1" and props["determinism"] == "not run"


def test_offline_runner_without_dataset_names_the_cause(outcomes: dict[str, Outcome]) -> None:
    """Offline (``HF_HUB_OFFLINE=ON``) with no ``MLAPROP_DATASET`` and an empty cache: no download is tried,
    and the first line names the missing dataset and the setting to use (it used to be a ``TypeError``)."""
    o = outcomes["offline-no-dataset"]
    assert o.code == 1, o.output
    msg = o.failure_message("test_mla_fp8_nvidia")
    assert msg.startswith("Failed: DatasetUnavailable at the dataset stage: MGSM-en is not in the cache"), msg
    assert "set MLAPROP_DATASET" in msg
    assert "TypeError" not in o.output


def test_bad_setting_is_refused_with_the_variable_named(outcomes: dict[str, Outcome]) -> None:
    """``MLAPROP_TP=two``: an error at set-up whose first line names the variable and the expected form."""
    o = outcomes["bad-tp"]
    assert o.code == 1, o.output
    msg = o.failure_message("test_mla_fp8_nvidia")
    assert msg.startswith("failed on setup with \"Failed: MLAPROP_TP='two' is not a whole number >= 1"), msg
