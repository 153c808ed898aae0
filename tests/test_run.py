"""Tests for the main job (`mlaprop.job`) against the simulated SGLang server on the real MGSM-en data."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mlaprop import job, server
from mlaprop.cli import main
from mlaprop.environment import Environment, LaunchRequest, Vendor
from mlaprop.evalclient import EvalResult, ItemRecord
from mlaprop.exitcodes import ExitCode
from mlaprop.job import evaluate, run
from mlaprop.mgsm import load_dataset
from mlaprop.options import EvalOptions, InvalidOptions, RunOptions
from mlaprop.report import ReportWriter
from tests.eval_fixtures import mgsm_path
from tests.test_report import schema_problems

SCHEMA = Path(job.__file__).parent / "summary.schema.json"

EXIT_OK, EXIT_FAIL, EXIT_USAGE = ExitCode.OK, ExitCode.QUALITY, ExitCode.USAGE
EXIT_INFRA, EXIT_INTERRUPTED = ExitCode.INFRASTRUCTURE, ExitCode.SIGINT

ENV = Environment(vendor=Vendor.NVIDIA, arch="sm90", gpu_count=1)


def _expected_correct(mgsm_dir: Path, accuracy: float, n: int, seed: int = 0) -> int:
    """Right answers among the first ``n`` rows for the simulator's seeded choice (``SimModel.build``)."""
    rows = len(load_dataset(mgsm_path(mgsm_dir)))
    chosen = random.Random(seed).sample(range(rows), round(accuracy * rows))
    return sum(1 for i in chosen if i < n)


def _opts(tmp_path: Path, mgsm_dir: Path, **kw: Any) -> EvalOptions:
    base: dict[str, Any] = {
        "dataset": str(mgsm_path(mgsm_dir)),
        "report_dir": tmp_path / "report",
        "concurrency": 16,
        "request_timeout_s": 20.0,
        "progress": False,
        "batch_sizes": (1, 2, 4, 8),
        "prefix_lengths": (1, 511, 2048),
    }
    base.update(kw)
    return EvalOptions(**base)


def _run(
    tmp_path: Path, mgsm_dir: Path, *, accuracy: float = 0.9, sim_args: tuple[str, ...] = (), **kw: Any
) -> int:
    request = kw.pop("request", LaunchRequest())
    opts = _opts(tmp_path, mgsm_dir, **kw)
    run_opts = RunOptions(
        request=request,
        environment=ENV,
        simulate=True,
        sim_accuracy=accuracy,
        sim_latency_s=0.01,
        sim_args=sim_args,
        ready_timeout_s=20,
        grace_s=2,
    )
    return run(run_opts, opts)


def _summary(tmp_path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((tmp_path / "report" / "summary.json").read_text())
    return data


def _items(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (tmp_path / "report" / "items.jsonl").read_text().splitlines()]


class TestVerdicts:
    """Known simulated accuracies give exactly the expected scores and verdicts."""

    @pytest.mark.parametrize(("accuracy", "correct", "code"), [(0.8, 200, EXIT_OK), (0.784, 196, EXIT_FAIL)])
    def test_full_250(
        self, tmp_path: Path, mgsm_dir: Path, accuracy: float, correct: int, code: int, capsys: Any
    ) -> None:
        """All 250 questions: the exact score, both parsers, the interval, determinism, per-item records."""
        assert _run(tmp_path, mgsm_dir, accuracy=accuracy) == code
        s = _summary(tmp_path)
        m = s["mgsm"]
        assert (m["n_total"], m["answered"], m["errors"], m["missing"]) == (250, 250, 0, 0)
        for parser in ("simple-evals", "robust"):
            assert (m["scores"][parser]["correct"], m["scores"][parser]["n"]) == (correct, 250)
        assert m["scores"]["simple-evals"]["score"] == correct / 250
        assert m["disagreements"] == []
        assert m["verdict"] == ("pass" if code == EXIT_OK else "fail")
        assert s["status"] == ("pass" if code == EXIT_OK else "fail")
        assert s["exit_code"] == code
        assert s["determinism"]["passed"] is True
        assert s["plan"]["deterministic"] is True
        assert "--enable-deterministic-inference" in s["plan"]["argv"]
        assert s["dataset"]["canonical"] is True
        assert m["completion_tokens"] > 0 and m["output_tokens_per_s"] > 0
        assert m["latency_s"]["p50"] is not None
        assert set(s["timings_s"]) >= {
            "dataset",
            "compose",
            "launch",
            "mgsm",
            "determinism",
            "teardown",
            "total",
        }
        items = _items(tmp_path)
        assert len(items) == 250
        assert sum(1 for i in items if i["correct"]) == correct
        assert {i["qid"] for i in items} == {f"mgsm_en_{k:03d}" for k in range(250)}
        out = capsys.readouterr().out
        expected = "PASS" if code == EXIT_OK else "FAIL"
        assert f"verdict: {expected} - MGSM-en {correct / 250:.3f} ({correct}/250" in out
        assert "95% CI" in out

    def test_robust_parser_gates(self, tmp_path: Path, mgsm_dir: Path) -> None:
        """``parser=robust`` gates; the expected count over the first 40 rows comes from the seeded choice."""
        code = _run(tmp_path, mgsm_dir, accuracy=0.5, parser="robust", limit=40, determinism=False)
        expected = _expected_correct(mgsm_dir, 0.5, 40)
        s = _summary(tmp_path)
        assert s["gating_parser"] == "robust"
        assert s["mgsm"]["scores"]["robust"]["correct"] == expected
        assert s["determinism"] is None
        assert code == (EXIT_OK if expected >= 32 else EXIT_FAIL)

    def test_determinism_fails_without_the_flag(self, tmp_path: Path, mgsm_dir: Path) -> None:
        """No ``--enable-deterministic-inference`` and the check forced on: batch dependence fails the run."""
        code = _run(
            tmp_path,
            mgsm_dir,
            accuracy=1.0,
            limit=20,
            determinism=True,
            request=LaunchRequest(deterministic=False),
        )
        s = _summary(tmp_path)
        assert code == EXIT_FAIL
        assert s["status"] == "determinism-failed"
        assert s["mgsm"]["verdict"] == "pass"
        assert s["determinism"]["passed"] is False
        assert max(p["distinct"] for p in s["determinism"]["prompts"]) > 1


class TestDatasetErrorsBeforeLaunch:
    """A bad or missing dataset fails with exit 2 before any server is launched."""

    @pytest.mark.parametrize(
        ("content", "line", "problem"),
        [
            (b"", None, "the file is empty"),
            (b"q\t1\nq two 2\n", 2, "expected 2 tab-separated columns"),
            (b"q\t1\nq\t1.5\n", 2, "the answer '1.5' is not an integer"),
            (b"q\t1\ncaf\xe9\t2\n", 2, "not valid UTF-8"),
        ],
    )
    def test_bad_dataset(
        self, tmp_path: Path, mgsm_dir: Path, monkeypatch: Any, content: bytes, line: int | None, problem: str
    ) -> None:
        """Each problem gets its message (file, line, problem) in the summary; no launch happens."""

        def no_launch(*a: Any, **k: Any) -> Any:
            raise AssertionError("a server was launched")

        monkeypatch.setattr(server, "launch", no_launch)
        bad = tmp_path / "bad.tsv"
        bad.write_bytes(content)
        assert _run(tmp_path, mgsm_dir, dataset=str(bad)) == EXIT_USAGE
        s = _summary(tmp_path)
        assert (s["status"], s["exit_code"], s["error"]["stage"]) == ("error", 2, "dataset")
        where = f"{bad}:{line}" if line else str(bad)
        assert s["error"]["message"].startswith(f"{where}: {problem}")
        assert s["server"] is None
        # regression: provenance was null when the run stopped at the dataset stage
        assert s["provenance"]["mlaprop_version"] and s["provenance"]["simulated"] is True

    def test_offline_without_cache(self, tmp_path: Path, mgsm_dir: Path, monkeypatch: Any) -> None:
        """Offline with an empty cache: exit 2 and how to provide the file."""
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        assert _run(tmp_path, mgsm_dir, dataset=None, offline=True) == EXIT_USAGE
        msg = _summary(tmp_path)["error"]["message"]
        assert "--dataset PATH" in msg
        assert str(tmp_path / "cache" / "mlaprop" / "mgsm" / "mgsm_en.tsv") in msg

    def test_no_gpu_plan(self, tmp_path: Path, mgsm_dir: Path) -> None:
        """An environment without a GPU cannot be composed for: exit 2 before launch."""
        opts = _opts(tmp_path, mgsm_dir)
        code = run(RunOptions(environment=Environment(vendor=Vendor.NONE, arch="", gpu_count=0)), opts)
        assert code == EXIT_USAGE
        s = _summary(tmp_path)
        assert (s["error"]["stage"], s["error"]["type"]) == ("compose", "UnsupportedCombination")


class TestServerFailures:
    """Server failures: a clear reason and partial results on disk."""

    def test_server_dies_mid_eval(self, tmp_path: Path, mgsm_dir: Path) -> None:
        """The simulated server exits after 60 requests: aborted, exit 3, the ABORTED line names the log line
        saying why, what finished is kept."""
        code = _run(tmp_path, mgsm_dir, sim_args=("--sim-die-after-requests", "60"), limit=200)
        s = _summary(tmp_path)
        assert code == EXIT_INFRA
        assert s["status"] == "aborted"
        assert "(server log: " in s["message"] and "RuntimeError: simulated crash after" in s["message"]
        assert s["message"].startswith("verdict: ABORTED - ")
        m = s["mgsm"]
        assert 40 <= m["answered"] <= 60 + 16  # requests in flight when the server died may still be answered
        assert m["aborted"] == s["error"]["message"]
        assert m["answered"] + m["errors"] + m["missing"] == 200
        items = _items(tmp_path)
        assert len(items) == m["answered"] + m["errors"]
        assert sum(1 for i in items if i["error"] is None) == m["answered"]
        assert s["timings_s"]["mgsm"] < 10

    def test_error_rate_aborts(self, tmp_path: Path, mgsm_dir: Path, capsys: Any) -> None:
        """Every 3rd request failing (HTTP 400, not retried) passes the 5% bound: aborted, partial results;
        the ABORTED line is stderr's first (regression: stdout)."""
        code = _run(
            tmp_path, mgsm_dir, sim_args=("--sim-error-every", "3", "--sim-error-status", "400"), limit=100
        )
        s = _summary(tmp_path)
        assert (code, s["status"]) == (EXIT_INFRA, "aborted")
        assert "over the 5% bound" in s["error"]["message"]
        assert s["mgsm"]["errors"] > 5
        out, err = capsys.readouterr()
        assert err.startswith("verdict: ABORTED - ") and "over the 5% bound" in err.splitlines()[0]
        assert "ABORTED" not in out and "MGSM-en: 100 questions" in out and "report: " in out
        # regression: the line gave only the count; it names the first failure (here the HTTP 400)
        assert "; first error (mgsm_en_" in err.splitlines()[0] and "HTTP 400" in err.splitlines()[0]

    def test_few_errors_are_reported_not_scored(self, tmp_path: Path, mgsm_dir: Path) -> None:
        """Malformed replies under the bound are errors, counted apart from wrong answers."""
        code = _run(
            tmp_path,
            mgsm_dir,
            accuracy=1.0,
            sim_args=("--sim-malformed-every", "25"),
            limit=50,
            determinism=False,
            max_error_rate=0.1,
        )
        s = _summary(tmp_path)
        m = s["mgsm"]
        assert m["errors"] == 2
        assert m["answered"] == 48
        assert m["scores"]["simple-evals"]["correct"] == 48
        assert all("not JSON" in e["error"] for e in m["first_errors"])
        assert code == EXIT_OK  # 48/50 meets 0.8 even counting the 2 errors wrong

    def test_retried_server_errors_recover(self, tmp_path: Path, mgsm_dir: Path) -> None:
        """HTTP 500 on every 10th request: retries recover, every question is answered."""
        code = _run(
            tmp_path,
            mgsm_dir,
            accuracy=1.0,
            sim_args=("--sim-error-every", "10"),
            limit=40,
            determinism=False,
        )
        m = _summary(tmp_path)["mgsm"]
        assert (code, m["answered"], m["errors"]) == (EXIT_OK, 40, 0)
        assert max(i["attempts"] for i in _items(tmp_path)) == 2

    def test_crash_at_start(self, tmp_path: Path, mgsm_dir: Path, capsys: Any) -> None:
        """A server that exits before it is ready: exit 3 (infrastructure), the reason (stderr's first line), no MGSM."""
        code = _run(tmp_path, mgsm_dir, sim_args=("--sim-crash-at-start", "3"))
        s = _summary(tmp_path)
        assert (code, s["status"], s["error"]["stage"]) == (EXIT_INFRA, "server-failed", "launch")
        assert "exited with code 3" in s["message"]
        assert s["mgsm"] is None
        out, err = capsys.readouterr()
        assert err.startswith("mlaprop: the server failed: ") and "exited with code 3" in err.splitlines()[0]
        assert "the server failed" not in out and "report: " in out

    def test_start_timeout_names_the_fix(self, tmp_path: Path, mgsm_dir: Path, capsys: Any) -> None:
        """A server never healthy: exit 3, and stderr's first line says how to give a slow one more time
        (regression: it named the timeout but not --ready-timeout)."""
        run_opts = RunOptions(
            request=LaunchRequest(),
            environment=ENV,
            simulate=True,
            sim_args=("--sim-never-healthy",),
            ready_timeout_s=1.5,
            grace_s=2,
        )
        code = run(run_opts, _opts(tmp_path, mgsm_dir, limit=2))
        s = _summary(tmp_path)
        assert (code, s["status"]) == (EXIT_INFRA, "server-failed")
        first = capsys.readouterr().err.splitlines()[0]
        assert first.startswith(
            "mlaprop: the server failed: server not ready after "
        )  # 1.5 s, or more under load
        assert "raise --ready-timeout" in first

    def test_teardown_failure_fails_the_run(self, tmp_path: Path, mgsm_dir: Path, monkeypatch: Any) -> None:
        """Processes left behind at teardown turn a passing verdict into exit 1, and the report says so."""
        real_stop = server.Server.stop

        def leaky_stop(self: server.Server) -> None:
            real_stop(self)  # really stop it, then report a leftover
            raise server.ServerTeardownError("1 process survived SIGKILL", survivors=[1234], port_busy=False)

        monkeypatch.setattr(server.Server, "stop", leaky_stop)
        code = _run(tmp_path, mgsm_dir, accuracy=1.0, limit=10, determinism=False)
        s = _summary(tmp_path)
        assert (code, s["status"], s["exit_code"]) == (EXIT_INFRA, "teardown-failed", EXIT_INFRA)
        assert s["mgsm"]["verdict"] == "pass"
        assert s["teardown_error"].startswith("1 process survived SIGKILL")

    def test_interrupt_keeps_partial_report(
        self, tmp_path: Path, mgsm_dir: Path, monkeypatch: Any, capsys: Any
    ) -> None:
        """Ctrl-C during the determinism check: the server is torn down, the report says interrupted, and
        ``run`` returns 130 (recorded as such) with one line on stderr instead of a traceback."""

        def interrupted(*a: Any, **k: Any) -> Any:
            raise KeyboardInterrupt

        monkeypatch.setattr(job, "check_determinism", interrupted)
        assert _run(tmp_path, mgsm_dir, limit=10) == EXIT_INTERRUPTED == 130
        s = _summary(tmp_path)
        assert (s["status"], s["exit_code"], s["error"]["stage"]) == ("interrupted", 130, "determinism")
        assert s["mgsm"]["answered"] == 10
        assert len(_items(tmp_path)) == 10
        err = capsys.readouterr().err
        assert err.splitlines() == ["mlaprop: interrupted (KeyboardInterrupt); partial report kept"]

    def test_interrupt_during_mgsm_keeps_the_answered_items(
        self, tmp_path: Path, mgsm_dir: Path, monkeypatch: Any
    ) -> None:
        """Ctrl-C after 5 MGSM answers: summary.json holds the partial MGSM summary (regression: ``null``)."""
        real = job.run_mgsm

        def run_mgsm(*a: Any, on_record: Any, **k: Any) -> Any:
            seen: list[Any] = []

            def record(r: Any) -> None:
                on_record(r)
                seen.append(r)
                if len(seen) == 5:
                    raise KeyboardInterrupt

            return real(*a, on_record=record, **k)

        monkeypatch.setattr(job, "run_mgsm", run_mgsm)
        assert _run(tmp_path, mgsm_dir, accuracy=1.0, limit=40) == 130
        s = _summary(tmp_path)
        assert (s["status"], s["exit_code"], s["error"]["stage"]) == ("interrupted", 130, "mgsm")
        m = s["mgsm"]
        assert (m["n_total"], m["answered"], m["errors"], m["missing"]) == (40, 5, 0, 35)
        assert m["scores"]["simple-evals"]["correct"] == 5
        assert m["aborted"] == "interrupted (KeyboardInterrupt)"
        assert len(_items(tmp_path)) == 5

    def test_sigterm_is_recorded_as_143(self, tmp_path: Path, mgsm_dir: Path, monkeypatch: Any) -> None:
        """SIGTERM (``Terminated``, a ``SystemExit``) propagates; the summary records exit code 143."""

        def terminated(*a: Any, **k: Any) -> Any:
            raise server.Terminated(signal.SIGTERM)

        monkeypatch.setattr(job, "check_determinism", terminated)
        with pytest.raises(server.Terminated) as info:
            _run(tmp_path, mgsm_dir, limit=5)
        assert info.value.code == 143
        s = _summary(tmp_path)
        assert (s["status"], s["exit_code"]) == ("interrupted", 143)
        assert s["message"] == "mlaprop: interrupted (Terminated: terminated by SIGTERM); partial report kept"

    def test_sigterm_is_recorded_before_teardown(
        self, tmp_path: Path, mgsm_dir: Path, monkeypatch: Any
    ) -> None:
        """Regression: the interruption was recorded only after teardown, which may take the whole grace
        period; a runner's SIGKILL in between left summary.json saying ``running``. It is on disk (and on
        stderr) when teardown starts."""

        def terminated(*a: Any, **k: Any) -> Any:
            raise server.Terminated(signal.SIGTERM)

        seen: list[tuple[str, int | None]] = []
        real_stop = server.Server.stop

        def stop(self: server.Server) -> None:
            s = _summary(tmp_path)
            seen.append((s["status"], s["exit_code"]))
            real_stop(self)

        monkeypatch.setattr(job, "check_determinism", terminated)
        monkeypatch.setattr(server.Server, "stop", stop)
        with pytest.raises(server.Terminated):
            _run(tmp_path, mgsm_dir, limit=5)
        assert seen and seen[0] == ("interrupted", 143)
        s = _summary(tmp_path)
        assert (s["status"], s["exit_code"], s["ended_by_signal"]) == ("interrupted", 143, "SIGTERM")
        assert s["message"] == "mlaprop: interrupted (Terminated: terminated by SIGTERM); partial report kept"

    def test_interrupt_after_the_verdict_is_recorded(
        self, tmp_path: Path, mgsm_dir: Path, monkeypatch: Any, capsys: Any
    ) -> None:
        """Ctrl-C during teardown, after a PASS: the verdict stays, the recorded exit code becomes 130."""
        real_stop = server.Server.stop

        def interrupted_stop(self: server.Server) -> None:
            real_stop(self)
            raise KeyboardInterrupt

        monkeypatch.setattr(server.Server, "stop", interrupted_stop)
        assert _run(tmp_path, mgsm_dir, accuracy=1.0, limit=5, determinism=False) == 130
        s = _summary(tmp_path)
        assert (s["status"], s["exit_code"]) == ("pass", 130)
        assert s["message"].startswith("verdict: PASS - ")
        assert s["message"].endswith("; then ended by KeyboardInterrupt")
        assert (
            capsys.readouterr().err
            == "mlaprop: ended by KeyboardInterrupt after the verdict; exit code 130\n"
        )

    def test_evaluate_interrupt_returns_130(self, tmp_path: Path, mgsm_dir: Path, monkeypatch: Any) -> None:
        """``mlaprop eval`` interrupted before any answer: exit 130, recorded, and an (empty) MGSM summary."""

        def run_mgsm(*a: Any, **k: Any) -> Any:
            raise KeyboardInterrupt

        monkeypatch.setattr(job, "run_mgsm", run_mgsm)
        assert evaluate("http://127.0.0.1:1", _opts(tmp_path, mgsm_dir, limit=7)) == 130
        s = _summary(tmp_path)
        assert (s["status"], s["exit_code"]) == ("interrupted", 130)
        assert (s["mgsm"]["answered"], s["mgsm"]["missing"]) == (0, 7)


class TestSecrets:
    """An ``--api-key`` server: the client authenticates, and the key is in no report."""

    def test_api_key(self, tmp_path: Path, mgsm_dir: Path) -> None:
        """The plan's ``--api-key`` is sent as a bearer token and masked in summary.json and the console."""
        request = LaunchRequest(extra_args=("--api-key", "sk-test-secret-123"))
        code = _run(tmp_path, mgsm_dir, accuracy=1.0, limit=5, determinism=False, request=request)
        assert code == EXIT_OK
        text = (tmp_path / "report" / "summary.json").read_text()
        assert "sk-test-secret-123" not in text
        assert "--api-key" in text
        assert "sk-test-secret-123" not in (tmp_path / "report" / "items.jsonl").read_text()
        log = (tmp_path / "report" / "server.log").read_text()
        assert "api_key=" in log and "sk-test-secret-123" not in log


class TestCommandLine:
    """``mlaprop run --simulate`` and ``mlaprop eval --base-url``."""

    def test_run_simulate(self, tmp_path: Path, mgsm_dir: Path, capsys: Any) -> None:
        """The README command prints the plan, the scores with their interval, and the verdict."""
        code = main(
            [
                "run",
                "--simulate",
                "--dataset",
                str(mgsm_path(mgsm_dir)),
                "--report-dir",
                str(tmp_path / "report"),
                "--limit",
                "30",
                "--sim-accuracy",
                "1.0",
                "--batch-sizes",
                "1,2",
                "--prefix-lengths",
                "1,100",
                "--no-progress",
            ],
            environ={},
        )
        out = capsys.readouterr().out
        assert code == EXIT_OK
        assert "plan: nvidia sm90 x1" in out
        assert "(simulated server)" in out
        assert "simple-evals parser (gates): 1.000 (30/30, ±0.000 s.e., 95% CI 0.886-1.000)" in out
        assert "determinism: pass:" in out
        assert "verdict: PASS - MGSM-en 1.000 (30/30" in out
        assert schema_problems(_summary(tmp_path), json.loads(SCHEMA.read_text())) == []

    def test_eval_against_running_server(self, tmp_path: Path, mgsm_dir: Path, capsys: Any) -> None:
        """``eval --base-url`` scores a server someone else started, and reports it."""
        sim = (*job.SIMSERVER_COMMAND,)
        args = ["--sim-dataset", str(mgsm_path(mgsm_dir)), "--sim-accuracy", "0.5"]
        with server.launch(model="m", command_prefix=sim, extra_args=args, ready_timeout=20, grace=2) as srv:
            code = main(
                [
                    "eval",
                    "--base-url",
                    srv.base_url,
                    "--dataset",
                    str(mgsm_path(mgsm_dir)),
                    "--report-dir",
                    str(tmp_path / "report"),
                    "--no-progress",
                ]
            )
        s = _summary(tmp_path)
        assert code == EXIT_FAIL
        assert s["mgsm"]["scores"]["simple-evals"]["correct"] == 125
        assert s["determinism"] is None
        assert "verdict: FAIL - MGSM-en 0.500 (125/250" in capsys.readouterr().out
        assert schema_problems(s, json.loads(SCHEMA.read_text())) == []

    def test_evaluate_dataset_error(self, tmp_path: Path) -> None:
        """A dataset error in ``eval`` is exit 2."""
        opts = EvalOptions(
            dataset=str(tmp_path / "missing.tsv"), report_dir=tmp_path / "report", progress=False
        )
        assert evaluate("http://127.0.0.1:1", opts) == EXIT_USAGE
        assert _summary(tmp_path)["provenance"]["simulated"] is False  # regression: was null


def _no_launch(monkeypatch: Any) -> None:
    def no_launch(*a: Any, **k: Any) -> Any:
        raise AssertionError("a server was launched")

    monkeypatch.setattr(server, "launch", no_launch)


class TestUsageErrors:
    """Bad input exits 2 with one ``mlaprop: error:`` line on stderr that says what is wrong and what to pass,
    before any server is launched and without a traceback (regressions: tracebacks with exit 1, or silent
    fallbacks)."""

    @staticmethod
    def _cli(capsys: Any, argv: list[str], environ: dict[str, str] | None = None) -> tuple[int, str, str]:
        try:
            code = main(argv, environ=environ if environ is not None else {})
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return code, out.out, out.err

    @pytest.mark.parametrize(
        ("flags", "match"),
        [
            (["--report-dir", ""], "argument --report-dir: the path is empty; pass a folder"),
            (["--ready-timeout", "0"], "argument --ready-timeout: expected a finite number of seconds > 0"),
            (["--ready-timeout", "-1"], "argument --ready-timeout: expected a finite number of seconds > 0"),
            (["--ready-timeout", "nan"], "argument --ready-timeout: expected a finite number of seconds > 0"),
            (
                ["--request-timeout", "0"],
                "argument --request-timeout: expected a finite number of seconds > 0",
            ),
            (["--request-timeout", "-5"], "argument --request-timeout: expected a finite number of seconds"),
            (["--request-timeout", "nan"], "argument --request-timeout: expected a finite number of seconds"),
            (["--sim-latency", "nan"], "argument --sim-latency: expected a finite number of seconds >= 0"),
            (["--sim-latency", "-1"], "argument --sim-latency: expected a finite number of seconds >= 0"),
            (
                ["--sim-args", "'unbalanced"],
                "argument --sim-args: not valid shell quoting (No closing quotation)",
            ),
            # regression: --sim-args took any flag, so --enable-deterministic-inference reached the simulated
            # server of an AMD plan unchecked (and the server died with SGLang's ValueError, exit 3)
            (
                [
                    "--vendor",
                    "amd",
                    "--arch",
                    "gfx942",
                    "--sim-args",
                    "--sim-seed 3 --enable-deterministic-inference",
                ],
                "argument --sim-args: --enable-deterministic-inference is not a simulated-server flag",
            ),
            (
                ["--sim-args", "--sim-seed=-1 --rl-on-policy-target=fsdp"],
                "argument --sim-args: --rl-on-policy-target is not a simulated-server flag",
            ),
            (
                ["--batch-sizes", "0,0"],
                "argument --batch-sizes: expected one or more batch sizes from 1 to 1024",
            ),
            (
                ["--batch-sizes", ""],
                "argument --batch-sizes: expected one or more batch sizes from 1 to 1024",
            ),
        ],
    )
    def test_run_flags(
        self, tmp_path: Path, mgsm_dir: Path, monkeypatch: Any, capsys: Any, flags: list[str], match: str
    ) -> None:
        """Each bad ``run`` flag: exit 2, the cause on stderr's first line, nothing written or launched."""
        _no_launch(monkeypatch)
        report = tmp_path / "report"
        argv = ["run", "--simulate", "--dataset", str(mgsm_path(mgsm_dir)), "--report-dir", str(report)]
        code, out, err = self._cli(capsys, [*argv, "--limit", "3", "--no-progress", *flags])
        assert (code, out) == (EXIT_USAGE, "")
        assert err.splitlines()[0].startswith(f"mlaprop: error: {match}")
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert not report.exists()

    @pytest.mark.parametrize("where", ["file", "under-file", "unwritable"])
    def test_report_dir_that_cannot_be_used(
        self, tmp_path: Path, mgsm_dir: Path, monkeypatch: Any, capsys: Any, where: str
    ) -> None:
        """``--report-dir`` at a file, under a file, or unwritable: exit 2 with why and what to pass."""
        _no_launch(monkeypatch)
        afile = tmp_path / "afile"
        afile.write_text("keep me\n")
        report = {"file": afile, "under-file": afile / "report", "unwritable": tmp_path / "ro"}[where]
        if (
            where == "unwritable"
        ):  # root ignores permission bits: make creating the writer fail as EACCES would

            def denied(*a: Any, **k: Any) -> Any:
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr(job, "ReportWriter", denied)
        argv = ["run", "--simulate", "--dataset", str(mgsm_path(mgsm_dir)), "--report-dir", str(report)]
        code, out, err = self._cli(capsys, [*argv, "--limit", "3", "--no-progress"])
        assert (code, out) == (EXIT_USAGE, "")
        expected = {
            "file": f"mlaprop: error: --report-dir {afile} is a file, not a folder; pass a folder",
            "under-file": f"mlaprop: error: --report-dir {report} is under {afile}, which is a file",
            "unwritable": f"mlaprop: error: --report-dir {report} cannot be created or written (Permission "
            "denied); pass a folder you can write to",
        }[where]
        assert err.splitlines() == [err.splitlines()[0]] and err.startswith(expected)
        assert afile.read_text() == "keep me\n"

    @pytest.mark.parametrize(
        ("url", "match"),
        [
            ("notaurl", "'notaurl' is not an http:// or https:// URL (did you mean http://notaurl?)"),
            ("127.0.0.1:24555", "'127.0.0.1:24555' is not an http:// or https:// URL"),
            ("", "the URL is empty"),
            ("http://", "'http://' has no host"),
            ("http://127.0.0.1:99999", "'http://127.0.0.1:99999' has an invalid port"),
        ],
    )
    def test_eval_base_url(self, tmp_path: Path, mgsm_dir: Path, capsys: Any, url: str, match: str) -> None:
        """``eval --base-url`` must be an http(s) URL with a host."""
        report = tmp_path / "report"
        argv = ["eval", "--base-url", url, "--dataset", str(mgsm_path(mgsm_dir)), "--report-dir", str(report)]
        code, out, err = self._cli(capsys, argv)
        assert (code, out) == (EXIT_USAGE, "")
        assert err.startswith(f"mlaprop: error: argument --base-url: {match}")
        assert "such as http://127.0.0.1:30000" in err and len(err.splitlines()) == 1
        assert not report.exists()

    def test_evaluate_checks_the_url_too(self, tmp_path: Path, capsys: Any) -> None:
        """The library entry point refuses the same URLs (exit 2, nothing written)."""
        opts = EvalOptions(report_dir=tmp_path / "report", progress=False)
        assert evaluate("127.0.0.1:24555", opts) == EXIT_USAGE
        assert capsys.readouterr().err.startswith("mlaprop: error: --base-url: '127.0.0.1:24555' is not an")
        assert not (tmp_path / "report").exists()

    @pytest.mark.parametrize(("environ", "state"), [({}, "is not set"), ({"MY_KEY": ""}, "is empty")])
    def test_eval_api_key_env_unset(
        self, tmp_path: Path, mgsm_dir: Path, capsys: Any, environ: dict[str, str], state: str
    ) -> None:
        """``--api-key-env VAR`` with VAR unset or empty: exit 2 saying so (not a run that gets 401s)."""
        argv = ["eval", "--base-url", "http://127.0.0.1:1", "--api-key-env", "MY_KEY"]
        argv += ["--dataset", str(mgsm_path(mgsm_dir)), "--report-dir", str(tmp_path / "report")]
        code, out, err = self._cli(capsys, argv, environ)
        assert (code, out) == (EXIT_USAGE, "")
        assert err.splitlines() == [
            f"mlaprop: error: --api-key-env MY_KEY: the environment variable MY_KEY {state}; export it with "
            "the server's --api-key, or leave out --api-key-env for a server without a key"
        ]

    @pytest.mark.parametrize(
        ("change", "match"),
        [
            ({"batch_sizes": ()}, "--batch-sizes: expected one or more batch sizes from 1 to 1024"),
            ({"batch_sizes": (0, 0)}, "--batch-sizes: expected one or more batch sizes from 1 to 1024"),
            ({"prefix_lengths": (0,)}, "--prefix-lengths: expected lengths between 1 and"),
            (
                {"request_timeout_s": float("nan")},
                "--request-timeout: expected a finite number of seconds > 0",
            ),
            ({"limit": 0}, "--limit: expected a number >= 1, got 0"),
            ({"gate": 1.5}, "--gate: expected a number between 0 and 1, got 1.5"),
            ({"report_dir": " "}, "--report-dir: the path is empty"),
        ],
    )
    def test_library_options(
        self, tmp_path: Path, mgsm_dir: Path, change: dict[str, Any], match: str
    ) -> None:
        """``EvalOptions`` refuses impossible values when built, with the flag and the CLI's message (the
        rule is written once, in :mod:`mlaprop.options`)."""
        with pytest.raises(InvalidOptions) as info:
            _opts(tmp_path, mgsm_dir, **change)
        assert str(info.value).startswith(match)

    @pytest.mark.parametrize(
        ("change", "match"),
        [
            ({"ready_timeout_s": 0.0}, "--ready-timeout: expected a finite number of seconds > 0"),
            ({"ready_timeout_s": float("nan")}, "--ready-timeout: expected a finite number of seconds > 0"),
            ({"sim_latency_s": float("inf")}, "--sim-latency: expected a finite number of seconds >= 0"),
        ],
    )
    def test_library_run_options(self, change: dict[str, Any], match: str) -> None:
        """Impossible ``RunOptions`` too (regression: a ``ValueError`` traceback from the launcher)."""
        with pytest.raises(InvalidOptions) as info:
            RunOptions(environment=ENV, simulate=True, **change)
        assert str(info.value).startswith(match)

    def test_simulator_flags_on_a_real_run_are_refused(self) -> None:
        """Regression: ``mlaprop run -- --sim-crash-at-start 0`` (no --simulate) launched SGLang with the
        simulator's flag, which SGLang's parser refuses at start-up (exit 3); it is a usage error before
        launch. The simulator (``--simulate`` or a command prefix of one's own) still gets them."""
        request = LaunchRequest(extra_args=("--mem-fraction-static", "0.8", "--sim-crash-at-start=0"))
        with pytest.raises(InvalidOptions) as info:
            RunOptions(request=request, environment=ENV)
        assert str(info.value).startswith("--sim-crash-at-start is a simulated-server flag")
        RunOptions(request=request, environment=ENV, simulate=True)
        RunOptions(request=request, environment=ENV, command_prefix=("python", "-m", "mlaprop.simserver"))

    def test_dataset_of_another_language(
        self, tmp_path: Path, mgsm_dir: Path, monkeypatch: Any, capsys: Any
    ) -> None:
        """``--lang de`` with the English file: exit 2 before launch (regression: it ran, silently)."""
        _no_launch(monkeypatch)
        report = tmp_path / "report"
        argv = ["run", "--simulate", "--lang", "de", "--dataset", str(mgsm_path(mgsm_dir))]
        code, out, err = self._cli(capsys, [*argv, "--report-dir", str(report), "--no-progress"])
        assert code == EXIT_USAGE
        assert err.splitlines()[0] == (
            f"mlaprop: dataset error: {mgsm_path(mgsm_dir)}: it is the published file of MGSM-en, but the "
            "language asked for is de. Pass --lang en to evaluate this file, or give the MGSM-de file "
            "(mgsm_de.tsv) to --dataset."
        )
        assert f"report: {report / 'summary.json'}" in out
        assert json.loads((report / "summary.json").read_text())["error"]["stage"] == "dataset"


class TestErrorsOnStderr:
    """Errors go to stderr, whose first line names the cause; progress, verdict and the report path stay on
    stdout (regression: everything was printed to stdout)."""

    def test_dataset_error(self, tmp_path: Path, mgsm_dir: Path, capsys: Any) -> None:
        bad = tmp_path / "bad.tsv"
        bad.write_bytes(b"q\t1\nq\t\n")
        assert _run(tmp_path, mgsm_dir, dataset=str(bad)) == EXIT_USAGE
        out, err = capsys.readouterr()
        assert err.splitlines() == [
            f"mlaprop: dataset error: {bad}:2: the answer is empty (nothing after the TAB). Each line needs an "
            "integer answer after the TAB, such as `question<TAB>18`."
        ]
        assert out.splitlines() == [
            f"report: {tmp_path / 'report' / 'summary.json'} (items: {tmp_path / 'report' / 'items.jsonl'})"
        ]

    def test_compose_error(self, tmp_path: Path, mgsm_dir: Path, capsys: Any) -> None:
        opts = _opts(tmp_path, mgsm_dir)
        code = run(RunOptions(environment=Environment(vendor=Vendor.NONE, arch="", gpu_count=0)), opts)
        assert code == EXIT_USAGE
        out, err = capsys.readouterr()
        assert err.startswith("mlaprop: error: UnsupportedCombination: ")
        assert "UnsupportedCombination" not in out and "report: " in out


class TestReportFolderReuse:
    """A report folder used again."""

    def test_server_log_starts_fresh(self, tmp_path: Path, mgsm_dir: Path) -> None:
        """Two runs into one ``--report-dir``: server.log holds the second run only (regression: appended)."""
        for _ in range(2):
            assert _run(tmp_path, mgsm_dir, accuracy=1.0, limit=3, determinism=False) == EXIT_OK
        log = (tmp_path / "report" / "server.log").read_text()
        assert log.startswith("$ ")
        assert log.count("\n$ ") == 0
        assert log.count("The server is fired up and ready to roll!") == 1
        port = _summary(tmp_path)["server"]["base_url"].rsplit(":", 1)[1]
        assert f"--port {port}" in log.splitlines()[0]  # the second run's server


class TestDatasetEncodings:
    """The simulated model reads the dataset file the way the eval does."""

    def test_bom_and_crlf_dataset_scores_like_the_plain_one(self, tmp_path: Path, mgsm_dir: Path) -> None:
        """A BOM + CRLF copy at accuracy 1.0 scores 3/3 (regression: 2/3, the BOM hid the first question)."""
        variant = tmp_path / "bom_crlf.tsv"
        variant.write_bytes(b"\xef\xbb\xbf" + mgsm_path(mgsm_dir).read_bytes().replace(b"\n", b"\r\n"))
        code = _run(tmp_path, mgsm_dir, accuracy=1.0, limit=3, determinism=False, dataset=str(variant))
        m = _summary(tmp_path)["mgsm"]
        assert (code, m["scores"]["simple-evals"]["correct"], m["answered"]) == (EXIT_OK, 3, 3)


class TestVerdictAndKeyHandling:
    """Failed gates name their cause on stderr; batch sizes are bounded; keys an HTTP header cannot carry are
    refused; URL credentials never reach the report."""

    def test_failed_gate_names_its_cause_on_stderr(self, tmp_path: Path, mgsm_dir: Path, capsys: Any) -> None:
        """A failed gate exits 1 and its verdict line is on stderr as well as stdout."""
        argv = ["run", "--simulate", "--sim-accuracy", "0.5", "--limit", "10", "--no-progress"]
        argv += ["--dataset", str(mgsm_path(mgsm_dir)), "--report-dir", str(tmp_path / "r")]
        code, out, err = TestUsageErrors._cli(capsys, argv)
        assert code == EXIT_FAIL
        assert err.splitlines()[0].startswith("verdict: FAIL - MGSM-en 0.")
        assert "verdict: FAIL" in out

    @pytest.mark.parametrize("sizes", ["100000", "1,2,1025"])
    def test_batch_sizes_are_bounded(self, tmp_path: Path, mgsm_dir: Path, capsys: Any, sizes: str) -> None:
        """A determinism batch above 1024 is refused before launch instead of running for ever."""
        argv = ["run", "--simulate", "--batch-sizes", sizes, "--dataset", str(mgsm_path(mgsm_dir))]
        argv += ["--report-dir", str(tmp_path / "r")]
        code, out, err = TestUsageErrors._cli(capsys, argv)
        assert (code, out) == (EXIT_USAGE, "")
        assert "batch sizes from 1 to 1024" in err.splitlines()[0]

    def test_non_ascii_api_key_is_refused_before_launch(
        self, tmp_path: Path, mgsm_dir: Path, capsys: Any
    ) -> None:
        """A key an HTTP header cannot carry is refused (run: in the server args; eval: in --api-key-env)."""
        argv = [
            "run",
            "--simulate",
            "--dataset",
            str(mgsm_path(mgsm_dir)),
            "--report-dir",
            str(tmp_path / "r"),
        ]
        code, _, err = TestUsageErrors._cli(capsys, [*argv, "--server-args=--api-key 'ключ'"])
        assert code == EXIT_USAGE and "printable ASCII" in err and "ключ" not in err
        argv = [
            "eval",
            "--base-url",
            "http://127.0.0.1:1",
            "--api-key-env",
            "K",
            "--dataset",
            str(mgsm_path(mgsm_dir)),
        ]
        code, _, err = TestUsageErrors._cli(
            capsys, [*argv, "--report-dir", str(tmp_path / "e")], {"K": "ключ"}
        )
        assert code == EXIT_USAGE and "printable ASCII" in err and "ключ" not in err

    def test_url_credentials_never_reach_the_report(
        self, tmp_path: Path, mgsm_dir: Path, capsys: Any
    ) -> None:
        """``--base-url http://user:pw@host`` is written as ``http://***@host`` in summary.json."""
        argv = ["eval", "--base-url", "http://user:pw1234@127.0.0.1:1", "--limit", "1", "--no-progress"]
        argv += [
            "--dataset",
            str(mgsm_path(mgsm_dir)),
            "--report-dir",
            str(tmp_path / "e"),
            "--request-timeout",
            "1",
        ]
        TestUsageErrors._cli(capsys, argv)
        text = (tmp_path / "e" / "summary.json").read_text()
        assert "pw1234" not in text and "http://***@127.0.0.1:1" in text


class TestCIView:
    """What a CI job sees: exit code per failure class, a truthful and documented summary.json with
    provenance, items in question order, heartbeats, the step summary, and the ``MLAPROP_*`` defaults."""

    def test_summary_matches_its_schema_with_provenance(self, tmp_path: Path, mgsm_dir: Path) -> None:
        """A finished run's summary.json passes the shipped schema and carries host, versions, finish time
        and retry counts (5xx retries included)."""
        code = _run(
            tmp_path,
            mgsm_dir,
            accuracy=1.0,
            sim_args=("--sim-error-every", "10"),
            limit=20,
            determinism=False,
        )
        s = _summary(tmp_path)
        assert code == EXIT_OK
        assert schema_problems(s, json.loads(SCHEMA.read_text())) == []
        p = s["provenance"]
        assert p["host"] and p["mlaprop_version"] == s["mlaprop_version"] and p["simulated"] is True
        assert {
            "gpu_model",
            "gpu_driver",
            "cuda_version",
            "rocm_version",
            "torch_version",
            "sglang_installed",
        } <= set(p)
        assert s["finished_at"] >= s["started_at"] and s["ended_by_signal"] is None
        assert s["mgsm"]["retries"]["requests_retried"] >= 1
        assert s["mgsm"]["retries"]["extra_attempts"] >= s["mgsm"]["retries"]["requests_retried"]

    def test_failed_start_matches_the_schema(self, tmp_path: Path, mgsm_dir: Path) -> None:
        """A server that never started: still a valid summary (error section, no MGSM), exit 3."""
        assert _run(tmp_path, mgsm_dir, sim_args=("--sim-crash-at-start", "3")) == EXIT_INFRA == 3
        assert schema_problems(_summary(tmp_path), json.loads(SCHEMA.read_text())) == []

    def test_a_crash_of_mlaprop_itself_is_infrastructure(
        self, tmp_path: Path, mgsm_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
    ) -> None:
        """A bug inside mlaprop (an unexpected exception mid-run) exits 3, never 1 (a quality failure), and the
        summary records the exception; the server is still torn down."""

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise ZeroDivisionError("a bug in mlaprop")

        monkeypatch.setattr(job, "check_determinism", broken)
        with pytest.raises(ZeroDivisionError):  # the job records it, tears down, and lets it propagate
            _run(tmp_path, mgsm_dir, accuracy=1.0, limit=8)
        s = _summary(tmp_path)
        assert s["status"] == "error" and s["exit_code"] == 3
        (tmp_path / "report").rename(tmp_path / "first")
        argv = ["run", "--simulate", "--dataset", str(mgsm_path(mgsm_dir)), "--limit", "8"]
        argv += ["--report-dir", str(tmp_path / "report"), "--sim-accuracy", "1.0"]
        capsys.readouterr()
        assert main(argv) == ExitCode.INFRASTRUCTURE == 3  # the console command exits 3, not Python's 1
        first = capsys.readouterr().err.splitlines()[0]
        assert first == "mlaprop: error (ZeroDivisionError: a bug in mlaprop); partial report kept"
        s = _summary(tmp_path)
        assert s["status"] == "error" and s["exit_code"] == 3
        assert s["error"]["type"] == "ZeroDivisionError" and "a bug in mlaprop" in s["error"]["message"]

    def test_items_in_question_order_with_the_question(self, tmp_path: Path, mgsm_dir: Path) -> None:
        """16 requests in flight finish in any order; items.jsonl is in question order with the question."""
        assert _run(tmp_path, mgsm_dir, accuracy=1.0, limit=40, determinism=False) == EXIT_OK
        items = _items(tmp_path)
        questions = [row.question for row in load_dataset(mgsm_path(mgsm_dir)).items[:40]]
        assert [i["index"] for i in items] == list(range(40))
        assert [i["question"] for i in items] == questions

    def test_determinism_error_is_infrastructure(self, tmp_path: Path, mgsm_dir: Path) -> None:
        """A determinism check that could not finish (status ERROR) exits 3, a FAIL exits 1."""
        result = EvalResult("en", 0, (), 0.0, "m")
        opts = _opts(tmp_path, mgsm_dir, gated=False)
        error = SimpleNamespace(passed=False, status="ERROR", reason="server died")
        fail = SimpleNamespace(passed=False, status="FAIL", reason="2 distinct outputs")
        rec = _opts(tmp_path, mgsm_dir)
        assert job.decide(result, error, opts).exit_code == ExitCode.INFRASTRUCTURE  # type: ignore[arg-type]
        assert job.decide(result, fail, rec).exit_code == ExitCode.QUALITY  # type: ignore[arg-type]

    def test_determinism_requests_failing_is_an_error_not_a_failure(
        self, tmp_path: Path, mgsm_dir: Path
    ) -> None:
        """Regression: a real check whose requests failed (HTTP 500, consistent outputs) was reported as
        ``determinism-failed`` (exit 1, "outputs differ"); it could not finish, so it is ``determinism-error``
        (exit 3), in the verdict and in ``summary.json``."""
        from mlaprop.determinism import check_determinism
        from mlaprop.evalclient import ClientConfig
        from mlaprop.report import determinism_summary
        from tests.eval_fixtures import Answer, serve

        config = ClientConfig(max_retries=1, backoff_s=0.01, request_timeout_s=10, progress=False)
        with serve(lambda m, p, b: Answer(500, {"error": "boom"})) as srv:
            det = check_determinism(srv.url, batch_sizes=(1, 2), prefix_lengths=(), config=config)
        assert det.status == "error"
        assert determinism_summary(det)["status"] == "error"
        result = EvalResult("en", 0, (), 0.0, "m")
        outcome = job.decide(result, det, _opts(tmp_path, mgsm_dir, gated=False))
        assert (outcome.status, outcome.exit_code) == ("determinism-error", ExitCode.INFRASTRUCTURE)
        assert "determinism ERROR" in outcome.message

    def test_heartbeat_lines_outside_a_terminal(self, tmp_path: Path, mgsm_dir: Path, capsys: Any) -> None:
        """Not on a terminal, a heartbeat line names the stage and the progress every period."""
        code = _run(tmp_path, mgsm_dir, limit=8, concurrency=1, determinism=False, heartbeat_s=0.05)
        assert code in (EXIT_OK, EXIT_FAIL)
        beats = [x for x in capsys.readouterr().out.splitlines() if x.startswith("heartbeat: ")]
        assert any(x.startswith("heartbeat: MGSM-en, ") and "questions answered" in x for x in beats)

    def test_heartbeat_during_server_start(self, tmp_path: Path, mgsm_dir: Path, capsys: Any) -> None:
        """A slow server start (0.4 s of simulated imports) gets heartbeat lines too."""
        code = _run(
            tmp_path,
            mgsm_dir,
            limit=2,
            determinism=False,
            heartbeat_s=0.05,
            sim_args=("--sim-import-delay", "0.4"),
        )
        assert code in (EXIT_OK, EXIT_FAIL)
        out = capsys.readouterr().out
        assert "heartbeat: server start-up, 0 s, not ready yet" in out

    def test_secret_values_are_masked_everywhere(self, tmp_path: Path, mgsm_dir: Path, capsys: Any) -> None:
        """The value of a secret-named variable is masked by value in the console, summary, items and the
        server log, even where no secret flag name stands beside it."""
        secret = "plainvalue123"
        argv = ["run", "--simulate", "--limit", "3", "--sim-accuracy", "1", "--determinism", "off"]
        argv += ["--dataset", str(mgsm_path(mgsm_dir)), "--report-dir", str(tmp_path / "report")]
        argv += ["--server-log", "--served-model", secret, f"--server-args=--served-model-name {secret}"]
        assert main(argv, environ={"SERVICE_TOKEN": secret}) == EXIT_OK
        console = capsys.readouterr()
        report = tmp_path / "report"
        files = [(report / f).read_text() for f in ("summary.json", "items.jsonl", "server.log")]
        texts = [console.out, console.err, *files]
        assert all(secret not in t for t in texts)
        assert "--served-model-name ***" in (report / "summary.json").read_text()

    def test_environment_defaults_and_step_summary(self, tmp_path: Path, mgsm_dir: Path, capsys: Any) -> None:
        """``MLAPROP_DATASET`` / ``MLAPROP_REPORT_DIR`` are the CLI's defaults (regression: only the GPU
        tests read them), and ``GITHUB_STEP_SUMMARY`` gets a Markdown summary."""
        step = tmp_path / "step.md"
        environ = {
            "MLAPROP_DATASET": str(mgsm_path(mgsm_dir)),
            "MLAPROP_REPORT_DIR": str(tmp_path / "from-env"),
            "GITHUB_STEP_SUMMARY": str(step),
        }
        argv = [
            "run",
            "--simulate",
            "--limit",
            "5",
            "--sim-accuracy",
            "1",
            "--determinism",
            "off",
            "--no-progress",
        ]
        assert main(argv, environ=environ) == EXIT_OK
        s = json.loads((tmp_path / "from-env" / "summary.json").read_text())
        assert s["dataset"]["path"] == str(mgsm_path(mgsm_dir))
        assert "| verdict | **pass** (exit code 0) |" in step.read_text()

    def test_second_run_into_a_busy_folder_is_refused(
        self, tmp_path: Path, mgsm_dir: Path, capsys: Any
    ) -> None:
        """A report folder another run is writing into: exit 2 before launch, the other run's files kept."""
        with ReportWriter(tmp_path / "report") as other:
            other.record(_item(0))
            code = _run(tmp_path, mgsm_dir, limit=3)
        assert code == EXIT_USAGE
        assert "another mlaprop run is writing into" in capsys.readouterr().err
        assert len(_items(tmp_path)) == 1


def _item(index: int) -> Any:
    return ItemRecord(f"mgsm_en_{index:03d}", index, "1", "1", "1", "1", True, True, None, 0.1, 1, "stop", 1)


def _cli_process(argv: list[str], **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mlaprop.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
        start_new_session=True,
    )


def _wait_for(path: Path, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {path}")


@pytest.mark.slow
class TestSignals:
    """A real process, a real signal: the summary says how the job ended, never ``running``."""

    def _start(self, tmp_path: Path, mgsm_dir: Path, **env: str) -> tuple[subprocess.Popen[str], Path]:
        report = tmp_path / "r"
        argv = ["run", "--simulate", "--dataset", str(mgsm_path(mgsm_dir)), "--report-dir", str(report)]
        argv += ["--sim-latency", "0.2", "--concurrency", "2", "--limit", "200", "--no-progress"]
        proc = _cli_process(argv, **env)
        _wait_for(report / "items.jsonl", "mgsm_en_")
        return proc, report

    def test_sighup_is_recorded(self, tmp_path: Path, mgsm_dir: Path) -> None:
        """SIGHUP during the eval: torn down, exit 129, status interrupted (regression: left at running)."""
        proc, report = self._start(tmp_path, mgsm_dir)
        proc.send_signal(signal.SIGHUP)
        proc.communicate(timeout=60)
        s = json.loads((report / "summary.json").read_text())
        assert (proc.returncode, s["status"], s["exit_code"], s["ended_by_signal"]) == (
            129,
            "interrupted",
            129,
            "SIGHUP",
        )

    def test_sigterm_during_eval_is_recorded(self, tmp_path: Path, mgsm_dir: Path) -> None:
        """``mlaprop eval`` (no launcher of its own) on SIGTERM: exit 143 and the summary says so."""
        sim = (*job.SIMSERVER_COMMAND,)
        args = ["--sim-dataset", str(mgsm_path(mgsm_dir)), "--sim-latency", "0.2"]
        report = tmp_path / "e"
        with server.launch(model="m", command_prefix=sim, extra_args=args, ready_timeout=20, grace=2) as srv:
            argv = ["eval", "--base-url", srv.base_url, "--dataset", str(mgsm_path(mgsm_dir))]
            proc = _cli_process([*argv, "--report-dir", str(report), "--concurrency", "2", "--no-progress"])
            _wait_for(report / "items.jsonl", "mgsm_en_")
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
        s = json.loads((report / "summary.json").read_text())
        assert (proc.returncode, s["status"], s["exit_code"], s["ended_by_signal"]) == (
            143,
            "interrupted",
            143,
            "SIGTERM",
        )

    @pytest.mark.parametrize("gap_s", [0.0, 0.05, 0.15])
    def test_double_ctrl_c_is_recorded(self, tmp_path: Path, mgsm_dir: Path, gap_s: float) -> None:
        """Two Ctrl-C in a row (during teardown, or after the report was final): the process ends 130 and
        the summary says so, naming SIGINT (regression: killed by the second signal, -2, while the summary
        said 130)."""
        proc, report = self._start(tmp_path, mgsm_dir)
        proc.send_signal(signal.SIGINT)
        time.sleep(gap_s)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
        s = json.loads((report / "summary.json").read_text())
        assert proc.returncode == s["exit_code"] == 130
        assert (s["status"], s["ended_by_signal"]) == ("interrupted", "SIGINT")

    def test_ascii_console(self, tmp_path: Path, mgsm_dir: Path) -> None:
        """PYTHONIOENCODING=ascii: the run passes and prints '+/-' (regression: UnicodeEncodeError on '±')."""
        report = tmp_path / "a"
        argv = ["run", "--simulate", "--dataset", str(mgsm_path(mgsm_dir)), "--report-dir", str(report)]
        argv += ["--limit", "5", "--sim-accuracy", "1", "--determinism", "off"]
        proc = _cli_process(argv, PYTHONIOENCODING="ascii")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "+/-0.000 s.e." in out
