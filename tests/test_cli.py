"""Tests for the ``mlaprop`` command line (``env`` and ``compose``), run in-process and as a real process."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

from mlaprop.cli import main


def _run(capsys, *argv: str, environ=None):  # type: ignore[no-untyped-def]
    code = main(list(argv), environ=environ if environ is not None else {})
    out = capsys.readouterr()
    return code, out.out, out.err


class TestCompose:
    """Tests for ``mlaprop compose``."""

    def test_h200_preview_prints_command_then_decisions(self, capsys):  # type: ignore[no-untyped-def]
        """The first line is the shell-quoted command with the deterministic flag; --explain adds one line per
        decision with its source and the predicted backend."""
        code, out, _ = _run(capsys, "compose", "--vendor", "nvidia", "--arch", "sm90", "--explain")
        assert code == 0
        first, *rest = out.splitlines()
        argv = shlex.split(first)
        assert argv[:3] == ["python", "-m", "sglang.launch_server"]
        assert "--enable-deterministic-inference" in argv
        assert argv[argv.index("--kv-cache-dtype") + 1] == "fp8_e5m2"
        text = "\n".join(rest)
        assert "attention backend SGLang will resolve to: triton" in text
        assert "source: https://github.com/sgl-project/sglang" in text

    def test_amd_preview_drops_the_flag_and_says_why(self, capsys):  # type: ignore[no-untyped-def]
        """``--vendor amd --arch gfx942``: no deterministic flag; the explanation names the allow-list."""
        code, out, _ = _run(capsys, "compose", "--vendor", "amd", "--arch", "gfx942", "--explain")
        assert code == 0
        assert "--enable-deterministic-inference" not in out.splitlines()[0]
        assert "dropped  --enable-deterministic-inference" in out and "allow-list" in out

    def test_json_plan(self, capsys):  # type: ignore[no-untyped-def]
        """``--json`` prints the plan with argv, env, predicted backend and decisions."""
        code, out, _ = _run(
            capsys,
            "compose",
            "--arch",
            "sm90",
            "--tp",
            "2",
            "--json",
            "--server-args",
            "--attention-backend flashinfer --api-key sk-123",
        )
        data = json.loads(out)
        assert code == 0
        assert data["attention_backend"] == "flashinfer"
        assert data["argv"].count("--attention-backend") == 1
        assert data["argv"][data["argv"].index("--tp-size") + 1] == "2"
        assert data["deterministic"] is True

    @pytest.mark.parametrize(
        ("argv", "match"),
        [
            (("compose",), "needs a GPU"),
            (("compose", "--arch", "sm90", "--attention-backend", "aiter"), "allow-list"),
            (
                (
                    "compose",
                    "--vendor",
                    "amd",
                    "--arch",
                    "gfx942",
                    "--server-args=--enable-deterministic-inference",
                ),
                "Remove the flag",
            ),
            (
                ("compose", "--vendor", "amd", "--arch", "gfx942", "--", "--enable-deterministic-inference"),
                "Remove the flag",
            ),
            (("compose", "--arch", "sm90", "--server-args", "--port 1"), "launcher"),
            (("compose", "--arch", "sm90", "--server-args", "'unbalanced"), "shell quoting"),
            (("compose", "--arch", "sm90", "--tp", "0"), ">= 1"),
        ],
    )
    def test_errors_exit_2_with_the_cause_first(self, capsys, argv, match):  # type: ignore[no-untyped-def]
        """Usage and environment errors exit 2 with one ``mlaprop: error:`` line naming the cause."""
        code, out, err = _run(capsys, *argv)
        assert code == 2
        assert out == ""
        assert err.startswith("mlaprop: error: ") and match in err.splitlines()[0]

    def test_api_key_is_redacted_in_the_printed_command(self, capsys):  # type: ignore[no-untyped-def]
        """A secret in --server-args never reaches the printed command."""
        code, out, _ = _run(capsys, "compose", "--arch", "sm90", "--", "--api-key", "sk-very-secret")
        assert code == 0
        assert "sk-very-secret" not in out and "***" in out


class TestEnv:
    """Tests for ``mlaprop env``."""

    def test_env_json_reads_ci_markers_raw(self, capsys):  # type: ignore[no-untyped-def]
        """``env --json`` shows the raw marker values and the overrides."""
        code, out, _ = _run(
            capsys,
            "env",
            "--json",
            "--vendor",
            "amd",
            "--arch",
            "gfx942",
            environ={"SGLANG_IS_IN_CI_AMD": "yes"},
        )
        data = json.loads(out)
        assert code == 0
        assert (data["vendor"], data["arch"], data["ci"]["sglang_is_in_ci_amd"]) == ("amd", "gfx942", "yes")


def test_console_script_runs_as_a_process():
    """``python -m mlaprop.cli compose`` works as a separate process (what the console script calls)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLAPROP_", "SGLANG_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "mlaprop.cli", "compose", "--vendor", "nvidia", "--arch", "sm90"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("--enable-deterministic-inference")
