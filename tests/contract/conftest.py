"""Fixtures for the contract tests: the installed SGLang, imported once per session.

Without SGLang the contract tests skip, so a plain ``pytest`` on a machine without it stays green. Under
``tox -e contract`` the variable ``MLAPROP_CONTRACT=1`` is set and a missing or broken SGLang is an error
instead: a contract run that tested nothing must not pass.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.contract.sglang_sim import SGLang, load, write_model_dir

#: Set by the contract tox environments: SGLang must be importable.
REQUIRED = os.environ.get("MLAPROP_CONTRACT", "").strip() == "1"
#: The SGLang version tests/contract/run_versions.py installed for this run; checked when set.
EXPECTED_VERSION = os.environ.get("MLAPROP_CONTRACT_SGLANG", "").strip()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding only ``config.json`` of the test model's shape (DeepseekV2ForCausalLM, MLA, FP8)."""
    return write_model_dir(tmp_path_factory.mktemp("DeepSeek-Coder-V2-Lite-Instruct-FP8"))


@pytest.fixture(scope="session")
def sglang(model_dir: Path) -> SGLang:
    """The installed SGLang's argument pipeline (skips without SGLang unless ``MLAPROP_CONTRACT=1``)."""
    if not REQUIRED:
        pytest.importorskip("sglang", reason="SGLang is not installed; run `tox -m contract`")
    try:
        sglang = load(model_dir)
    except Exception as exc:
        pytest.fail(
            f"SGLang's argument pipeline cannot be imported: {type(exc).__name__}: {exc}. "
            "The contract tox environment installs its stack with tests/contract/requirements.txt and SGLang per "
            "version with tests/contract/run_versions.py",
            pytrace=True,
        )
    if EXPECTED_VERSION and sglang.version != EXPECTED_VERSION:
        pytest.fail(f"expected SGLang {EXPECTED_VERSION} (MLAPROP_CONTRACT_SGLANG), found {sglang.version}")
    return sglang
