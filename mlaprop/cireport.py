"""What a CI job shows of a run: JUnit XML properties and a GitHub Actions step summary.

:func:`junit_properties` and :func:`step_summary_markdown` are pure functions of a ``summary.json`` dict (as
written today, or with the ``schema_version`` / ``provenance`` fields; any field may be missing).
:func:`append_step_summary` is the one I/O edge: it appends the Markdown to the file named by
``GITHUB_STEP_SUMMARY`` (GitHub Actions' job summary; "Adding a job summary" in GitHub's workflow-commands
documentation), and does nothing when the variable is unset or empty.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mlaprop.compare import determinism_status, gating_parser, lookup, platform_label, run_facts
from mlaprop.redact import redact
from mlaprop.stats import DEFAULT_ALPHA, DEFAULT_POWER, minimum_detectable_drop

__all__ = ["STEP_SUMMARY_VAR", "append_step_summary", "junit_properties", "step_summary_markdown"]

#: The variable GitHub Actions sets to the job summary file of the current step.
STEP_SUMMARY_VAR = "GITHUB_STEP_SUMMARY"


def _gating_score(summary: Mapping[str, Any]) -> Mapping[str, Any] | None:
    scored = lookup(summary, "mgsm", "scores", gating_parser(summary))
    return scored if isinstance(scored, Mapping) and scored.get("n") else None


def _verdict(summary: Mapping[str, Any]) -> str:
    status = summary.get("status")
    return str(status) if isinstance(status, str) and status else "unknown"


def _mdd(scored: Mapping[str, Any] | None) -> float | None:
    if scored is None:
        return None
    try:
        return minimum_detectable_drop(float(scored["score"]), int(scored["n"]))
    except (KeyError, TypeError, ValueError):
        return None


def junit_properties(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The run's result as JUnit ``<property>`` name/value pairs, in a fixed order.

    Names: ``verdict`` (the run's status: pass, fail, error, aborted, interrupted ...), ``exit_code``,
    ``score`` (gating parser, 3 decimals), ``interval`` (95% Wilson, ``low-high``), ``n``,
    ``minimum_detectable_drop``, ``gate``, ``parser``, ``backend``, ``deterministic`` (``true``/``false``),
    ``determinism`` (check status), ``sglang_version`` (installed, else the rules applied), ``gpu``
    (platform label), ``error`` (first line, when the run failed). A value not recorded is left out.
    """
    facts = run_facts(summary)
    scored = _gating_score(summary)
    props: list[tuple[str, str | None]] = [
        ("verdict", _verdict(summary)),
        ("exit_code", None if summary.get("exit_code") is None else str(summary.get("exit_code"))),
    ]
    if scored is not None:
        ci = scored.get("ci95") or [None, None]
        mdd = _mdd(scored)
        props += [
            ("score", f"{float(scored['score']):.3f}"),
            ("interval", f"{float(ci[0]):.3f}-{float(ci[1]):.3f}" if None not in ci else None),
            ("n", str(scored.get("n"))),
            ("minimum_detectable_drop", None if mdd is None else f"{mdd:.3f}"),
        ]
    deterministic = lookup(summary, "plan", "deterministic")
    props += [
        ("gate", facts["gate"]),
        ("parser", gating_parser(summary)),
        ("backend", facts["attention backend"]),
        ("deterministic", None if not isinstance(deterministic, bool) else str(deterministic).lower()),
        ("determinism", determinism_status(summary)),
        ("sglang_version", facts["SGLang installed"] or facts["SGLang rules"]),
        ("gpu", platform_label(summary) if summary.get("environment") else facts["GPU"]),
    ]
    error = summary.get("error")
    if isinstance(error, Mapping):
        first = str(error.get("message") or "").splitlines()
        props.append(
            ("error", f"{error.get('stage', '?')}: {error.get('type', '?')}: {first[0] if first else ''}")
        )
    return [(k, v) for k, v in props if v is not None]


def _cell(value: Any) -> str:
    text = "-" if value is None or value == "" else str(value)
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def step_summary_markdown(summary: Mapping[str, Any], title: str = "mlaprop") -> str:
    """A Markdown block for a CI job summary: a headline with the verdict, then one table of what a reader
    needs a day later (score with interval and minimum detectable drop, determinism, plan, platform,
    versions, errors, timings, report path), and the error when the run did not finish."""
    facts = run_facts(summary)
    verdict = _verdict(summary)
    scored = _gating_score(summary)
    mgsm = summary.get("mgsm") if isinstance(summary.get("mgsm"), Mapping) else {}
    assert isinstance(mgsm, Mapping)
    lang = lookup(summary, "dataset", "lang") or "en"
    where = platform_label(summary) if summary.get("environment") else "platform not detected"
    version = facts["SGLang installed"] or facts["SGLang rules"] or "?"
    head_score = f"MGSM-{lang} {float(scored['score']):.3f}" if scored else "no MGSM score"
    lines = [
        f"### {title}: {verdict.upper()} - {head_score} on {where}, SGLang {version}",
        "",
        "| | |",
        "|---|---|",
        f"| verdict | **{_cell(verdict)}** (exit code {_cell(summary.get('exit_code'))}) |",
    ]
    if scored is not None:
        ci = scored.get("ci95") or [0.0, 0.0]
        mdd = _mdd(scored)
        lines.append(
            f"| MGSM-{_cell(lang)} ({_cell(gating_parser(summary))} parser) | {float(scored['score']):.3f} "
            f"({scored.get('correct')}/{scored.get('n')}), 95% CI {float(ci[0]):.3f}-{float(ci[1]):.3f}, "
            f"gate {_cell(lookup(summary, 'mgsm', 'gate') or summary.get('gate'))}"
            f"{'' if mgsm.get('verdict') is None else ', ' + _cell(mgsm.get('verdict'))} |"
        )
        lines.append(
            "| minimum detectable drop | "
            + ("none detectable at this n" if mdd is None else f"{mdd:.3f}")
            + f" (a second run of the same n, two-sided alpha {DEFAULT_ALPHA:g}, power {DEFAULT_POWER:g}) |"
        )
    for name, other in (lookup(mgsm, "scores") or {}).items():
        if name != gating_parser(summary) and isinstance(other, Mapping) and other.get("n"):
            lines.append(
                f"| {_cell(name)} parser | {float(other['score']):.3f} ({other.get('correct')}/{other.get('n')}) |"
            )
    if mgsm:
        retries = mgsm.get("retries")
        lines.append(
            f"| answered / errors | {_cell(mgsm.get('answered'))} of {_cell(mgsm.get('n_total'))}, "
            f"{_cell(mgsm.get('errors'))} errors"
            + (
                f", {_cell(retries.get('requests_retried'))} requests retried "
                f"({_cell(retries.get('extra_attempts'))} extra attempts)"
                if isinstance(retries, Mapping)
                else ("" if retries is None else f", {_cell(retries)} retries")
            )
            + " |"
        )
    det = summary.get("determinism")
    det_text = determinism_status(summary)
    if isinstance(det, Mapping) and det.get("reason"):
        reason = str(det.get("reason"))  # it already starts with "pass: " / "fail: " / "error: "
        det_text = reason if reason.startswith(f"{det_text}:") else f"{det_text}: {reason}"
    lines.append(f"| determinism check | {_cell(det_text)} |")
    for label, key in (
        ("attention backend", "attention backend"),
        ("deterministic inference", "deterministic"),
        ("KV cache", "KV cache"),
        ("tp", "tp"),
        ("model", "model"),
        ("SGLang installed", "SGLang installed"),
        ("SGLang rules", "SGLang rules"),
        ("GPU", "GPU"),
        ("driver", "driver"),
        ("CUDA", "CUDA"),
        ("ROCm", "ROCm"),
        ("torch", "torch"),
        ("host", "host"),
        ("mlaprop", "mlaprop"),
    ):
        if facts.get(key) is not None:
            lines.append(f"| {label} | {_cell(facts[key])} |")
    timings = summary.get("timings_s")
    if isinstance(timings, Mapping) and timings:
        lines.append(
            "| timings | "
            + _cell(
                ", ".join(f"{k} {float(v):.1f} s" for k, v in timings.items() if isinstance(v, (int, float)))
            )
            + " |"
        )
    report = lookup(summary, "report", "summary")
    if report:
        lines.append(f"| report | `{_cell(report)}` |")
    error = summary.get("error")
    if isinstance(error, Mapping):
        lines += [
            "",
            f"**{_cell(error.get('stage'))} failed**: {_cell(error.get('type'))}: "
            f"{_cell(str(error.get('message') or '').splitlines()[0] if error.get('message') else '')}",
        ]
        tail = error.get("log_tail")
        if isinstance(tail, list) and tail:
            lines += ["", "<details><summary>server log tail</summary>", "", "```"]
            lines += [str(t).replace("```", "'''") for t in tail[-20:]]
            lines += ["```", "", "</details>"]
    elif summary.get("message"):
        lines += ["", _cell(summary.get("message"))]
    return "\n".join(lines) + "\n\n"


def append_step_summary(
    summary: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    redactor: Callable[[str], str] = redact,
) -> Path | None:
    """Append :func:`step_summary_markdown` of ``summary`` (through ``redactor``) to the file named by
    ``GITHUB_STEP_SUMMARY``.

    Args:
        environ: environment variables; ``None`` reads ``os.environ``.
        redactor: applied to the Markdown before it is written (secrets never reach the job page).

    Returns:
        The file written, or ``None`` when ``GITHUB_STEP_SUMMARY`` is unset or empty.

    Raises:
        OSError: the file cannot be opened or written (the caller reports it as a note; the run's verdict
            does not change).
    """
    env = os.environ if environ is None else environ
    target = env.get(STEP_SUMMARY_VAR)
    if not target:
        return None
    path = Path(target)
    text = redactor(step_summary_markdown(summary))
    with path.open("a", encoding="utf-8") as fh:
        fh.write(text)
    return path
