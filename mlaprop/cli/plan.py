"""``mlaprop env``, ``compose`` and ``preflight``: what mlaprop sees and would launch, without launching.

Imports only the pure core (detection, composition, preflight): no HTTP client, no progress bars.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping

from mlaprop.compose import compose
from mlaprop.environment import DEFAULT_MODEL, Vendor
from mlaprop.exitcodes import ExitCode
from mlaprop.planview import environment_to_dict, plan_to_dict, shell_command
from mlaprop.preflight import preflight
from mlaprop.redact import redact

from .common import (
    add_platform_options,
    add_request_options,
    environment_for,
    one_line_errors,
    platform_from_args,
    request_from_args,
)

__all__ = ["add_compose", "add_env", "add_preflight"]


def _cmd_env(args: argparse.Namespace, environ: Mapping[str, str] | None) -> int:
    env = environment_for(platform_from_args(args), environ)
    if args.json:
        print(json.dumps(environment_to_dict(env), indent=2))
        return ExitCode.OK
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
    return ExitCode.OK


def _cmd_compose(args: argparse.Namespace, environ: Mapping[str, str] | None) -> int:
    request = request_from_args(args)
    env = environment_for(platform_from_args(args), environ, tp=request.tp_size)
    plan = compose(env, request)
    if args.json:
        print(json.dumps(plan_to_dict(plan), indent=2))
        return ExitCode.OK
    print(shell_command(plan))
    if args.explain:
        print()
        print(f"# {env.vendor} {env.arch} x{env.gpu_count}, SGLang {env.sglang_version} rules")
        print(f"# attention backend SGLang will resolve to: {plan.attention_backend}")
        print(f"# deterministic inference: {'on' if plan.deterministic else 'off'}")
        for d in plan.decisions:
            print(f"{d.action.value:>9}  {d.subject}: {redact(d.reason)}")
            print(f"{'':>9}  source: {d.source}")
    return ExitCode.OK


def _cmd_preflight(args: argparse.Namespace, environ: Mapping[str, str] | None) -> int:
    env = environment_for(platform_from_args(args), environ, hardware_speaks=True)
    result = preflight(
        env,
        expect=Vendor(args.expect_vendor) if args.expect_vendor else None,
        model=args.model,
        environ=os.environ if environ is None else environ,
        need_sglang=not args.no_sglang,
    )
    for line in result.checks:
        print(f"ok: {line}")
    return ExitCode.OK


def add_env(sub: argparse._SubParsersAction[argparse.ArgumentParser], help: str) -> None:
    """``mlaprop env``."""
    p = sub.add_parser("env", help=help, description=help)
    add_platform_options(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_env)
    one_line_errors(p)


def add_compose(sub: argparse._SubParsersAction[argparse.ArgumentParser], help: str) -> None:
    """``mlaprop compose``."""
    p = sub.add_parser("compose", help=help, description=help)
    add_platform_options(p)
    add_request_options(p)
    p.add_argument("--explain", action="store_true", help="one line per decision with reason and source")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_cmd_compose)
    one_line_errors(p)


def add_preflight(sub: argparse._SubParsersAction[argparse.ArgumentParser], help: str) -> None:
    """``mlaprop preflight``."""
    p = sub.add_parser("preflight", help=help, description=help)
    add_platform_options(p)
    p.add_argument(
        "--expect-vendor", choices=[Vendor.NVIDIA.value, Vendor.AMD.value], help="vendor this run is for"
    )
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="model that must be loadable (default: %(default)s)"
    )
    p.add_argument("--no-sglang", action="store_true", help="do not require SGLang (simulated runs)")
    p.set_defaults(func=_cmd_preflight)
    one_line_errors(p)
