"""Shared test configuration: Hypothesis profiles and the path to ``../shared``.

Hypothesis profiles (select with ``HYPOTHESIS_PROFILE``):

- ``dev``: fast, for the edit-test loop (50 examples).
- ``thorough``: 2000 examples per property, no deadline.
- ``ci``: Hypothesis's built-in profile (derandomized, no deadline, no example database, prints
  reproduction blobs); it switches on by itself when ``CI`` is set, so it is not re-registered here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=50)
settings.register_profile(
    "thorough", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])

REPO = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """``../shared`` beside the checkout, or ``MLAPROP_SHARED``."""
    return Path(os.environ.get("MLAPROP_SHARED") or REPO.parent / "shared")


@pytest.fixture(scope="session")
def mgsm_dir() -> Path:
    """The folder holding ``mgsm_<lang>.tsv`` (CC BY 4.0; read in place, never copied into the repo)."""
    path = shared_dir() / "data" / "mgsm"
    if not (path / "mgsm_en.tsv").is_file():
        pytest.fail(f"MGSM data not found at {path}: set MLAPROP_SHARED to the folder holding data/mgsm")
    return path
