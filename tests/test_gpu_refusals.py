"""The GPU test file refuses a wrong setup within seconds, before any launch, with the cause first: run
as ``tox -e gpu-*`` runs it (a pytest subprocess), on the CPU machine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODEL = "neuralmagic/DeepSeek-Coder-V2-Lite-Instruct-FP8"


def _run_gpu_test(marker: str, environ: dict[str, str], report: Path) -> tuple[int, str, float]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLAPROP_", "SGLANG_", "HF_", "CUDA_VISIBLE"))
    }
    env.update(environ)
    env["MLAPROP_REPORT_DIR"] = str(report)
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/gpu",
            "-m",
            f"gpu and {marker}",
            "-p",
            "no:cacheprovider",
            "-q",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


CASES = {
    "gpu-amd-on-nvidia": (
        "amd",
        {"MLAPROP_VENDOR": "nvidia", "MLAPROP_ARCH": "sm90", "MLAPROP_EXPECT_VENDOR": "amd"},
        "PreflightError: wrong GPU vendor: this run expects AMD, but found NVIDIA sm90",
    ),
    "masks-hide-every-gpu": (
        "nvidia",
        {"MLAPROP_VENDOR": "nvidia", "MLAPROP_ARCH": "sm90", "CUDA_VISIBLE_DEVICES": ""},
        "PreflightError: no visible GPU",
    ),
    "sglang-missing": (
        "nvidia",
        {"MLAPROP_VENDOR": "nvidia", "MLAPROP_ARCH": "sm90"},
        "PreflightError: SGLang is not importable",
    ),
    "tox-env-and-marker-disagree": (
        "nvidia",
        {"MLAPROP_VENDOR": "nvidia", "MLAPROP_ARCH": "sm90", "MLAPROP_EXPECT_VENDOR": "amd"},
        "MLAPROP_EXPECT_VENDOR=amd but this is the nvidia test",
    ),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, float, Path]]:
    """Every case's run, started together (each is a separate Python process)."""
    base = tmp_path_factory.mktemp("refusals")
    fake = base / "site" / "sglang"  # an importable stand-in, so the model check is reached
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    cases = dict(CASES)
    cases["model-not-cached-offline"] = (
        "nvidia",
        {
            "MLAPROP_VENDOR": "nvidia",
            "MLAPROP_ARCH": "sm90",
            "HF_HUB_OFFLINE": "1",
            "HF_HOME": str(base / "hf"),
            "PYTHONPATH": f"{base / 'site'}{os.pathsep}{REPO}",
        },
        f"PreflightError: model {MODEL} is not in the Hugging Face cache and HF_HUB_OFFLINE=1",
    )
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = {
            name: pool.submit(_run_gpu_test, marker, environ, base / name)
            for name, (marker, environ, _) in cases.items()
        }
        return {name: (*f.result(), base / name) for name, f in futures.items()}


@pytest.mark.parametrize("case", [*CASES, "model-not-cached-offline"])
def test_refused_in_seconds_with_the_cause(case, outcomes):  # type: ignore[no-untyped-def]
    """Each wrong setup fails the run (non-zero exit, never a skip) in seconds, before any launch, with the
    cause in the failure: wrong vendor, every GPU masked, SGLang missing, tox env and marker disagreeing,
    and the model missing from the cache while offline (which also names HF_HOME)."""
    code, out, took, report = outcomes[case]
    cause = CASES[case][2] if case in CASES else "is not in the Hugging Face cache and HF_HUB_OFFLINE=1"
    assert code == 1, out
    assert cause in out, out
    assert re.search(r"\d+ (failed|errors?)\b", out) and not re.search(r"\d+ (passed|skipped)", out)
    assert took < 60
    assert not (report / "server.log").exists()  # nothing was launched
    if case == "model-not-cached-offline":
        assert MODEL in out and "HF_HOME=" in out and "/hf" in out
