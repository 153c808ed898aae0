"""Tests for the ``mlaprop`` command line (``env`` and ``compose``), run in-process and as a real process."""

from __future__ import annotations

import ast
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import mlaprop
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
            "--no-deterministic",
            "--server-args",
            "--attention-backend flashinfer --api-key sk-123",
        )
        data = json.loads(out)
        assert code == 0
        assert data["attention_backend"] == "flashinfer"
        assert data["argv"].count("--attention-backend") == 1
        assert data["argv"][data["argv"].index("--tp-size") + 1] == "2"
        assert data["deterministic"] is False

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
            # regression: compare and table printed argparse's usage block first
            (("compare",), "required: A, B"),
            (("compare", "a", "b", "--alpha", "7"), "between 0 and 1"),
            (("table",), "required: DIR"),
            (("compare", "a", "b", "--max-flips", "-2"), "must be >= 0"),  # listed 13 of 15, "and 17 more"
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


def test_reader_gone_is_141_without_a_traceback():
    """Regression: ``mlaprop compose --explain | head -1`` printed a BrokenPipeError traceback and exited 1
    (a quality failure); it exits 141 (128 + SIGPIPE, as a shell tool) and prints nothing on stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLAPROP_", "SGLANG_"))}
    argv = [
        sys.executable,
        "-m",
        "mlaprop.cli",
        "compose",
        "--vendor",
        "nvidia",
        "--arch",
        "sm90",
        "--explain",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the child has printed anything: it starts in well over a millisecond
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert err == ""


class TestFoundByNewUsers:
    """Regressions from a fresh user's attempts to break the CLI."""

    @pytest.mark.parametrize(
        "argv",
        [
            (
                "compose",
                "--arch",
                "sm90",
                "--explain",
                "--server-args=--api-key sekrit123 --api-key othersecret456",
            ),
            ("compose", "--arch", "sm90", "--json", "--server-args=--api-key sekrit123"),
            (
                "compose",
                "--arch",
                "sm90",
                "--json",
                "--",
                "--admin-api-key",
                "sekrit123",
                "--ssl-keyfile-password",
                "sekrit123",
            ),
            ("compose", "--arch", "sm90", "--", "--api-ke", "sekrit123"),
        ],
    )
    def test_secrets_never_printed(self, capsys, argv):  # type: ignore[no-untyped-def]
        """Secret option values (duplicates, --json, other secret flags, argparse prefixes) print as ***."""
        code, out, err = _run(capsys, *argv)
        assert code == 0, err
        assert "sekrit123" not in out + err and "othersecret456" not in out + err
        assert "***" in out

    @pytest.mark.parametrize(
        "argv",
        [
            ("eval", "--base-url", "http://127.0.0.1:9", "--api-key", "sekrit123"),
            ("eval", "--base-url", "http://127.0.0.1:9", "--api-key=sekrit123"),
            ("eval", "--base-url", "http://127.0.0.1:9", "--api=sekrit123"),
            ("run", "--simulate", "--api-key", "sekrit123"),
            ("compose", "--hf-token=sekrit123"),
        ],
    )
    def test_secret_on_the_command_line_is_refused_unprinted(self, capsys, argv):  # type: ignore[no-untyped-def]
        """Regression: ``eval --api-key KEY`` was read as ``--api-key-env KEY`` (an argparse prefix) and KEY
        printed twice in the error; an unknown ``--api-key KEY`` was quoted back by argparse."""
        code, out, err = _run(capsys, *argv)
        assert code == 2
        assert "sekrit123" not in out + err
        assert err.startswith("mlaprop: error: ")

    @pytest.mark.parametrize(
        "argv",
        [
            ("compose", "--arch", "sm90", "--server-args", "--api-key 'sekrit123"),
            ("compose", "--arch", "sm90", "--server-args", "--api-key sek'rit123"),
            ("compose", "--arch", "sm90", "--server-args", "--api-key='sek\\rit123\"x"),
            ("run", "--simulate", "--sim-args", "--api-key 'sekrit123"),
        ],
    )
    def test_bad_quoting_never_echoes_a_secret(self, capsys, argv):  # type: ignore[no-untyped-def]
        """Regression: a --server-args / --sim-args value with an unclosed quote was quoted back in the error,
        its --api-key value with it (whole after a quote, or in repr form past the mask)."""
        code, out, err = _run(capsys, *argv)
        assert code == 2
        assert err.startswith("mlaprop: error: ") and "shell quoting" in err
        assert "rit123" not in out + err

    @pytest.mark.parametrize("flag", ["--por", "--hos", "--model-pa"])
    def test_prefixes_of_launcher_options_are_refused(self, capsys, flag):  # type: ignore[no-untyped-def]
        """SGLang's argparse expands unique prefixes; --por is --port and is refused like it."""
        code, _, err = _run(capsys, "compose", "--arch", "sm90", "--", flag, "1234")
        assert code == 2
        assert "is set by mlaprop's launcher" in err
        # regression: --port / --host were told to "pass the model with mlaprop's --model"
        assert ("--model" in err) == (flag == "--model-pa")

    def test_string_options_take_a_value_starting_with_dashes(self, capsys):  # type: ignore[no-untyped-def]
        """``--server-args "--disable-cuda-graph"`` works without the ``=`` form."""
        code, out, err = _run(capsys, "compose", "--arch", "sm90", "--server-args", "--disable-cuda-graph")
        assert code == 0, err
        assert out.splitlines()[0].endswith("--disable-cuda-graph")

    def test_preview_respects_masks_hiding_every_gpu(self, capsys):  # type: ignore[no-untyped-def]
        """``CUDA_VISIBLE_DEVICES=-1`` with --vendor/--arch is refused like with MLAPROP_VENDOR/MLAPROP_ARCH."""
        for environ, argv in (
            ({"CUDA_VISIBLE_DEVICES": "-1"}, ("compose", "--vendor", "nvidia", "--arch", "sm90")),
            (
                {"CUDA_VISIBLE_DEVICES": "-1", "MLAPROP_VENDOR": "nvidia", "MLAPROP_ARCH": "sm90"},
                ("compose",),
            ),
        ):
            code, _, err = _run(capsys, *argv, environ=environ)
            assert code == 2 and "hide every device" in err

    @pytest.mark.parametrize(
        ("argv", "match"),
        [
            (("compose", "--arch", "sm90", "--tp", "4", "--gpus", "2"), "needs 4 GPUs, but 2 are visible"),
            (("compose", "--arch", "sm90", "--tp", "3"), "does not divide the model's 16 attention heads"),
            (("compose", "--arch", "sm90", "--tp", "32"), "does not divide the model's 16 attention heads"),
        ],
    )
    def test_impossible_tp_is_refused(self, capsys, argv, match):  # type: ignore[no-untyped-def]
        """tp beyond the visible GPUs, or not dividing the heads, is refused before any launch."""
        code, _, err = _run(capsys, *argv)
        assert code == 2 and match in err


class TestModelShape:
    """``compose`` reads the model's KV heads and refuses model names SGLang would misparse."""

    def test_kv_heads_decide_rocm_default_and_tp(self, capsys):  # type: ignore[no-untyped-def]
        """DeepSeek-V3 (128 heads) at tp 8 on ROCm keeps 16 heads per rank: aiter; a non-default model without
        --kv-heads gets a decision saying 16 is assumed."""
        code, out, _ = _run(
            capsys,
            "compose",
            "--vendor",
            "amd",
            "--arch",
            "gfx942",
            "--model",
            "deepseek-ai/DeepSeek-V3",
            "--kv-heads",
            "128",
            "--tp",
            "8",
            "--explain",
        )
        assert code == 0 and "will resolve to: aiter" in out
        code, out, _ = _run(capsys, "compose", "--arch", "sm90", "--model", "org/other-mla", "--explain")
        assert code == 0 and "assumed to have 16 KV heads" in out

    @pytest.mark.parametrize("model", ["-x", " padded "])
    def test_model_that_sglang_would_misparse_is_refused(self, capsys, model):  # type: ignore[no-untyped-def]
        """A model starting with '-' or padded with spaces is refused before any launch."""
        code, out, err = _run(capsys, "compose", "--arch", "sm90", f"--model={model}")
        assert (code, out) == (2, "") and "would be read as an option or padded path" in err


class TestCommandLineShape:
    """Usage errors name their cause first; repeated ``--server-args`` add up; light commands stay light."""

    @pytest.mark.parametrize(
        "argv",
        [("nosuch",), ("compose", "--bogus"), ("run", "--limit", "0"), ("eval",), ("env", "--gpus", "x")],
    )
    def test_usage_error_prints_the_cause_first(self, capsys, argv):  # type: ignore[no-untyped-def]
        """Exit 2 and one line starting ``mlaprop: error:`` (regression: the usage block came first)."""
        code, out, err = _run(capsys, *argv)
        assert (code, out) == (2, "")
        assert err.startswith("mlaprop: error: ") and len(err.splitlines()) == 1
        assert "usage:" not in err

    def test_repeated_server_args_are_appended(self, capsys):  # type: ignore[no-untyped-def]
        """A second ``--server-args`` adds its words after the first's (regression: silently replaced)."""
        code, out, err = _run(
            capsys,
            "compose",
            "--arch",
            "sm90",
            "--server-args",
            "--mem-fraction-static 0.8",
            "--server-args=--disable-cuda-graph",
            "--",
            "--log-level",
            "info",
        )
        assert code == 0, err
        assert out.splitlines()[0].endswith("--mem-fraction-static 0.8 --disable-cuda-graph --log-level info")

    @pytest.mark.parametrize(
        "command",
        [["compose", "--arch", "sm90", "--explain"], ["env"], ["--help"], ["preflight", "--no-sglang"]],
    )
    def test_light_commands_import_no_http_client(self, command):  # type: ignore[no-untyped-def]
        """``compose`` / ``env`` / ``preflight`` / ``--help`` never import requests, urllib3, tqdm or psutil
        (start-up time; the exit code is the command's own)."""
        code = (
            "import sys\nfrom mlaprop.cli import main\n"
            f"rc = main({command!r}, environ={{'MLAPROP_VENDOR': 'nvidia', 'MLAPROP_ARCH': 'sm90'}})\n"
            "heavy = sorted(m for m in ('requests', 'urllib3', 'tqdm', 'psutil') if m in sys.modules)\n"
            "print(rc, heavy)\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[-1] in ("0 []", "2 []")

    def test_preflight_refusal_names_the_cause_first(self, capsys):  # type: ignore[no-untyped-def]
        """``preflight`` for AMD on an NVIDIA preview: exit 2, one line naming both vendors."""
        code, out, err = _run(
            capsys,
            "preflight",
            "--expect-vendor",
            "amd",
            "--vendor",
            "nvidia",
            "--arch",
            "sm90",
            "--no-sglang",
        )
        assert (code, out) == (2, "")
        assert err.splitlines()[0] == (
            "mlaprop: error: PreflightError: wrong GPU vendor: this run expects AMD, but found NVIDIA sm90 x1."
        )


def _mlaprop_imports(path: Path) -> set[str]:
    """Top-level and nested ``mlaprop`` modules imported by one source file (relative imports resolved)."""
    package = "mlaprop.cli" if path.parent.name == "cli" else "mlaprop"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                module = f"{package}.{module}" if module else package
            if module.startswith("mlaprop"):
                found.add(module)
                found.update(f"{module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mlaprop"))
    return found


def test_layers_import_one_way():
    """cli -> job -> report, never back: the job and the report import nothing of the CLI, the report
    nothing of the job, and the pure core nothing of the three (no cycle, no function-local workaround)."""
    root = Path(mlaprop.__file__).parent
    lower = {
        "job.py": ("mlaprop.cli",),
        "options.py": ("mlaprop.cli", "mlaprop.job"),
        "report.py": ("mlaprop.cli", "mlaprop.job", "mlaprop.options"),
        "compose.py": ("mlaprop.cli", "mlaprop.job", "mlaprop.report", "mlaprop.server"),
        "detect.py": ("mlaprop.cli", "mlaprop.job", "mlaprop.report", "mlaprop.server"),
        "server.py": ("mlaprop.cli", "mlaprop.job", "mlaprop.options"),
    }
    for name, forbidden in lower.items():
        imported = _mlaprop_imports(root / name)
        assert not {m for m in imported if m.startswith(forbidden)}, name
    assert len((root / "runner.py").read_text().splitlines()) < 300
