"""Where and with what a run ran, for ``summary.json``'s ``provenance`` (comparing runs a day later).

Read without importing torch or SGLang (package metadata, ``nvidia-smi`` / ``rocminfo`` with a timeout,
ROCm's version file), so it costs well under a second and never fails a run: anything unknown is ``None``.
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlaprop import __version__
from mlaprop.environment import Environment, Vendor

__all__ = ["Provenance", "collect_provenance", "package_version"]

#: Seconds a probe command may take.
PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Provenance:
    """Where and with what a run ran (``None``: unknown). Field names are ``summary.json``'s
    ``provenance`` keys (stable: dashboards and ``mlaprop compare`` read them)."""

    host: str
    os: str
    python: str
    mlaprop_version: str
    simulated: bool
    gpu_model: str | None = None
    gpu_driver: str | None = None
    cuda_version: str | None = None
    rocm_version: str | None = None
    torch_version: str | None = None
    sglang_installed: str | None = None
    sglang_rules: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object in ``summary.json``."""
        return asdict(self)


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name`` (``"torch"``, ``"sglang"``), or ``None``."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _output(cmd: list[str]) -> str | None:
    exe = shutil.which(cmd[0])
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, *cmd[1:]], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _nvidia() -> tuple[str | None, str | None]:
    out = _output(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
    if not out or not out.strip():
        return None, None
    name, _, driver = out.strip().splitlines()[0].partition(",")
    return name.strip() or None, driver.strip() or None


def _amd() -> tuple[str | None, str | None, str | None]:
    name = None
    out = _output(["rocminfo"])
    for line in (out or "").splitlines():
        if "Marketing Name" in line and "CPU" not in line:
            name = line.split(":", 1)[1].strip() or None
            break
    driver = _read("/sys/module/amdgpu/version")
    rocm = _read("/opt/rocm/.info/version")
    return name, driver, rocm


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def collect_provenance(environment: Environment | None, *, simulated: bool) -> Provenance:
    """The run's provenance: GPU model and driver, CUDA/ROCm, torch, the installed SGLang, host, Python and
    mlaprop versions. ``environment`` (``None`` for ``eval``) gives the vendor to probe and torch's CUDA.

    Never raises: a probe that fails leaves its field ``None``.
    """
    vendor = environment.vendor if environment is not None else None
    gpu_model = driver = rocm = None
    if not simulated:
        if vendor is Vendor.NVIDIA:
            gpu_model, driver = _nvidia()
        elif vendor is Vendor.AMD:
            gpu_model, driver, rocm = _amd()
    return Provenance(
        host=socket.gethostname(),
        os=platform.platform(),
        python=sys.version.split()[0],
        mlaprop_version=__version__,
        simulated=simulated,
        gpu_model=gpu_model,
        gpu_driver=driver,
        cuda_version=environment.cuda_version if environment is not None else None,
        rocm_version=rocm,
        torch_version=package_version("torch"),
        sglang_installed=package_version("sglang"),
        sglang_rules=environment.sglang_version if environment is not None else None,
    )
