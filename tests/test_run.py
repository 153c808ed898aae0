"""Tests for the main job (`mlaprop.runner`) against the simulated SGLang server on the real MGSM-en data."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from mlaprop import runner, server
from mlaprop.cli import main
from mlaprop.environment import Environment, LaunchRequest, Vendor
from mlaprop.mgsm import load_dataset
from mlaprop.runner import EXIT_FAIL, EXIT_OK, EXIT_USAGE, EvalOptions, RunOptions, evaluate, run
from tests.eval_fixtures import mgsm_path

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
        """The simulated server exits after 60 requests: aborted, exit 1, what finished is kept."""
        code = _run(tmp_path, mgsm_dir, sim_args=("--sim-die-after-requests", "60"), limit=200)
        s = _summary(tmp_path)
        assert code == EXIT_FAIL
        assert s["status"] == "aborted"
        assert s["message"].startswith("verdict: ABORTED - ")
        m = s["mgsm"]
        assert 40 <= m["answered"] <= 60
        assert m["aborted"] == s["error"]["message"]
        assert m["answered"] + m["errors"] + m["missing"] == 200
        items = _items(tmp_path)
        assert len(items) == m["answered"] + m["errors"]
        assert sum(1 for i in items if i["error"] is None) == m["answered"]
        assert s["timings_s"]["mgsm"] < 10

    def test_error_rate_aborts(self, tmp_path: Path, mgsm_dir: Path) -> None:
        """Every 3rd request failing (HTTP 400, not retried) passes the 5% bound: aborted, partial results."""
        code = _run(
            tmp_path, mgsm_dir, sim_args=("--sim-error-every", "3", "--sim-error-status", "400"), limit=100
        )
        s = _summary(tmp_path)
        assert (code, s["status"]) == (EXIT_FAIL, "aborted")
        assert "over the 5% bound" in s["error"]["message"]
        assert s["mgsm"]["errors"] > 5

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

    def test_crash_at_start(self, tmp_path: Path, mgsm_dir: Path) -> None:
        """A server that exits before it is ready: exit 1, the reason, no MGSM."""
        code = _run(tmp_path, mgsm_dir, sim_args=("--sim-crash-at-start", "3"))
        s = _summary(tmp_path)
        assert (code, s["status"], s["error"]["stage"]) == (EXIT_FAIL, "server-failed", "launch")
        assert "exited with code 3" in s["message"]
        assert s["mgsm"] is None

    def test_teardown_failure_fails_the_run(self, tmp_path: Path, mgsm_dir: Path, monkeypatch: Any) -> None:
        """Processes left behind at teardown turn a passing verdict into exit 1, and the report says so."""
        real_stop = server.Server.stop

        def leaky_stop(self: server.Server) -> None:
            real_stop(self)  # really stop it, then report a leftover
            raise server.ServerTeardownError("1 process survived SIGKILL", survivors=[1234], port_busy=False)

        monkeypatch.setattr(server.Server, "stop", leaky_stop)
        code = _run(tmp_path, mgsm_dir, accuracy=1.0, limit=10, determinism=False)
        s = _summary(tmp_path)
        assert (code, s["status"], s["exit_code"]) == (EXIT_FAIL, "teardown-failed", EXIT_FAIL)
        assert s["mgsm"]["verdict"] == "pass"
        assert s["teardown_error"].startswith("1 process survived SIGKILL")

    def test_interrupt_keeps_partial_report(self, tmp_path: Path, mgsm_dir: Path, monkeypatch: Any) -> None:
        """Ctrl-C during the determinism check: the server is torn down, the report says interrupted."""

        def interrupted(*a: Any, **k: Any) -> Any:
            raise KeyboardInterrupt

        monkeypatch.setattr(runner, "check_determinism", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path, mgsm_dir, limit=10)
        s = _summary(tmp_path)
        assert s["status"] == "interrupted"
        assert s["mgsm"]["answered"] == 10
        assert len(_items(tmp_path)) == 10


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

    def test_eval_against_running_server(self, tmp_path: Path, mgsm_dir: Path, capsys: Any) -> None:
        """``eval --base-url`` scores a server someone else started, and reports it."""
        sim = (*runner.SIMSERVER_COMMAND,)
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

    def test_evaluate_dataset_error(self, tmp_path: Path) -> None:
        """A dataset error in ``eval`` is exit 2."""
        opts = EvalOptions(
            dataset=str(tmp_path / "missing.tsv"), report_dir=tmp_path / "report", progress=False
        )
        assert evaluate("http://127.0.0.1:1", opts) == EXIT_USAGE
