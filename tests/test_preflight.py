"""Tests for `mlaprop.preflight`: every refusal path of a GPU run, on the CPU machine."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mlaprop.detect import HardwareProbe, detect_environment
from mlaprop.environment import Environment, Vendor
from mlaprop.preflight import PreflightError, check_model_available, hf_hub_cache, preflight

NV = HardwareProbe(Vendor.NVIDIA, "sm90", 1, False, False, "12.8", "nvidia-smi")
MODEL = "neuralmagic/DeepSeek-Coder-V2-Lite-Instruct-FP8"


def _found(_name: str) -> object:
    return object()


class TestRefusals:
    """Tests that each wrong setup is refused before any launch, saying what was expected and found."""

    def test_wrong_vendor(self):
        """``gpu-amd`` on an NVIDIA box: the first line names both vendors; the fix names the other env."""
        env = detect_environment({}, probe=lambda: NV)
        with pytest.raises(PreflightError) as err:
            preflight(env, expect=Vendor.AMD, model=MODEL, environ={}, find_spec=_found)
        first, *rest = str(err.value).splitlines()
        assert "expects AMD" in first and "found NVIDIA sm90" in first
        assert "tox -e gpu-nvidia" in "\n".join(rest)

    def test_masks_hide_every_gpu(self):
        """``CUDA_VISIBLE_DEVICES=''`` hides the GPU: refused, naming the mask."""
        env = detect_environment({"CUDA_VISIBLE_DEVICES": ""}, probe=lambda: NV)
        with pytest.raises(PreflightError, match="no visible GPU") as err:
            preflight(env, expect=Vendor.NVIDIA, model=MODEL, environ={}, find_spec=_found)
        assert "CUDA_VISIBLE_DEVICES=''" in str(err.value)

    def test_no_gpu_at_all(self):
        """No GPU: refused, with the preview command."""
        env = detect_environment({}, probe=HardwareProbe)
        with pytest.raises(PreflightError, match="no GPU found") as err:
            preflight(env, expect=Vendor.NVIDIA, model=MODEL, environ={}, find_spec=_found)
        # regression: an NVIDIA run was told to preview the AMD plan
        assert "`mlaprop compose --vendor nvidia --arch sm90`." in str(err.value)
        with pytest.raises(PreflightError, match="no GPU found") as err:
            preflight(env, expect=Vendor.AMD, model=MODEL, environ={}, find_spec=_found)
        assert "`mlaprop compose --vendor amd --arch gfx942`." in str(err.value)

    def test_sglang_not_importable(self):
        """SGLang missing: refused, naming the interpreter and how to install it."""
        with pytest.raises(PreflightError, match="SGLang is not importable") as err:
            preflight(Environment(), expect=Vendor.NVIDIA, model=MODEL, environ={}, find_spec=lambda _n: None)
        assert "pip install" in str(err.value) and "system_site_packages" in str(err.value)
        # regression: the hint said to put the venv on PYTHONPATH; the README's fix is MLAPROP_PYTHON
        assert "set MLAPROP_PYTHON to that venv's python" in str(err.value)

    def test_model_not_cached_while_offline(self, tmp_path: Path):
        """``HF_HUB_OFFLINE=1`` and no cached snapshot: refused, naming the model, HF_HOME and the folder."""
        environ = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
        start = time.monotonic()
        with pytest.raises(PreflightError) as err:
            preflight(Environment(), expect=Vendor.NVIDIA, model=MODEL, environ=environ, find_spec=_found)
        assert time.monotonic() - start < 5
        msg = str(err.value)
        assert MODEL in msg.splitlines()[0] and f"HF_HOME={tmp_path}" in msg
        assert str(tmp_path / "hub" / "models--neuralmagic--DeepSeek-Coder-V2-Lite-Instruct-FP8") in msg

    def test_model_cached_while_offline_passes(self, tmp_path: Path):
        """A cached snapshot with config.json passes the offline check."""
        snap = (
            tmp_path
            / "hub"
            / "models--neuralmagic--DeepSeek-Coder-V2-Lite-Instruct-FP8"
            / "snapshots"
            / "abc"
        )
        snap.mkdir(parents=True)
        (snap / "config.json").write_text("{}")
        result = preflight(
            Environment(),
            expect=Vendor.NVIDIA,
            model=MODEL,
            environ={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)},
            find_spec=_found,
        )
        assert result.checks[-1] == f"model available: {MODEL}"

    def test_local_model_folder_without_config(self, tmp_path: Path):
        """A local folder without config.json is refused; a missing path too."""
        with pytest.raises(PreflightError, match=r"has no config\.json"):
            check_model_available(str(tmp_path), {})
        with pytest.raises(PreflightError, match="does not exist"):
            check_model_available(str(tmp_path / "nope"), {})


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"HF_HUB_CACHE": "/c"}, Path("/c")),
        ({"HF_HOME": "/h"}, Path("/h/hub")),
        ({"XDG_CACHE_HOME": "/x"}, Path("/x/huggingface/hub")),
    ],
)
def test_hf_hub_cache_order(environ, expected):  # type: ignore[no-untyped-def]
    """The hub cache follows huggingface_hub: HF_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub."""
    assert hf_hub_cache(environ) == expected
