"""The ``mlaprop`` command line.

Exit codes: 0 success (or a passed gate), 1 a failed gate, 2 a usage or environment error.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any

from mlaprop import __version__
from mlaprop.capabilities import KNOWN_VERSIONS
from mlaprop.compose import UnsupportedCombination, compose
from mlaprop.detect import detect_environment
from mlaprop.environment import (
    DEFAULT_MODEL,
    AttentionBackend,
    Environment,
    InvalidEnvironment,
    KVCacheDtype,
    LaunchPlan,
    LaunchRequest,
    Vendor,
)
from mlaprop.preflight import PreflightError
from mlaprop.redact import redact, redact_argv, redact_env

__all__ = ["main", "plan_to_dict", "shell_command"]

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def shell_command(plan: LaunchPlan, *, host: str = "127.0.0.1", port: int | str = 30000) -> str:
    """The plan as one shell-quoted ``python -m sglang.launch_server`` line, environment variables first.
    Secret values (``--api-key``) are shown as ``***``."""
    argv = [
        "python",
        "-m",
        "sglang.launch_server",
        "--model-path",
        plan.model,
        "--host",
        host,
        "--port",
        str(port),
    ]
    argv += list(plan.argv)
    argv = redact_argv(argv)
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(redact_env(plan.env).items())]
    return " ".join([*env, *(shlex.quote(a) for a in argv)])


def plan_to_dict(plan: LaunchPlan) -> dict[str, Any]:
    """A JSON-ready view of a plan for people and reports (enums as their CLI spellings, secret values such as
    ``--api-key`` as ``***``); the launcher uses the plan itself."""
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
    """A JSON-ready view of an environment."""
    data = asdict(environment)
    data["vendor"] = environment.vendor.value
    data["notes"] = list(environment.notes)
    return data


def _add_platform_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("platform (overrides detection; preview another machine)")
    g.add_argument("--vendor", choices=[v.value for v in Vendor], help="GPU vendor (MLAPROP_VENDOR)")
    g.add_argument("--arch", help="GPU architecture: sm80, sm90, sm100, gfx90a, gfx942 ... (MLAPROP_ARCH)")
    g.add_argument(
        "--sglang-version",
        help=f"SGLang version whose rules apply ({KNOWN_VERSIONS[0]}..{KNOWN_VERSIONS[-1]})",
    )
    g.add_argument("--ci-amd", metavar="VALUE", help="treat SGLANG_IS_IN_CI_AMD as set to VALUE")
    g.add_argument("--gpus", type=int, metavar="N", help="visible GPU count (default: detected)")


def _add_request_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("request (defaults: SGLang's test_mla_fp8.py)")
    g.add_argument(
        "--model", default=DEFAULT_MODEL, help="model path or Hugging Face id (default: %(default)s)"
    )
    g.add_argument(
        "--attention-backend", choices=[b.value for b in AttentionBackend], help="force an attention backend"
    )
    g.add_argument(
        "--kv-cache-dtype",
        default=KVCacheDtype.FP8_E5M2.value,
        choices=[d.value for d in KVCacheDtype],
        help="KV-cache dtype (default: %(default)s)",
    )
    g.add_argument("--tp", type=int, default=1, help="tensor parallel size (default: %(default)s)")
    g.add_argument(
        "--kv-heads",
        type=int,
        default=16,
        metavar="N",
        help="the model's KV heads (default: %(default)s, the test model's); decides ROCm's default backend",
    )
    g.add_argument(
        "--no-deterministic", action="store_true", help="do not ask for --enable-deterministic-inference"
    )
    g.add_argument(
        "--server-args",
        default="",
        metavar="ARGS",
        help="extra SGLang server arguments as one string, e.g. --server-args='--mem-fraction-static 0.8'; "
        "or put them after --: mlaprop compose -- --mem-fraction-static 0.8",
    )


def _environment_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None) -> Environment:
    env = dict(os.environ if environ is None else environ)
    if args.vendor:
        env["MLAPROP_VENDOR"] = args.vendor
    if args.arch:
        env["MLAPROP_ARCH"] = args.arch
    if args.sglang_version:
        env["MLAPROP_SGLANG_VERSION"] = args.sglang_version
    if args.ci_amd is not None:
        env["SGLANG_IS_IN_CI_AMD"] = args.ci_amd
    detected = detect_environment(env)
    gpus = args.gpus
    if gpus is None and (args.vendor or args.arch) and detected.gpu_count > 0:
        # A preview of another platform has as many GPUs as tp needs, unless the masks hide them all.
        gpus = max(detected.gpu_count, getattr(args, "tp", 1))
    if gpus is not None:
        detected = replace(detected, gpu_count=gpus)
    return detected


def _request_from_args(args: argparse.Namespace) -> LaunchRequest:
    try:
        extra = tuple(shlex.split(args.server_args)) + tuple(getattr(args, "server_argv", ()))
    except ValueError as exc:
        raise InvalidEnvironment(f"--server-args is not valid shell quoting: {exc}") from None
    return LaunchRequest(
        model=args.model,
        kv_cache_dtype=KVCacheDtype(args.kv_cache_dtype),
        deterministic=not args.no_deterministic,
        attention_backend=AttentionBackend(args.attention_backend) if args.attention_backend else None,
        tp_size=args.tp,
        extra_args=extra,
        kv_heads=args.kv_heads,
    )


def _cmd_env(args: argparse.Namespace, environ: Mapping[str, str] | None) -> int:
    env = _environment_from_args(args, environ)
    if args.json:
        print(json.dumps(environment_to_dict(env), indent=2))
        return EXIT_OK
    print(f"vendor:          {env.vendor}")
    print(f"arch:            {env.arch or '-'}")
    print(f"visible GPUs:    {env.gpu_count}")
    print(f"torch.version.hip set: {env.torch_hip}")
    print(f"CUDA (torch):    {env.cuda_version or '-'}")
    print(f"SGLANG_IS_IN_CI: {env.ci.sglang_is_in_ci!r}")
    print(f"SGLANG_IS_IN_CI_AMD: {env.ci.sglang_is_in_ci_amd!r}")
    print(f"SGLang version:  {env.sglang_version}")
    for note in env.notes:
        print(f"note: {note}")
    return EXIT_OK


def _cmd_compose(args: argparse.Namespace, environ: Mapping[str, str] | None) -> int:
    env = _environment_from_args(args, environ)
    plan = compose(env, _request_from_args(args))
    if args.json:
        print(json.dumps(plan_to_dict(plan), indent=2))
        return EXIT_OK
    print(shell_command(plan))
    if args.explain:
        print()
        print(f"# {env.vendor} {env.arch} x{env.gpu_count}, SGLang {env.sglang_version} rules")
        print(f"# attention backend SGLang will resolve to: {plan.attention_backend}")
        print(f"# deterministic inference: {'on' if plan.deterministic else 'off'}")
        for d in plan.decisions:
            print(f"{d.action.value:>9}  {d.subject}: {redact(d.reason)}")
            print(f"{'':>9}  source: {d.source}")
    return EXIT_OK


def _cmd_preflight(args: argparse.Namespace, environ: Mapping[str, str] | None) -> int:
    from mlaprop.preflight import preflight

    env = _environment_from_args(args, environ)
    expect = Vendor(args.expect_vendor) if args.expect_vendor else None
    result = preflight(
        env,
        expect=expect,
        model=args.model,
        environ=os.environ if environ is None else environ,
        need_sglang=not args.no_sglang,
    )
    for line in result.checks:
        print(f"ok: {line}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``mlaprop``."""
    parser = argparse.ArgumentParser(
        prog="mlaprop",
        description="Compose, launch and verify SGLang's MLA FP8 server test on NVIDIA and AMD GPUs.",
    )
    parser.add_argument("--version", action="version", version=f"mlaprop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p_env = sub.add_parser("env", help="show the detected environment")
    _add_platform_options(p_env)
    p_env.add_argument("--json", action="store_true", help="print JSON")
    p_env.set_defaults(func=_cmd_env)

    p_compose = sub.add_parser(
        "compose", help="print the SGLang launch command composed for this environment"
    )
    _add_platform_options(p_compose)
    _add_request_options(p_compose)
    p_compose.add_argument(
        "--explain", action="store_true", help="one line per decision with reason and source"
    )
    p_compose.add_argument("--json", action="store_true", help="print the plan as JSON")
    p_compose.set_defaults(func=_cmd_compose)

    p_pre = sub.add_parser(
        "preflight",
        help="refuse a GPU run in seconds: wrong vendor, no visible GPU, no SGLang, model not cached",
    )
    _add_platform_options(p_pre)
    p_pre.add_argument(
        "--expect-vendor", choices=[Vendor.NVIDIA.value, Vendor.AMD.value], help="vendor this run is for"
    )
    p_pre.add_argument(
        "--model", default=DEFAULT_MODEL, help="model that must be loadable (default: %(default)s)"
    )
    p_pre.add_argument("--no-sglang", action="store_true", help="do not require SGLang (simulated runs)")
    p_pre.set_defaults(func=_cmd_preflight)

    _add_job_commands(sub)
    return parser


def _add_job_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``run`` and ``eval`` (the main job): see :mod:`mlaprop.runner`."""
    from mlaprop import runner  # imported here: runner imports this module for its shared options

    runner.add_cli_commands(sub)


#: Options whose value is itself a string of arguments, so it may start with "--".
_STRING_OPTIONS = ("--server-args", "--sim-args")


def _glue_string_options(tokens: list[str]) -> list[str]:
    """``--server-args "--disable-cuda-graph"`` as ``--server-args=--disable-cuda-graph``: argparse would
    otherwise read the value as an option and stop with "expected one argument"."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "--":
            out += tokens[i:]
            break
        if tok in _STRING_OPTIONS and i + 1 < len(tokens):
            out.append(f"{tok}={tokens[i + 1]}")
            i += 2
            continue
        out.append(tok)
        i += 1
    return out


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run ``mlaprop``; returns the exit code (0 ok, 1 failed gate, 2 usage/environment error)."""
    parser = build_parser()
    tokens = _glue_string_options(list(sys.argv[1:] if argv is None else argv))
    server_argv: list[str] = []
    if "--" in tokens:  # everything after -- goes to the SGLang server
        cut = tokens.index("--")
        tokens, server_argv = tokens[:cut], tokens[cut + 1 :]
    args = parser.parse_args(tokens)
    args.server_argv = server_argv
    try:
        code: int = args.func(args, environ)
    except (UnsupportedCombination, InvalidEnvironment, PreflightError) as exc:
        kind = type(exc).__name__
        print(f"mlaprop: error: {kind}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mlaprop: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
