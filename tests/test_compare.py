"""Tests for ``mlaprop compare`` and ``mlaprop table`` (:mod:`mlaprop.compare`, :mod:`mlaprop.compare_cli`):
runs that differ on known questions are reported with exactly those questions and the exact McNemar p-value;
platform and plan differences are named; damaged reports exit 2 naming the file."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mlaprop.compare import InvalidRun, compare_runs, parse_items, run_facts
from mlaprop.compare_cli import find_reports, load_run, main
from mlaprop.simserver import SimModel
from mlaprop.simserver import load_dataset as sim_rows

N = 40


def _summary(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "mlaprop_version": "0.1.0",
        "status": "pass",
        "exit_code": 0,
        "gate": 0.8,
        "gating_parser": "simple-evals",
        "dataset": {"lang": "en", "sha256": "50021d0f28cc", "canonical": True, "rows": 250},
        "environment": {"vendor": "nvidia", "arch": "sm90", "gpu_count": 1, "sglang_version": "0.5.23"},
        "plan": {
            "model": "m",
            "sglang_version": "0.5.23",
            "argv": [
                "--trust-remote-code",
                "--kv-cache-dtype",
                "fp8_e5m2",
                "--enable-deterministic-inference",
            ],
            "attention_backend": "triton",
            "deterministic": True,
        },
        "mgsm": {"gating_parser": "simple-evals", "gate": 0.8},
        "determinism": {"passed": True},
    }
    base.update(over)
    return base


def _write_run(
    folder: Path, right: set[int], summary: dict[str, Any], errors: set[int] = frozenset()
) -> Path:  # type: ignore[assignment]
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    order = list(range(1, N + 1))
    random.Random(str(folder)).shuffle(order)  # completion order, as written before issue 13
    lines = []
    for i in order:
        ok = i in right
        err = i in errors
        lines.append(
            json.dumps(
                {
                    "qid": f"mgsm_en_{i:03d}",
                    "index": i,
                    "target": str(i),
                    "response": "...",
                    "extracted": None if err else str(i if ok else i + 1),
                    "correct": None if err else ok,
                    "correct_by": {"simple-evals": None if err else ok, "robust": None if err else ok},
                    "extracted_by": {
                        "simple-evals": None if err else str(i if ok else i + 1),
                        "robust": None,
                    },
                    "error": "HTTP 500" if err else None,
                }
            )
        )
    (folder / "items.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_compare_reports_exactly_the_flipped_questions_and_exact_p(tmp_path: Path) -> None:
    """A right on everything except 5 questions; B loses 9 of A's and gains 1: compare lists exactly those
    10 questions, which run had each right, and p = 22/1024 (exact binomial on 1 vs 9)."""
    a_right = set(range(1, N + 1)) - {2, 4, 6, 8, 10}
    lost = {11, 12, 13, 14, 15, 21, 22, 23, 24}
    gained = {6}
    b_right = (a_right - lost) | gained
    a = load_run(_write_run(tmp_path / "a", a_right, _summary()))
    b = load_run(_write_run(tmp_path / "b", b_right, _summary()))
    c = compare_runs(a, b)
    assert {f.qid for f in c.flips} == {f"mgsm_en_{i:03d}" for i in lost | gained}
    assert {f.qid: f.right_in for f in c.flips}["mgsm_en_006"] == "B"
    assert all(f.right_in == "A" for f in c.flips if f.qid != "mgsm_en_006")
    assert [f.index for f in c.flips] == sorted(lost | gained)  # question order, not completion order
    assert (c.counts.only_a, c.counts.only_b, c.counts.n) == (9, 1, N)
    assert c.p_value == pytest.approx(22 / 1024, rel=1e-12)
    assert c.difference == pytest.approx(-8 / N)
    assert c.significant and c.b_worse
    assert c.interval is not None and c.interval[0] < -8 / N < c.interval[1] < 0
    assert c.differences == ()


def test_unanswered_questions_are_not_paired(tmp_path: Path) -> None:
    """A question with an error in one run is left out of the pairing and counted as unpaired."""
    right = set(range(1, N + 1))
    a = load_run(_write_run(tmp_path / "a", right, _summary()))
    b = load_run(_write_run(tmp_path / "b", right - {7}, _summary(), errors={7, 9}))
    c = compare_runs(a, b)
    assert c.flips == () and c.counts.n == N - 2
    assert c.only_in_a == ("mgsm_en_007", "mgsm_en_009") and c.only_in_b == ()
    assert c.p_value == 1.0


def test_platform_plan_and_determinism_differences_are_named(tmp_path: Path) -> None:
    """NVIDIA deterministic vs AMD non-deterministic on another SGLang: vendor, arch, backend, deterministic
    flag, SGLang version (installed, from provenance), GPU and the determinism check all appear."""
    amd = _summary(
        environment={"vendor": "amd", "arch": "gfx942", "gpu_count": 1, "sglang_version": "0.5.11"},
        plan={
            "model": "m",
            "sglang_version": "0.5.11",
            "argv": ["--trust-remote-code", "--kv-cache-dtype", "fp8_e5m2"],
            "attention_backend": "aiter",
            "deterministic": False,
        },
        determinism=None,
        provenance={"gpu": {"name": "AMD Instinct MI300X"}, "sglang_version": "0.5.11", "rocm": "6.3"},
    )
    nv = _summary(provenance={"gpu": {"name": "NVIDIA H200"}, "sglang_version": "0.5.23", "cuda": "12.8"})
    right = set(range(1, N + 1))
    c = compare_runs(
        load_run(_write_run(tmp_path / "nv", right, nv)), load_run(_write_run(tmp_path / "amd", right, amd))
    )
    diff = {d.field: (d.a, d.b) for d in c.differences}
    assert diff["vendor"] == ("nvidia", "amd")
    assert diff["arch"] == ("sm90", "gfx942")
    assert diff["GPU"] == ("NVIDIA H200", "AMD Instinct MI300X")
    assert diff["attention backend"] == ("triton", "aiter")
    assert diff["deterministic"] == ("yes", "no")
    assert diff["SGLang installed"] == ("0.5.23", "0.5.11")
    assert diff["determinism check"] == ("pass", "not run")
    assert "server arguments" in diff
    assert c.determinism == ("pass", "not run")


def test_old_summary_without_provenance_is_read() -> None:
    """A summary from before schema_version/provenance: facts fall back to environment and plan."""
    facts = run_facts(_summary())
    assert facts["SGLang installed"] is None and facts["SGLang rules"] == "0.5.23"
    assert facts["KV cache"] == "fp8_e5m2" and facts["tp"] == "1" and facts["GPU"] is None


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (['{"qid": "a", "correct": true}', "{not json"], r"items.jsonl:2: not JSON"),
        (['["x"]'], r"items.jsonl:1: not an item"),
        (["[" * 100_000 + "]" * 100_000], r"items.jsonl:1: not an item \(JSON nested too deeply\)"),
        (
            [
                '{"qid": "q1", "correct": true, "extracted": "1"}',
                '{"qid": "q1", "correct": false, "extracted": "2"}',
            ],
            r"q1 appears twice with different outcomes",
        ),
    ],
)
def test_damaged_items_name_the_line(lines: list[str], match: str) -> None:
    """Damaged items.jsonl (a torn line, two runs in one folder) is refused naming file and line."""
    with pytest.raises(InvalidRun, match=match):
        parse_items(lines, "simple-evals")


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """compare exits 0, 1 with --fail-if-worse when B is significantly lower, 2 for a missing report; the
    JSON lists every flip and the p-value."""
    a_right = set(range(1, N + 1))
    b_right = a_right - set(range(1, 11))
    a = _write_run(tmp_path / "a", a_right, _summary())
    b = _write_run(tmp_path / "b", b_right, _summary())
    assert main(["compare", str(a), str(b / "summary.json"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mcnemar_exact_p"] == pytest.approx(2 / 1024)
    assert [f["qid"] for f in out["flips"]] == [f"mgsm_en_{i:03d}" for i in range(1, 11)]
    assert out["minimum_detectable_drop"]["alpha"] == 0.05 and out["minimum_detectable_drop"]["power"] == 0.8
    assert main(["compare", str(a), str(b), "--fail-if-worse"]) == 1
    assert main(["compare", str(b), str(a), "--fail-if-worse"]) == 0
    capsys.readouterr()
    assert main(["compare", str(a), str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlaprop: error: ") and "nope: no such file" in err


def test_the_same_run_twice_is_named(tmp_path: Path) -> None:
    """Regression: ``compare A A`` (or a copy of A) said only "no significant difference"; it warns that
    nothing was compared with another run. Two runs are not confused with each other."""
    right = set(range(1, N + 1))
    one = _summary(started_at="2026-12-02T15:00:00+00:00", report={"summary": "/r/one/summary.json"})
    two = _summary(started_at="2026-12-02T15:10:00+00:00", report={"summary": "/r/one/summary.json"})
    a = load_run(_write_run(tmp_path / "a", right, one))
    copy = load_run(_write_run(tmp_path / "copy", right, one))
    b = load_run(_write_run(tmp_path / "b", right, two))
    assert any("A and B are the same run" in w for w in compare_runs(a, a).warnings)
    assert any("A and B are the same run" in w for w in compare_runs(a, copy).warnings)
    assert not any("same run" in w for w in compare_runs(a, b).warnings)
    # regression: a run killed mid-eval (status still "running") was compared without a word
    killed = load_run(_write_run(tmp_path / "killed", right, _summary(status="running")))
    assert "run B did not finish (status running: still running, or its process was killed)" in " ".join(
        compare_runs(a, killed).warnings
    )
    assert not any("did not finish" in w for w in compare_runs(a, b).warnings)
    assert not any(
        "same run" in w
        for w in compare_runs(load_run(_write_run(tmp_path / "old", right, _summary())), a).warnings
    )


def test_items_named_by_a_summary_are_read_only_from_the_same_run(tmp_path: Path) -> None:
    """Regression: a summary.json copied alone had its items read from the path it names, even after a later
    run replaced them there: compare paired the wrong run's answers without a word. They are read only
    when the summary beside them is the same run."""
    first = _summary(started_at="2026-12-02T15:00:00+00:00", command="run --simulate")
    first["report"] = {"items": str(tmp_path / "a" / "items.jsonl")}
    _write_run(tmp_path / "a", set(range(1, N + 1)), first)
    (tmp_path / "lone").mkdir()
    (tmp_path / "lone" / "summary.json").write_text(json.dumps(first))
    assert len(load_run(tmp_path / "lone").items) == N  # the same run: its items are found
    later = {**first, "started_at": "2026-12-02T16:00:00+00:00"}
    (tmp_path / "a" / "summary.json").write_text(json.dumps(later))  # a later run into folder a
    with pytest.raises(InvalidRun, match=r"no items\.jsonl beside it"):
        load_run(tmp_path / "lone")


def test_deeply_nested_summary_is_refused_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: a summary.json nested 100,000 deep crashed compare and table with a RecursionError
    traceback (exit 1, read as "B is worse"); it is refused naming the file (exit 2)."""
    good = _write_run(tmp_path / "a", set(range(1, N + 1)), _summary())
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "summary.json").write_text('{"status": ' + "[" * 100_000 + "]" * 100_000 + "}")
    for argv in (["compare", str(good), str(deep)], ["table", str(deep)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("mlaprop: error: ") and "nested too deeply" in err.splitlines()[0]


def test_table_merges_runs_into_platform_by_version(tmp_path: Path) -> None:
    """Three runs on two platforms and two versions: one row per platform, one column per version, each
    score with its n and minimum detectable drop; HTML escapes every value."""
    right = set(range(1, 33))
    _write_run(tmp_path / "fleet" / "h200-0523", right, _summary())
    _write_run(
        tmp_path / "fleet" / "h200-0511",
        right,
        _summary(plan={**_summary()["plan"], "sglang_version": "0.5.11"}),
    )
    _write_run(
        tmp_path / "fleet" / "mi300-0523",
        right - {1},
        _summary(
            environment={"vendor": "amd", "arch": "gfx942", "gpu_count": 1, "sglang_version": "0.5.23"},
            plan={**_summary()["plan"], "attention_backend": "<aiter>", "deterministic": False},
        ),
    )
    assert len(find_reports([tmp_path / "fleet"])) == 3
    md = tmp_path / "t.md"
    assert main(["table", str(tmp_path / "fleet"), "-o", str(md)]) == 0
    text = md.read_text()
    header, _rule, *rows = text.splitlines()[:4]
    assert header == "| platform | SGLang 0.5.11 | SGLang 0.5.23 |"
    assert rows[0].startswith("| amd gfx942 x1 | - | **0.775 [")
    assert rows[1].startswith("| nvidia sm90 x1 | **0.800 [")
    assert "n=40 MDD 0.2" in rows[1]
    assert "two-sided alpha 0.05" in text
    page = tmp_path / "t.html"
    assert main(["table", str(tmp_path / "fleet"), "-o", str(page)]) == 0
    assert "&lt;aiter&gt;" in page.read_text() and "<aiter>" not in page.read_text()


def test_compare_two_simulated_runs_end_to_end(tmp_path: Path, mgsm_dir: Path) -> None:
    """Two real ``mlaprop run --simulate`` runs whose simulated models are right on different seeded
    question sets: ``mlaprop compare`` reports exactly the questions the simulator's ground truth says
    flipped, and the exact p-value for those counts."""
    dataset = mgsm_dir / "mgsm_en.tsv"
    limit = 30
    dirs = []
    for seed in (1, 2):
        report = tmp_path / f"seed{seed}"
        proc = subprocess.run(
            [sys.executable, "-m", "mlaprop.cli", "run", "--simulate", "--vendor", "nvidia", "--arch", "sm90",
             "--dataset", str(dataset), "--limit", str(limit), "--report-dir", str(report), "--no-progress",
             "--determinism", "off", "--sim-accuracy", "0.8", "--sim-latency", "0", f"--sim-args=--sim-seed {seed}"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert proc.returncode in (0, 1), proc.stderr
        dirs.append(report)
    rows = sim_rows(dataset)
    truth = [SimModel.build(rows, 0.8, True, seed).correct for seed in (1, 2)]
    # item index = 0-based dataset row
    lost = {i for i in range(limit) if i in truth[0] and i not in truth[1]}
    gained = {i for i in range(limit) if i not in truth[0] and i in truth[1]}
    assert lost or gained, "seeds 1 and 2 must differ on the first questions for this test to mean anything"
    c = compare_runs(load_run(dirs[0]), load_run(dirs[1]))
    assert {f.index for f in c.flips if f.right_in == "A"} == lost
    assert {f.index for f in c.flips if f.right_in == "B"} == gained
    from math import comb

    n, k = len(lost) + len(gained), min(len(lost), len(gained))
    assert c.p_value == pytest.approx(min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n), rel=1e-12)
