"""Views of a plan and an environment for people and reports: a shell command line and JSON-ready dicts.

Pure and light (no HTTP client), so ``mlaprop compose`` and the report share one rendering. Secret values
(``--api-key``, ``HF_TOKEN``) are masked here, before anything is printed or written.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict
from typing import Any

from mlaprop.environment import Environment, LaunchPlan
from mlaprop.redact import redact, redact_argv, redact_env

__all__ = ["environment_to_dict", "plan_to_dict", "shell_command"]


def shell_command(plan: LaunchPlan, *, host: str = "127.0.0.1", port: int | str = 30000) -> str:
    """The plan as one shell-quoted ``python -m sglang.launch_server`` line, environment variables first.
    Secret values (``--api-key``) are shown as ``***``."""
    argv = ["python", "-m", "sglang.launch_server", "--model-path", plan.model, "--host", host]
    argv += ["--port", str(port), *plan.argv]
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(redact_env(plan.env).items())]
    return " ".join([*env, *(shlex.quote(a) for a in redact_argv(argv))])


def plan_to_dict(plan: LaunchPlan) -> dict[str, Any]:
    """A JSON-ready view of a plan (enums as their CLI spellings, secret values such as ``--api-key`` as
    ``***``); the launcher uses the plan itself."""
    return {
        "model": plan.model,
        "sglang_version": plan.sglang_version,
        "argv": redact_argv(plan.argv),
        "env": redact_env(plan.env),
        "attention_backend": plan.attention_backend.value,
        "deterministic": plan.deterministic,
        "decisions": [
            {"action": d.action.value, "subject": d.subject, "reason": redact(d.reason), "source": d.source}
            for d in plan.decisions
        ],
    }


def environment_to_dict(environment: Environment) -> dict[str, Any]:
    """A JSON-ready view of an environment (vendor as its CLI spelling, notes as a list)."""
    data = asdict(environment)
    data["vendor"] = environment.vendor.value
    data["notes"] = list(environment.notes)
    return data
