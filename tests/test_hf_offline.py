"""Regression tests: Hugging Face offline mode and cache folder read as ``huggingface_hub`` reads them
(issue 13): ``HF_HUB_OFFLINE=ON`` / ``TRANSFORMERS_OFFLINE=1`` are offline, ``HF_HUB_OFFLINE=y`` is not,
``HF_HOME='~/hf'`` is expanded."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlaprop.preflight import PreflightError, check_model_available, hf_hub_cache, hf_offline

MODEL = "neuralmagic/DeepSeek-Coder-V2-Lite-Instruct-FP8"


@pytest.mark.parametrize(
    ("environ", "offline"),
    [
        ({}, False),
        ({"HF_HUB_OFFLINE": "1"}, True),
        ({"HF_HUB_OFFLINE": "ON"}, True),
        ({"HF_HUB_OFFLINE": "on"}, True),
        ({"HF_HUB_OFFLINE": "Yes"}, True),
        ({"HF_HUB_OFFLINE": "true"}, True),
        ({"HF_HUB_OFFLINE": "y"}, False),  # true to SGLang's EnvBool, false to huggingface_hub
        ({"HF_HUB_OFFLINE": " 1"}, False),  # not stripped
        ({"TRANSFORMERS_OFFLINE": "1"}, True),
        ({"HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "1"}, True),  # empty falls through
        ({"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1"}, False),  # first non-empty decides
    ],
)
def test_offline_mode_matches_huggingface_hub(environ: dict[str, str], offline: bool) -> None:
    """``hf_offline`` gives ``huggingface_hub.constants.HF_HUB_OFFLINE`` for the same variables."""
    assert hf_offline(environ)[0] is offline


def test_offline_mode_names_the_deciding_variable() -> None:
    """The second item names the variable and value that decided, for the refusal message."""
    assert hf_offline({"TRANSFORMERS_OFFLINE": "1"}) == (True, "TRANSFORMERS_OFFLINE=1")
    assert hf_offline({}) == (False, None)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"HF_HOME": "~/hf", "HOME": "/home/ci"}, "/home/ci/hf/hub"),
        ({"HF_HOME": "$WORK/hf", "WORK": "/w"}, "/w/hf/hub"),
        ({"HF_HOME": "${WORK}/hf", "WORK": "/w"}, "/w/hf/hub"),
        ({"HF_HOME": "$NOPE/hf"}, "$NOPE/hf/hub"),  # unset variables stay as written
        ({"HF_HUB_CACHE": "~/c", "HOME": "/home/ci"}, "/home/ci/c"),
        ({"HUGGINGFACE_HUB_CACHE": "/legacy", "HF_HOME": "/h"}, "/legacy"),
        ({"HF_HUB_CACHE": "/new", "HUGGINGFACE_HUB_CACHE": "/legacy"}, "/new"),
        ({"XDG_CACHE_HOME": "/xdg"}, "/xdg/huggingface/hub"),
        ({"HOME": "/home/ci"}, "/home/ci/.cache/huggingface/hub"),
    ],
)
def test_hub_cache_matches_huggingface_hub(environ: dict[str, str], expected: str) -> None:
    """``hf_hub_cache`` follows ``huggingface_hub.constants`` (``~`` and ``$VARS`` expanded)."""
    assert hf_hub_cache(environ) == Path(expected)


def _cache(root: Path) -> None:
    snap = root / "hub" / ("models--" + MODEL.replace("/", "--")) / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")


@pytest.mark.parametrize("variable", [("HF_HUB_OFFLINE", "ON"), ("TRANSFORMERS_OFFLINE", "1")])
def test_uncached_model_refused_for_each_offline_spelling(tmp_path: Path, variable: tuple[str, str]) -> None:
    """An uncached hub model is refused for every offline spelling; the first line names the variable."""
    name, value = variable
    with pytest.raises(PreflightError) as err:
        check_model_available(MODEL, {name: value, "HF_HOME": str(tmp_path)})
    first = str(err.value).splitlines()[0]
    assert MODEL in first and f"{name}={value}" in first


def test_y_is_online_so_uncached_model_is_not_refused(tmp_path: Path) -> None:
    """``HF_HUB_OFFLINE=y`` is online for huggingface_hub: SGLang will download, so no refusal."""
    check_model_available(MODEL, {"HF_HUB_OFFLINE": "y", "HF_HOME": str(tmp_path)})


def test_tilde_hf_home_finds_the_cached_model(tmp_path: Path) -> None:
    """``HF_HOME='~/hf'`` offline: the model cached under ``$HOME/hf`` is found (it used to be looked for
    under a literal ``~`` folder)."""
    _cache(tmp_path / "hf")
    check_model_available(MODEL, {"HF_HUB_OFFLINE": "1", "HF_HOME": "~/hf", "HOME": str(tmp_path)})
