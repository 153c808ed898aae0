"""The contract between mlaprop's plans and SGLang's own argument pipeline, as one checkable function.

:func:`check` composes a plan for an environment and a request and asks the installed SGLang (through
:mod:`tests.contract.sglang_sim`) what it makes of it. A :class:`Verdict` says whether they agree:

- a plan: its argv passes SGLang's parser, SGLang resolves it without an error, and the attention backend
  SGLang resolves is ``plan.attention_backend``;
- a refusal (``UnsupportedCombination``): the request as the old composition would have passed it (the
  flags asked for, the deterministic flag whenever deterministic inference is wanted, no backend chosen
  for the platform) is one SGLang rejects too, or one it resolves to a backend that has no kernels there
  (``mlaprop.capabilities.backend_runs_on``). Refusals of mlaprop's own policy (the deterministic flag
  forced where an AMD signal is present; FP4 KV caches) are reported as such.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from mlaprop.args import read_server_args
from mlaprop.capabilities import Capabilities, backend_runs_on, capabilities_for
from mlaprop.compose import (
    DETERMINISTIC_FLAG,
    FP4_KV_CACHE_DTYPES,
    UnsupportedCombination,
    amd_signals,
    compose,
)
from mlaprop.environment import AttentionBackend, Environment, LaunchRequest, Vendor
from tests.contract.sglang_sim import SGLang, platform_for

__all__ = ["Kind", "Verdict", "check", "naive_argv", "on_version"]


class Kind(enum.Enum):
    PLAN_AGREES = "plan agrees"
    REFUSAL_CONFIRMED = "refusal confirmed by SGLang"
    POLICY_REFUSAL = "refused by mlaprop policy (SGLang would accept)"
    MISMATCH = "mismatch"


@dataclass(frozen=True)
class Verdict:
    """One comparison of mlaprop with SGLang. ``detail`` is written for the person fixing the rule."""

    kind: Kind
    detail: str
    environment: Environment
    request: LaunchRequest
    argv: tuple[str, ...] = ()
    sglang_backend: str | None = None
    sglang_error: str | None = None
    predicted: str | None = None

    @property
    def ok(self) -> bool:
        return self.kind is not Kind.MISMATCH

    def __str__(self) -> str:
        e, r = self.environment, self.request
        return (
            f"[{self.kind.value}] {self.detail}\n"
            f"  environment: vendor={e.vendor} arch={e.arch} cuda={e.cuda_version} torch_hip={e.torch_hip} "
            f"gpus={e.gpu_count} SGLANG_IS_IN_CI_AMD={e.ci.sglang_is_in_ci_amd!r} sglang={e.sglang_version}\n"
            f"  request: kv={r.kv_cache_dtype} deterministic={r.deterministic} backend={r.attention_backend} "
            f"tp={r.tp_size} extra={list(r.extra_args)}\n"
            f"  argv fed to SGLang: {' '.join(self.argv)}"
        )


def on_version(environment: Environment, version: str) -> Environment:
    """``environment`` running the installed SGLang ``version`` (the contract is per installed version)."""
    return replace(environment, sglang_version=version)


def naive_argv(request: LaunchRequest) -> tuple[str, ...]:
    """What the old composition (SGLang's ``test_mla_fp8.py`` before mlaprop) passes for ``request``:
    the options asked for, the deterministic flag whenever deterministic inference is wanted, and the
    user's extra arguments verbatim (argparse keeps the last of a repeated option)."""
    argv: list[str] = []
    if request.trust_remote_code:
        argv.append("--trust-remote-code")
    argv += ["--kv-cache-dtype", request.kv_cache_dtype.value]
    if request.tp_size > 1:
        argv += ["--tp-size", str(request.tp_size)]
    if request.attention_backend is not None:
        argv += ["--attention-backend", request.attention_backend.value]
    if request.deterministic:
        argv.append(DETERMINISTIC_FLAG)
    argv += request.extra_args
    return tuple(argv)


def _effective_tp(argv: tuple[str, ...]) -> int:
    """The tensor parallel size argparse keeps from ``argv`` (the last ``--tp-size``; 1 when absent)."""
    tp = 1
    for i, token in enumerate(argv):
        if token == "--tp-size" and i + 1 < len(argv) and argv[i + 1].isdigit():
            tp = int(argv[i + 1])
        elif token.startswith("--tp-size=") and token.split("=", 1)[1].isdigit():
            tp = int(token.split("=", 1)[1])
    return max(tp, 1)


def _user_deterministic(request: LaunchRequest, version: str) -> bool:
    """The user's extra arguments turn deterministic inference on as SGLang reads them (any spelling)."""
    try:
        return read_server_args(request.extra_args, version).deterministic
    except ValueError:
        return DETERMINISTIC_FLAG in request.extra_args


def _user_kv(request: LaunchRequest, version: str) -> str:
    """The KV-cache dtype SGLang reads: the user's extra ``--kv-cache-dtype`` (any spelling) or the request's."""
    try:
        return read_server_args(request.extra_args, version).kv_cache_dtype or request.kv_cache_dtype.value
    except ValueError:
        return request.kv_cache_dtype.value


def _hardware(environment: Environment) -> Vendor:
    """The vendor whose kernels run: AMD whenever SGLang sees ROCm (``is_hip``)."""
    return Vendor.AMD if environment.vendor is Vendor.AMD or environment.torch_hip else Vendor.NVIDIA


def _runs(backend: str, environment: Environment) -> bool:
    try:
        member = AttentionBackend(backend)
    except ValueError:  # a backend mlaprop does not model (cutedsl_mla, flex_attention, ...)
        return True
    return backend_runs_on(member, _hardware(environment), environment.arch, environment.sglang_version)


def check(
    sglang: SGLang,
    environment: Environment,
    request: LaunchRequest,
    capabilities: Capabilities | None = None,
) -> Verdict:
    """Compose for ``environment`` (on the installed SGLang version) and compare with SGLang itself.

    ``capabilities`` replaces mlaprop's rules for the version (to show that a wrong rule is caught).
    """
    environment = on_version(environment, sglang.version)
    platform = platform_for(environment)
    try:
        plan = compose(environment, request, capabilities)
    except UnsupportedCombination as exc:
        argv = naive_argv(request)
        outcome = sglang.resolve(argv, platform)
        common = {"environment": environment, "request": request, "argv": argv}
        if not outcome.ok:
            return Verdict(
                Kind.REFUSAL_CONFIRMED,
                f"SGLang rejects it too: {outcome.error}",
                sglang_error=outcome.error,
                **common,
            )
        assert outcome.backend is not None
        if not _runs(outcome.backend, environment):
            return Verdict(
                Kind.REFUSAL_CONFIRMED,
                f"SGLang accepts it but resolves to {outcome.backend}, which has no kernels for "
                f"{_hardware(environment)} {environment.arch}",
                sglang_backend=outcome.backend,
                **common,
            )
        tp = _effective_tp(argv)
        if tp > environment.gpu_count or request.kv_heads % tp:
            return Verdict(
                Kind.POLICY_REFUSAL,
                f"tp {tp} with {environment.gpu_count} GPUs and {request.kv_heads} heads: SGLang's argument "
                "pipeline does not check this; its server fails at start-up",
                sglang_backend=outcome.backend,
                **common,
            )
        if _user_kv(request, environment.sglang_version) in {k.value for k in FP4_KV_CACHE_DTYPES}:
            return Verdict(
                Kind.POLICY_REFUSAL,
                f"mlaprop does not compose FP4 KV caches; SGLang's argument pipeline resolves {outcome.backend} "
                "(their prefill/decode backend rules are checked only at start-up)",
                sglang_backend=outcome.backend,
                **common,
            )
        caps = capabilities_for(environment.sglang_version)
        tokenspeed = request.attention_backend is AttentionBackend.TOKENSPEED_MLA
        if (
            tokenspeed
            and caps.alias_of(AttentionBackend.TOKENSPEED_MLA) is not AttentionBackend.TOKENSPEED_MLA
        ):
            return Verdict(
                Kind.POLICY_REFUSAL,
                f"mlaprop refuses tokenspeed_mla with {request.kv_cache_dtype} KV: SGLang {caps.version} runs it as "
                f"cutedsl_mla and silently switches the KV cache to fp8_e4m3 (resolves {outcome.backend})",
                sglang_backend=outcome.backend,
                **common,
            )
        if amd_signals(environment) and _user_deterministic(request, environment.sglang_version):
            return Verdict(
                Kind.POLICY_REFUSAL,
                f"mlaprop refuses the deterministic flag where an AMD signal is present; SGLang resolves "
                f"{outcome.backend} (known ROCm runtime failures, sglang issue 23536)",
                sglang_backend=outcome.backend,
                **common,
            )
        return Verdict(
            Kind.MISMATCH,
            f"mlaprop refuses ({exc}) but SGLang accepts it and resolves to {outcome.backend}, which runs on "
            f"{_hardware(environment)} {environment.arch}",
            sglang_backend=outcome.backend,
            **common,
        )
    argv = plan.argv
    common = {
        "environment": environment,
        "request": request,
        "argv": argv,
        "predicted": plan.attention_backend.value,
    }
    complaint = sglang.parse(argv)
    if complaint is not None:
        return Verdict(Kind.MISMATCH, f"SGLang's parser refuses the plan's argv: {complaint}", **common)
    outcome = sglang.resolve(argv, platform, plan.env)
    if not outcome.ok:
        return Verdict(
            Kind.MISMATCH,
            f"compose returned a plan (predicting {plan.attention_backend}) that SGLang rejects: {outcome.error}",
            sglang_error=outcome.error,
            **common,
        )
    if outcome.backend != plan.attention_backend.value:
        return Verdict(
            Kind.MISMATCH,
            f"SGLang resolves {outcome.backend}; mlaprop predicts {plan.attention_backend}",
            sglang_backend=outcome.backend,
            **common,
        )
    if bool(outcome.values.get("enable_deterministic_inference")) != plan.deterministic:
        return Verdict(
            Kind.MISMATCH,
            f"SGLang's enable_deterministic_inference is {outcome.values.get('enable_deterministic_inference')}; "
            f"the plan says {plan.deterministic}",
            sglang_backend=outcome.backend,
            **common,
        )
    return Verdict(
        Kind.PLAN_AGREES, f"SGLang resolves {outcome.backend}", sglang_backend=outcome.backend, **common
    )
