"""Tests for :mod:`mlaprop.cireport`: JUnit properties and the GitHub step summary from ``summary.json``,
as written today and with the newer provenance fields, and appending only where ``GITHUB_STEP_SUMMARY``
points."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlaprop.cireport import append_step_summary, junit_properties, step_summary_markdown


def _summary(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "status": "fail",
        "exit_code": 1,
        "gate": 0.8,
        "gating_parser": "simple-evals",
        "dataset": {"lang": "en", "sha256": "50021d0f28cc"},
        "environment": {"vendor": "amd", "arch": "gfx942", "gpu_count": 8, "sglang_version": "0.5.11"},
        "plan": {
            "sglang_version": "0.5.11",
            "argv": ["--kv-cache-dtype", "fp8_e5m2", "--tp-size", "8"],
            "attention_backend": "triton",
            "deterministic": False,
        },
        "mgsm": {
            "gating_parser": "simple-evals",
            "gate": 0.8,
            "verdict": "fail",
            "answered": 250,
            "n_total": 250,
            "errors": 0,
            "scores": {
                "simple-evals": {"correct": 196, "n": 250, "score": 0.784, "ci95": [0.729, 0.831]},
                "robust": {"correct": 199, "n": 250, "score": 0.796, "ci95": [0.742, 0.842]},
            },
        },
        "determinism": None,
        "timings_s": {"launch": 61.25, "mgsm": 40.0},
        "report": {"summary": "/r/summary.json"},
        "message": "verdict: FAIL - MGSM-en 0.784 | below",
    }
    base.update(over)
    return base


def test_junit_properties_of_a_failed_gate() -> None:
    """Every property a dashboard reads, in order, from a summary as written today (no provenance)."""
    assert junit_properties(_summary()) == [
        ("verdict", "fail"),
        ("exit_code", "1"),
        ("score", "0.784"),
        ("interval", "0.729-0.831"),
        ("n", "250"),
        ("minimum_detectable_drop", "0.111"),
        ("gate", "0.8"),
        ("parser", "simple-evals"),
        ("backend", "triton"),
        ("deterministic", "false"),
        ("determinism", "not run"),
        ("sglang_version", "0.5.11"),
        ("gpu", "amd gfx942 x8"),
    ]


def test_junit_properties_prefer_provenance_and_name_the_error() -> None:
    """With provenance the installed SGLang version and the GPU model are used; an error adds its first line;
    a run that never scored has no score properties."""
    props = dict(
        junit_properties(
            _summary(
                status="error",
                exit_code=3,
                mgsm=None,
                provenance={"gpu": {"name": "AMD Instinct MI300X"}, "sglang_version": "0.5.11.post1"},
                error={"stage": "launch", "type": "ServerExited", "message": "exit code 1\nValueError: x"},
            )
        )
    )
    assert props["sglang_version"] == "0.5.11.post1"
    assert props["gpu"] == "AMD Instinct MI300X (amd gfx942) x8"
    assert props["error"] == "launch: ServerExited: exit code 1"
    assert "score" not in props and props["verdict"] == "error" and props["exit_code"] == "3"


def test_step_summary_markdown_is_one_table_with_escaped_cells() -> None:
    """The headline gives verdict, score, platform and version; pipes in values cannot break the table;
    the minimum detectable drop states alpha and power."""
    md = step_summary_markdown(_summary())
    lines = md.splitlines()
    assert lines[0] == "### mlaprop: FAIL - MGSM-en 0.784 on amd gfx942 x8, SGLang 0.5.11"
    assert "| MGSM-en (simple-evals parser) | 0.784 (196/250), 95% CI 0.729-0.831, gate 0.8, fail |" in lines
    assert (
        "| minimum detectable drop | 0.111 (a second run of the same n, two-sided alpha 0.05, power 0.8) |"
        in lines
    )
    assert "| robust parser | 0.796 (199/250) |" in lines
    assert "| tp | 8 |" in lines and "| timings | launch 61.2 s, mgsm 40.0 s |" in lines
    assert "verdict: FAIL - MGSM-en 0.784 \\| below" in md
    table = [line for line in lines if line.startswith("|")]
    assert all(line.count("|") - line.count("\\|") == 3 for line in table), table


def test_step_summary_shows_the_log_tail_of_a_server_failure() -> None:
    """A launch failure: the stage and cause in bold, the log tail folded in a details block."""
    md = step_summary_markdown(
        _summary(
            status="error",
            mgsm=None,
            error={
                "stage": "launch",
                "type": "ServerExited",
                "message": "exit 1",
                "log_tail": ["a", "ValueError: b"],
            },
        )
    )
    assert "**launch failed**: ServerExited: exit 1" in md
    assert "<details><summary>server log tail</summary>" in md and "ValueError: b" in md


def test_append_only_where_the_variable_points(tmp_path: Path) -> None:
    """Unset or empty ``GITHUB_STEP_SUMMARY``: nothing written; set: each call appends one block, through
    the redactor."""
    target = tmp_path / "summary.md"
    assert append_step_summary(_summary(), {}) is None
    assert append_step_summary(_summary(), {"GITHUB_STEP_SUMMARY": ""}) is None
    assert not target.exists()
    secret = _summary(message="key s3cret leaked")
    for _ in range(2):
        assert (
            append_step_summary(
                secret, {"GITHUB_STEP_SUMMARY": str(target)}, lambda s: s.replace("s3cret", "***")
            )
            == target
        )
    text = target.read_text(encoding="utf-8")
    assert text.count("### mlaprop: FAIL") == 2
    assert "s3cret" not in text and "key *** leaked" in text


def test_step_summary_as_a_real_run_writes_it() -> None:
    """Regressions from a fresh user's simulated runs: retries were printed as a Python dict, the
    determinism reason as "pass: pass: ...", the rules' SGLang version as "SGLang installed" when SGLang is
    not installed, and "tp 1" for a run refused before it had a plan (asked for --tp 3)."""
    md = step_summary_markdown(
        _summary(
            mgsm={**_summary()["mgsm"], "retries": {"requests_retried": 2, "extra_attempts": 5}},
            determinism={"status": "pass", "passed": True, "reason": "pass: 6 prompts, 68 samples"},
            provenance={
                "host": "vm",
                "sglang_installed": None,
                "sglang_rules": "0.5.11",
                "torch_version": None,
            },
        )
    )
    assert "| answered / errors | 250 of 250, 0 errors, 2 requests retried (5 extra attempts) |" in md
    assert "| determinism check | pass: 6 prompts, 68 samples |" in md
    assert "SGLang installed" not in md and "| SGLang rules | 0.5.11 |" in md
    refused = step_summary_markdown(_summary(status="error", exit_code=2, plan=None, mgsm=None))
    assert "| tp |" not in refused
