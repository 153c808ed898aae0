"""Regression tests: ROCm device masks follow HIP's rule (issue 13).

HIP reads ``HIP_VISIBLE_DEVICES`` when it is non-empty, else ``CUDA_VISIBLE_DEVICES``, and applies the list
only when it is non-empty (ROCm clr ``rocdevice.cpp``); ROCr applies ``ROCR_VISIBLE_DEVICES`` first whenever
it is set. ``HIP_VISIBLE_DEVICES=0 CUDA_VISIBLE_DEVICES=`` used to be refused as "masks hide every GPU".
"""

from __future__ import annotations

import pytest

from mlaprop.compose import UnsupportedCombination, compose
from mlaprop.detect import HardwareProbe, apply_device_masks, detect_environment
from mlaprop.environment import Vendor
from mlaprop.preflight import PreflightError, check_gpu

AMD8 = HardwareProbe(Vendor.AMD, "gfx942", 8, False, True, None, "rocminfo")


@pytest.mark.parametrize(
    ("environ", "count"),
    [
        ({"HIP_VISIBLE_DEVICES": "0", "CUDA_VISIBLE_DEVICES": ""}, 1),  # the reported refusal
        ({"HIP_VISIBLE_DEVICES": "0,1", "CUDA_VISIBLE_DEVICES": "3"}, 2),  # HIP wins, CUDA ignored
        ({"HIP_VISIBLE_DEVICES": "", "CUDA_VISIBLE_DEVICES": "0,1,2"}, 3),  # empty HIP: CUDA's list
        ({"HIP_VISIBLE_DEVICES": ""}, 8),  # empty means unset on ROCm
        ({"CUDA_VISIBLE_DEVICES": ""}, 8),
        ({"HIP_VISIBLE_DEVICES": "", "CUDA_VISIBLE_DEVICES": ""}, 8),
        ({"HIP_VISIBLE_DEVICES": "-1"}, 0),  # a non-empty list whose first entry is invalid hides all
        ({"ROCR_VISIBLE_DEVICES": ""}, 0),  # ROCr filters whenever the variable is set
        ({"ROCR_VISIBLE_DEVICES": "0,1", "CUDA_VISIBLE_DEVICES": "1"}, 1),
        ({}, 8),
    ],
)
def test_rocm_visible_count_follows_hip_rule(environ: dict[str, str], count: int) -> None:
    """The visible AMD GPU count is what HIP would expose for these masks."""
    assert apply_device_masks(8, Vendor.AMD, environ)[0] == count
    assert detect_environment(environ, probe=lambda: AMD8).gpu_count == count


def test_hip_mask_with_empty_cuda_mask_is_not_refused() -> None:
    """``HIP_VISIBLE_DEVICES=0 CUDA_VISIBLE_DEVICES=`` on ROCm: one GPU, preflight and compose accept it,
    and a note says that CUDA_VISIBLE_DEVICES is ignored."""
    env = detect_environment({"HIP_VISIBLE_DEVICES": "0", "CUDA_VISIBLE_DEVICES": ""}, probe=lambda: AMD8)
    assert env.gpu_count == 1
    check_gpu(env, Vendor.AMD)
    plan = compose(env)
    assert "--enable-deterministic-inference" not in plan.argv
    assert any("CUDA_VISIBLE_DEVICES='' is ignored on ROCm" in n for n in env.notes)


def test_nvidia_keeps_cuda_rule() -> None:
    """On NVIDIA an empty ``CUDA_VISIBLE_DEVICES`` still hides every device, and HIP's variable is not read."""
    nv = HardwareProbe(Vendor.NVIDIA, "sm90", 8, False, False, "12.8", "nvidia-smi")
    env = detect_environment({"CUDA_VISIBLE_DEVICES": "", "HIP_VISIBLE_DEVICES": "0"}, probe=lambda: nv)
    assert env.gpu_count == 0
    with pytest.raises(PreflightError, match="no visible GPU"):
        check_gpu(env, Vendor.NVIDIA)
    with pytest.raises(UnsupportedCombination, match="VISIBLE_DEVICES"):
        compose(env)
