"""The CLI's commands that run on this machine (``run``, ``preflight``) let the hardware speak: an override
never hides ROCm; ``run --simulate`` and ``compose`` preview what the overrides name (issue 9)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from mlaprop.cli import main
from tests.eval_fixtures import mgsm_path

ROCMINFO = "#!/bin/sh\necho 'Agent 2'\necho '  Name:                    gfx942'\n"


@pytest.fixture
def rocm_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A machine whose ``rocminfo`` lists an MI300X (gfx942): a fake ``rocminfo`` first on ``PATH``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "rocminfo"
    tool.write_text(ROCMINFO)
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return bin_dir


class TestHardwareSpeaks:
    """Tests for the override-versus-machine rule at the command line."""

    def test_run_with_an_nvidia_override_on_a_rocm_machine_is_refused_before_launch(
        self, rocm_machine: Path, tmp_path: Path, mgsm_dir: Path, capsys: Any
    ) -> None:
        """``MLAPROP_VENDOR=nvidia MLAPROP_ARCH=sm90 mlaprop run`` where rocminfo lists gfx942: exit 2, the
        first stderr line names the override and the machine; nothing launched, no deterministic flag."""
        environ = {"MLAPROP_VENDOR": "nvidia", "MLAPROP_ARCH": "sm90", "PATH": os.environ["PATH"]}
        argv = ["run", "--dataset", str(mgsm_path(mgsm_dir)), "--report-dir", str(tmp_path / "r")]
        assert main(argv, environ=environ) == 2
        first = capsys.readouterr().err.splitlines()[0]
        assert "HardwareConflict" in first and "nvidia" in first and "gfx942" in first, first
        assert not (tmp_path / "r" / "server.log").exists()

    def test_preflight_with_an_nvidia_override_on_a_rocm_machine_is_refused(
        self, rocm_machine: Path, capsys: Any
    ) -> None:
        """``preflight`` probes the machine too: the same conflict, exit 2."""
        environ = {"MLAPROP_VENDOR": "nvidia", "MLAPROP_ARCH": "sm90", "PATH": os.environ["PATH"]}
        assert main(["preflight", "--expect-vendor", "nvidia"], environ=environ) == 2
        err = capsys.readouterr().err
        assert "HardwareConflict" in err and "gfx942" in err, err

    def test_compose_with_the_same_override_previews(self, rocm_machine: Path, capsys: Any) -> None:
        """``compose`` only previews: the override plans an H200 even on the ROCm machine."""
        environ = {"MLAPROP_VENDOR": "nvidia", "MLAPROP_ARCH": "sm90", "PATH": os.environ["PATH"]}
        assert main(["compose", "--json"], environ=environ) == 0
        plan = json.loads(capsys.readouterr().out)
        assert plan["deterministic"] is True

    @pytest.mark.parametrize(
        ("vendor", "arch", "deterministic"), [("amd", "gfx942", False), ("nvidia", "sm90", True)]
    )
    def test_run_simulate_honours_the_platform_variables(
        self, tmp_path: Path, mgsm_dir: Path, vendor: str, arch: str, deterministic: bool
    ) -> None:
        """``run --simulate`` plans for ``MLAPROP_VENDOR`` / ``MLAPROP_ARCH`` like every other command
        (it used to plan sm90 whatever they said)."""
        environ = {"MLAPROP_VENDOR": vendor, "MLAPROP_ARCH": arch}
        argv = ["run", "--simulate", "--dataset", str(mgsm_path(mgsm_dir)), "--limit", "4"]
        argv += ["--report-dir", str(tmp_path / "r"), "--determinism", "off", "--gate", "0"]
        main(argv, environ=environ)
        s = json.loads((tmp_path / "r" / "summary.json").read_text())
        assert (s["environment"]["vendor"], s["environment"]["arch"]) == (vendor, arch)
        assert s["plan"]["deterministic"] is deterministic
