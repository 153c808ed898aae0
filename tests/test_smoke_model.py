"""Smoke mode's model choice (issue 11): ``--smoke-model`` / ``MLAPROP_SMOKE_MODEL`` parsing, the eval
settings each choice implies (the canary gated at 0.98 over every question), ``CanaryError`` at the
*smoke_model* stage, and the server-vs-reference agreement in ``summary.json``. No torch needed: the canary
is stood in for by a folder with a ``canary.json``, served by the simulated SGLang server."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from mlaprop import job
from mlaprop.canary import CanaryError
from mlaprop.cli import main
from mlaprop.cli.run import smoke_eval_options, smoke_model_choice
from mlaprop.environment import Environment, LaunchRequest, Vendor
from mlaprop.exitcodes import ExitCode
from mlaprop.mgsm import load_dataset
from mlaprop.options import (
    CANARY_GATE,
    SMOKE_QUESTIONS,
    EvalOptions,
    InvalidOptions,
    RunOptions,
    SmokeModel,
    smoke_model,
)
from mlaprop.report import Reporter
from tests.eval_fixtures import mgsm_path
from tests.test_report import _schema, schema_problems

ENV = Environment(vendor=Vendor.NVIDIA, arch="sm90", gpu_count=1)


class TestChoice:
    """Which smoke model, and what it implies for the eval."""

    @pytest.mark.parametrize(
        ("text", "model"),
        [("canary", SmokeModel.CANARY), (" Random ", SmokeModel.RANDOM), ("DUMMY", SmokeModel.DUMMY)],
    )
    def test_names_parse_case_insensitively(self, text: str, model: SmokeModel) -> None:
        """Each choice by name, whatever its case and surrounding spaces."""
        assert smoke_model(text) is model

    def test_an_unknown_name_lists_the_choices(self) -> None:
        """A typo is refused with the three choices named."""
        with pytest.raises(ValueError, match=r"expected one of canary, random, dummy, got 'canary2'"):
            smoke_model("canary2")

    def test_flag_beats_variable_beats_default(self) -> None:
        """``--smoke-model`` wins over ``MLAPROP_SMOKE_MODEL``, which wins over the canary default."""
        env = {"MLAPROP_SMOKE_MODEL": "random"}
        assert smoke_model_choice(SmokeModel.DUMMY, env) is SmokeModel.DUMMY
        assert smoke_model_choice(None, env) is SmokeModel.RANDOM
        assert smoke_model_choice(None, {}) is SmokeModel.CANARY
        assert smoke_model_choice(None, {"MLAPROP_SMOKE_MODEL": "  "}) is SmokeModel.CANARY

    def test_a_bad_variable_is_a_usage_error_naming_it(self) -> None:
        """A bad ``MLAPROP_SMOKE_MODEL`` is an :class:`InvalidOptions` (exit 2) naming the variable."""
        with pytest.raises(InvalidOptions, match=r"^MLAPROP_SMOKE_MODEL: expected one of"):
            smoke_model_choice(None, {"MLAPROP_SMOKE_MODEL": "tiny"})

    def test_only_the_canary_is_gated(self) -> None:
        """The canary: gated at 0.98 (or ``--gate``) over every question; random and dummy: 16 questions
        (or ``--limit``), not gated."""
        base = EvalOptions()
        canary = smoke_eval_options(base, SmokeModel.CANARY, explicit_gate=None)
        assert (canary.gated, canary.gate, canary.limit) == (True, CANARY_GATE, None)
        assert CANARY_GATE == 0.98
        assert smoke_eval_options(base, SmokeModel.CANARY, explicit_gate=0.9).gate == 0.9
        for model in (SmokeModel.RANDOM, SmokeModel.DUMMY):
            opts = smoke_eval_options(base, model, explicit_gate=None)
            assert (opts.gated, opts.limit) == (False, SMOKE_QUESTIONS)
            assert smoke_eval_options(EvalOptions(limit=3), model, explicit_gate=None).limit == 3

    def test_random_and_canary_are_loaded_for_real(self, tmp_path: Path) -> None:
        """Only ``dummy`` adds ``--load-format dummy``: the canary and random weights are read from disk."""
        req = LaunchRequest(extra_args=("--mem-fraction-static", "0.5"))
        dummy = job.smoke_request(req, tmp_path, dummy=True)
        real = job.smoke_request(req, tmp_path, dummy=False)
        assert dummy.extra_args == ("--load-format", "dummy", "--mem-fraction-static", "0.5")
        assert real.extra_args == ("--mem-fraction-static", "0.5") and real.model == str(tmp_path)

    def test_the_cli_registers_canary_build(self, tmp_path: Path, capsys: Any) -> None:
        """``mlaprop canary build`` is reachable through the command registry, its handler is called as
        ``func(args, environ)``: ``--help`` exits 0; a missing dataset (or, without torch, the missing
        torch) is exit 2 with one error line."""
        assert main(["canary", "build", "--help"]) == 0
        assert "--cache-dir" in capsys.readouterr().out
        missing = tmp_path / "none.tsv"
        code = main(["canary", "build", "--dataset", str(missing), "--cache-dir", str(tmp_path / "c")], {})
        assert code == ExitCode.USAGE
        assert capsys.readouterr().err.startswith("mlaprop: error: ")


# ----------------------------------------------------------------------------------- the job end to end


def _fake_canary(folder: Path, mgsm_dir: Path, wrong: tuple[int, ...]) -> Path:
    """A folder shaped like a canary (``config.json``, ``canary.json``) whose reference answers every
    question right except the rows in ``wrong``."""
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    items = load_dataset(mgsm_path(mgsm_dir)).items
    rows = [
        {
            "qid": it.qid,
            "reference": f"Answer: {it.target}",
            "extracted": str(int(it.target.replace(",", "")) + (1 if i in wrong else 0)),
            "target": it.target,
            "margin": 8.27,
        }
        for i, it in enumerate(items)
    ]
    (folder / "canary.json").write_text(json.dumps({"questions": rows}))
    return folder


def _run_canary(tmp_path: Path, mgsm_dir: Path, **kw: Any) -> int:
    """Smoke mode, canary, on a *real-run* path (no ``simulate``: the reference is compared) whose server
    command is the simulator answering every question right."""
    data = str(mgsm_path(mgsm_dir))
    run_opts = RunOptions(
        request=LaunchRequest(
            extra_args=("--sim-dataset", data, "--sim-accuracy", "1.0", "--sim-latency", "0.005")
        ),
        environment=ENV,
        command_prefix=(sys.executable, "-m", "mlaprop.simserver"),
        ready_timeout_s=20,
        grace_s=2,
        preflight=False,
        smoke=True,
        smoke_model=SmokeModel.CANARY,
    )
    opts = EvalOptions(
        dataset=data,
        report_dir=tmp_path / "report",
        concurrency=32,
        progress=False,
        determinism=False,
        gate=CANARY_GATE,
        **kw,
    )
    return job.run(run_opts, opts, reporter=Reporter())


def _summary(tmp_path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((tmp_path / "report" / "summary.json").read_text())
    return data


class TestCanaryInTheJob:
    """The canary in ``mlaprop run --smoke``: its folder from :func:`mlaprop.canary.ensure_canary`, its
    errors at the *smoke_model* stage, and the reference comparison after the eval."""

    def test_reference_agreement_is_recorded_per_question(
        self, tmp_path: Path, mgsm_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
    ) -> None:
        """The server answers all 250 right; the reference differs on 2 rows: ``smoke.reference`` says 248/250
        and lists both rows with both answers; the run passes the 0.98 gate; one line is printed."""
        canary = _fake_canary(tmp_path / "canary", mgsm_dir, wrong=(4, 77))
        seen: list[Any] = []
        monkeypatch.setattr(job, "ensure_canary", lambda path, **kw: seen.append(path) or canary)
        code = _run_canary(tmp_path, mgsm_dir)
        s = _summary(tmp_path)
        assert code == ExitCode.OK, s["message"]
        assert seen == [str(mgsm_path(mgsm_dir))]
        smoke = s["smoke"]
        assert (smoke["model"], smoke["path"], smoke["gated"], smoke["simulated"]) == (
            "canary",
            str(canary),
            True,
            False,
        )
        ref = smoke["reference"]
        assert (ref["total"], ref["same_answer"], ref["rate"]) == (250, 248, 0.992)
        items = load_dataset(mgsm_path(mgsm_dir)).items
        assert [d["qid"] for d in ref["differing"]] == [items[4].qid, items[77].qid]
        first = ref["differing"][0]
        assert first["server"] == items[4].target.replace(",", "")
        assert int(first["reference"]) == int(first["server"]) + 1 and first["margin"] == 8.27
        assert s["mgsm"]["n_total"] == 250 and s["gate"] == CANARY_GATE
        assert "load-format" not in " ".join(s["plan"]["argv"])
        assert "smoke_model" in s["timings_s"]
        assert schema_problems(s, _schema()) == []
        out = capsys.readouterr().out
        assert "canary: server agrees with the reference forward on 248/250 answers" in out

    @pytest.mark.parametrize(
        ("message", "code"),
        [
            ("the canary needs torch, safetensors and tokenizers (No module named 'torch')", ExitCode.USAGE),
            ("building the canary trains a model and needs a GPU", ExitCode.USAGE),
            ("the reference forward of the saved canary answers 240/250 questions", ExitCode.INFRASTRUCTURE),
        ],
    )
    def test_canary_error_stops_before_launch(
        self,
        tmp_path: Path,
        mgsm_dir: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: Any,
        message: str,
        code: int,
    ) -> None:
        """No torch or no GPU: exit 2 with the fix (another smoke model); a canary that misses its reference
        check: exit 3. Either way at the *smoke_model* stage, before any server, with the summary written."""

        def refuse(path: Any, **kw: Any) -> Path:
            raise CanaryError(message)

        monkeypatch.setattr(job, "ensure_canary", refuse)
        assert _run_canary(tmp_path, mgsm_dir) == code
        s = _summary(tmp_path)
        assert s["error"]["stage"] == "smoke_model" and s["error"]["type"] == "CanaryError"
        assert s["server"] is None and s["plan"] is None
        assert s["smoke"]["model"] == "canary" and s["smoke"]["path"] is None
        err = capsys.readouterr().err
        assert f"mlaprop: error: CanaryError: {message}" in err
        assert ("--smoke-model random|dummy" in err) is (code == ExitCode.USAGE)
        assert schema_problems(s, _schema()) == []


class TestSchema:
    """``smoke`` in ``summary.json`` is documented and closed."""

    def test_undocumented_smoke_fields_fail(self) -> None:
        """A field the schema does not name, inside ``smoke`` or a differing row, is caught."""
        props = _schema()["properties"]
        smoke = {
            "model": "canary",
            "path": "/m",
            "gated": True,
            "simulated": False,
            "reference": {
                "total": 1,
                "same_answer": 0,
                "same_text": 0,
                "rate": 0.0,
                "differing": [{"qid": "q", "server": "1", "reference": "2", "margin": None, "x": 1}],
            },
        }
        assert schema_problems(smoke, props["smoke"], "$.smoke") == [
            "$.smoke.reference.differing[0].x: not documented in the schema"
        ]
        assert schema_problems({**smoke, "model": "big"}, props["smoke"], "$.smoke")[0].startswith(
            "$.smoke.model: 'big' not in enum"
        )


class TestCli:
    """``mlaprop run --smoke`` on the simulated server."""

    @pytest.mark.parametrize(
        ("extra", "model", "n", "gate"),
        [((), "canary", 250, CANARY_GATE), (("--smoke-model", "dummy"), "dummy", SMOKE_QUESTIONS, 0.8)],
    )
    def test_smoke_choice_sets_gate_and_questions(
        self, tmp_path: Path, mgsm_dir: Path, extra: tuple[str, ...], model: str, n: int, gate: float
    ) -> None:
        """The canary (default): every question, gate 0.98, and the simulator standing in answers them all
        (exit 0); ``dummy``: 16 questions, not gated."""
        report = tmp_path / "report"
        argv = ["run", "--smoke", "--simulate", "--dataset", str(mgsm_path(mgsm_dir))]
        argv += ["--report-dir", str(report), "--no-progress", "--determinism", "off", *extra]
        assert main(argv, {}) == ExitCode.OK
        s = json.loads((report / "summary.json").read_text())
        assert (s["smoke"]["model"], s["smoke"]["gated"], s["smoke"]["simulated"]) == (
            model,
            model == "canary",
            True,
        )
        assert (s["mgsm"]["n_total"], s["gate"]) == (n, gate)
        if model == "canary":
            assert s["mgsm"]["scores"]["simple-evals"]["correct"] == 250
        assert schema_problems(s, _schema()) == []
