"""Compose the SGLang launch plan for an environment: the pure heart of mlaprop.

``compose(environment, request, capabilities) -> LaunchPlan``: no I/O, no ``os.environ``, no clock. The
same input always gives the same plan, and inputs are never mutated.

The rule that started it all: SGLang's ``test_mla_fp8.py`` adds ``--enable-deterministic-inference``, and
on ROCm the default MLA attention backend ``aiter`` is in no version's deterministic allow-list, so the
server refused to start. mlaprop adds the flag on NVIDIA and never where any AMD signal is present.
"""

from __future__ import annotations

from dataclasses import dataclass

from packaging.version import Version

from mlaprop.args import LAUNCHER_OWNED, REFUSED, ServerArgs, read_server_args, split_simulator_args
from mlaprop.capabilities import (
    NEWEST,
    SOURCES,
    Capabilities,
    backend_runs_on,
    capabilities_for,
    is_blackwell,
    is_hopper,
    is_sm100,
    is_sm120,
    parse_arch,
)
from mlaprop.ci import read_amd_marker
from mlaprop.environment import (
    DEFAULT_MODEL,
    Action,
    AttentionBackend,
    Decision,
    Environment,
    InvalidEnvironment,
    KVCacheDtype,
    LaunchPlan,
    LaunchRequest,
    Vendor,
    parse_enum,
)
from mlaprop.redact import MASK, is_secret_name

__all__ = [
    "DETERMINISTIC_FLAG",
    "FP4_KV_CACHE_DTYPES",
    "SGLangRefusal",
    "UnsupportedCombination",
    "amd_signals",
    "compose",
    "deterministic_error",
    "resolve_backend",
]

DETERMINISTIC_FLAG = "--enable-deterministic-inference"
_B = AttentionBackend
_FOLDED = frozenset({"--attention-backend", "--kv-cache-dtype", "--tp-size", DETERMINISTIC_FLAG})
#: KV-cache dtypes mlaprop does not compose: SGLang's FP4 KV caches constrain the prefill and decode backend
#: pair, speculative decoding and cache tiers in ways an argument preview cannot check (kv_cache_hook.py).
FP4_KV_CACHE_DTYPES = frozenset({KVCacheDtype.NVFP4, KVCacheDtype.FP4_MX_BLOCK16, KVCacheDtype.FP4_E2M1})


class UnsupportedCombination(ValueError):
    """The request cannot run on this environment with this SGLang version (SGLang would refuse it, or
    accept it and fail at run time). The message names what was asked, why it cannot work, and what to do."""


class SGLangRefusal(UnsupportedCombination):
    """SGLang's own argument pipeline raises ``ValueError`` for the request; :attr:`sglang_message` is SGLang's
    exact message (what the simulated server prints)."""

    def __init__(self, message: str, sglang_message: str) -> None:
        super().__init__(message)
        self.sglang_message = sglang_message


def deterministic_error(allowlist: list[str], backend: str) -> str:
    """SGLang's own message when deterministic inference meets a backend outside its allow-list
    (``srt/server_args.py`` ``_handle_deterministic_inference``)."""
    return (
        f"Currently only {allowlist} attention backends are supported for deterministic inference, "
        f"but you explicitly specified '{backend}'."
    )


def deterministic_error_printed(capabilities: Capabilities, backend: str) -> str:
    """:func:`deterministic_error` with the allow-list printed as SGLang ``capabilities.version`` prints it."""
    return (
        f"Currently only {capabilities.printed(capabilities.deterministic_backends)} attention backends are "
        f"supported for deterministic inference, but you explicitly specified '{backend}'."
    )


def amd_signals(environment: Environment) -> tuple[str, ...]:
    """Every AMD signal in ``environment``, described for a human; empty on a plain NVIDIA machine.

    Signals: ROCm hardware, ``torch.version.hip`` set (SGLang's ``is_hip``), and ``SGLANG_IS_IN_CI_AMD``
    true to either of SGLang's parsers (see :mod:`mlaprop.ci`).
    """
    out = []
    if environment.vendor is Vendor.AMD:
        out.append(f"ROCm hardware ({environment.arch or 'unknown arch'})")
    if environment.torch_hip:
        out.append("torch.version.hip is set (SGLang's is_hip)")
    out += [f"{signal} (probed on this machine)" for signal in environment.amd_evidence]
    marker = read_amd_marker(environment.ci)
    if marker.is_amd_signal:
        out.append(
            f"SGLANG_IS_IN_CI_AMD={marker.raw!r} (is_in_amd_ci: {marker.test_utils}, EnvBool: {marker.envbool})"
        )
    return tuple(out)


@dataclass(frozen=True)
class _Resolution:
    backend: AttentionBackend
    steps: tuple[Decision, ...]


def resolve_backend(
    *,
    rocm: bool,
    arch: str,
    cuda_version: str | None,
    capabilities: Capabilities,
    deterministic: bool,
    explicit: AttentionBackend | None,
    kv_cache_dtype: KVCacheDtype,
    tp_size: int,
    kv_heads: int,
    deepseek_family: bool,
    check_radix: bool = False,
) -> tuple[AttentionBackend, tuple[Decision, ...]]:
    """Predict the attention backend SGLang resolves for an MLA model, step by step, as SGLang does.

    Order (``srt/arg_groups/pipeline.py``): up to 0.5.11 the platform default is filled in first and the
    deterministic allow-list checked after; from 0.5.12 the deterministic pass picks ``triton`` (SM100 or
    SM120 with CUDA >= 12.8, DeepSeek-family), ``flashinfer`` (same GPUs, other models) or ``fa3``
    (everything else, SM110, ROCm and pre-Hopper CUDA included). Then ``fa3`` with ``fp8_e5m2`` KV becomes
    ``triton``. The platform default: ``fa3`` on Hopper with CUDA >= 12.3, ``flashinfer`` on SM100 with CUDA
    >= 12.8, ``triton`` elsewhere; on ROCm ``aiter`` for 16 or 128 KV heads per rank, else ``triton``.

    Returns:
        the resolved backend and the :class:`Decision` (``PREDICTED``/``NOTED``) for each step.

    ``check_radix``: also raise SGLang's DeepSeek radix-list ``ValueError`` (0.5.5+) instead of leaving it to
    the caller (the simulated server resolves with it on; ``compose`` checks and avoids it itself).

    Raises:
        SGLangRefusal: SGLang would raise its deterministic ``ValueError`` (the backend, explicit or
            defaulted, is outside ``capabilities.deterministic_backends``, or with ``check_radix`` outside the
            radix list for a DeepSeek-family model); ``sglang_message`` is SGLang's.
    """
    steps: list[Decision] = []
    allow = capabilities.deterministic_allowlist()
    if explicit is not None:
        backend = explicit
        steps.append(
            Decision(Action.PREDICTED, "--attention-backend", f"explicit {backend}", SOURCES["hardware"])
        )
    elif deterministic and capabilities.deterministic_resolves_first:
        if not rocm and (is_sm100(arch, cuda_version) or is_sm120(arch, cuda_version)):
            triton = deepseek_family and capabilities.deterministic_deepseek_triton
            backend = _B.TRITON if triton else _B.FLASHINFER
        else:
            backend = _B.FA3
        steps.append(
            Decision(
                Action.PREDICTED,
                "--attention-backend",
                f"SGLang {capabilities.version}'s deterministic pass picks {backend} before any platform default",
                SOURCES["pipeline_order"],
            )
        )
    else:
        if rocm:
            per_rank = kv_heads // tp_size
            backend = _B.AITER if per_rank in (16, 128) else _B.TRITON
            why = f"ROCm default for MLA with {per_rank} KV heads per rank (aiter for 16 or 128, else triton)"
        else:
            if is_hopper(arch, cuda_version):
                backend, why = _B.FA3, "Hopper (sm90) with CUDA >= 12.3 defaults to fa3"
            elif is_sm100(arch, cuda_version):
                backend, why = (
                    _B.FLASHINFER,
                    f"{arch} (SM100, CUDA >= 12.8) defaults to flashinfer for DeepseekV2 MLA",
                )
            else:
                backend, why = _B.TRITON, f"{arch} defaults to triton for MLA"
        steps.append(Decision(Action.PREDICTED, "--attention-backend", why, SOURCES["default_backend"]))
    if deterministic and backend not in capabilities.deterministic_backends:
        said = deterministic_error_printed(capabilities, backend.value)
        raise SGLangRefusal(
            deterministic_error(allow, backend.value)
            + f" (SGLang {capabilities.version}; deterministic allow-list: {', '.join(allow)})",
            said,
        )
    if (
        check_radix
        and deterministic
        and deepseek_family
        and capabilities.deepseek_needs_radix_backend
        and backend not in capabilities.deepseek_allowed()
    ):
        said = capabilities.deepseek_refusal(backend.value)
        raise SGLangRefusal(said + f" (SGLang {capabilities.version})", said)
    if capabilities.alias_of(backend) is not backend:
        backend = capabilities.alias_of(backend)
        steps.append(
            Decision(
                Action.PREDICTED,
                "--attention-backend",
                f"SGLang {capabilities.version} renames the deprecated {explicit} to {backend}",
                SOURCES["tokenspeed_mla"],
            )
        )
    if backend is _B.FA3 and kv_cache_dtype is KVCacheDtype.FP8_E5M2:
        backend = _B.TRITON
        steps.append(
            Decision(
                Action.PREDICTED,
                "--attention-backend",
                "fa3 only supports fp8_e4m3 KV cache, so SGLang switches fa3 + fp8_e5m2 to triton",
                SOURCES["fa3_fp8_e5m2"],
            )
        )
    return backend, tuple(steps)


def _check_environment(env: Environment) -> bool:
    """Validate vendor/arch agreement; return whether SGLang will see ROCm (``is_hip``)."""
    if env.vendor is Vendor.NONE:
        raise UnsupportedCombination(
            "no GPU found: SGLang needs a GPU for the MLA FP8 server test. To preview the plan for a platform "
            "without one, name it: mlaprop compose --vendor amd --arch gfx942 (or --vendor nvidia --arch sm90)"
        )
    if not env.arch:
        raise InvalidEnvironment(
            f"GPU architecture unknown for vendor {env.vendor}: set MLAPROP_ARCH (or --arch) to a CUDA compute "
            "capability like sm90 or a ROCm target like gfx942"
        )
    family, _ = parse_arch(env.arch)
    expected = "sm" if env.vendor is Vendor.NVIDIA else "gfx"
    if family != expected:
        example = "sm80, sm90, sm100" if expected == "sm" else "gfx90a, gfx942, gfx950"
        raise InvalidEnvironment(
            f"architecture {env.arch!r} does not belong to vendor {env.vendor}: expected one like {example}"
        )
    if env.gpu_count == 0:
        raise UnsupportedCombination(
            "no visible GPU: the device masks (CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES / "
            "ROCR_VISIBLE_DEVICES) hide every device; unset them or list a device"
        )
    return env.vendor is Vendor.AMD or env.torch_hip


def _check_choices(
    caps: Capabilities, backend: AttentionBackend | None, kv: KVCacheDtype, rocm: bool, env: Environment
) -> None:
    """Refuse what this SGLang version's parser or KV-cache checks reject, and the FP4 KV caches."""
    if kv not in caps.kv_cache_dtypes:
        raise UnsupportedCombination(
            f"SGLang {caps.version} has no --kv-cache-dtype {kv} (its parser exits 2); its choices: "
            + ", ".join(sorted(k.value for k in caps.kv_cache_dtypes))
        )
    if backend is not None and backend not in caps.attention_backends:
        raise UnsupportedCombination(
            f"SGLang {caps.version} has no --attention-backend {backend} (its parser exits 2); MLA choices: "
            + ", ".join(sorted(b.value for b in caps.attention_backends))
        )
    if kv in FP4_KV_CACHE_DTYPES:
        raise UnsupportedCombination(
            f"mlaprop does not compose the FP4 KV cache {kv}: SGLang ties it to specific prefill and decode "
            "backends, GPUs and speculative settings that a flag preview cannot check (kv_cache_hook.py). Use "
            "fp8_e4m3 or fp8_e5m2, or launch SGLang directly"
        )
    if kv is KVCacheDtype.MXFP8 and (rocm or not is_blackwell(env.arch, env.cuda_version)):
        raise UnsupportedCombination(
            f"--kv-cache-dtype mxfp8 needs an NVIDIA Blackwell GPU (SM100+, CUDA >= 12.8); this is "
            f"{'ROCm' if rocm else 'NVIDIA'} {env.arch}. Use fp8_e4m3 or fp8_e5m2"
        )


def _read_user_args(request: LaunchRequest, version: str) -> tuple[ServerArgs, list[Decision]]:
    """Read the user's extra arguments as SGLang ``version`` reads them (prefixes, ``=`` forms, last one
    wins); refuse launcher-owned options and those mlaprop cannot check (``--config``, ``--help``)."""
    sglang_args, _ = split_simulator_args(request.extra_args)
    user = read_server_args(sglang_args, version)
    notes: list[Decision] = []
    for opt in user.options:
        said = user.spelled(opt.name)
        said = f" ({said})" if said else ""
        if opt.name in LAUNCHER_OWNED:
            fix = (
                "pass the model with mlaprop's --model"
                if opt.name == "--model-path"
                else "the launcher serves on 127.0.0.1, on a free port it picks itself; leave it out"
            )
            raise InvalidEnvironment(
                f"{opt.name}{said} is set by mlaprop's launcher and cannot be an extra argument (SGLang reads "
                f"unique prefixes such as --por as the full option): {fix}"
            )
        if opt.name in REFUSED:
            raise InvalidEnvironment(f"{opt.name}{said} cannot be an extra argument: {REFUSED[opt.name]}")
        if (
            is_secret_name(opt.name)
            and opt.value is not None
            and not (opt.value.isascii() and opt.value.isprintable())
        ):
            raise InvalidEnvironment(
                f"{opt.name} holds characters other than printable ASCII, which the HTTP Authorization header "
                "clients send it in cannot carry: use an ASCII key"
            )
    for name in user.repeated:
        last = user.get(name)
        values = last.values if last is not None else ()
        shown = MASK if is_secret_name(name) else (" ".join(values) or name)
        notes.append(
            Decision(
                Action.REPLACED,
                name,
                f"given more than once in the extra arguments; the last ({shown}) is used, as SGLang's argparse does",
                "user extra arguments",
            )
        )
    for opt in user.options:
        if opt.abbreviated:
            notes.append(
                Decision(
                    Action.NOTED,
                    opt.name,
                    f"{user.spelled(opt.name)} (argparse takes unique prefixes); mlaprop writes it in full",
                    SOURCES["argparse"],
                )
            )
    return user, notes


def compose(
    environment: Environment,
    request: LaunchRequest | None = None,
    capabilities: Capabilities | None = None,
) -> LaunchPlan:
    """Turn an environment and a request into the SGLang launch plan.

    Args:
        environment: where the server will run (see :func:`mlaprop.detect.detect_environment`).
        request: what the test asks; default: SGLang's ``test_mla_fp8.py`` (``--trust-remote-code
            --kv-cache-dtype fp8_e5m2``, deterministic inference wanted).
        capabilities: SGLang's rules; default: those of ``environment.sglang_version``.

    Returns:
        A :class:`LaunchPlan`: every option once, every added, dropped or replaced option with a
        :class:`Decision` citing its upstream source, and the attention backend SGLang will resolve to.

    Raises:
        UnsupportedCombination: no GPU (``Vendor.NONE``) or every device masked; a tp larger than the visible
            GPUs or not dividing ``request.kv_heads``; ``--enable-deterministic-inference`` in the user's extra
            arguments where an AMD signal is present; a ``--kv-cache-dtype`` or ``--attention-backend`` this
            SGLang version does not have, an FP4 KV cache, ``mxfp8`` off Blackwell; an explicit attention
            backend with no kernels for this GPU, outside the deterministic allow-list or (DeepSeek-family)
            the radix list while deterministic inference is on, outside its KV-dtype limits, or failing
            SGLang's Blackwell + CUDA 12.8 guards. Each message names the value, the rule and what to use.
        InvalidEnvironment: a malformed value (unknown arch, backend, KV dtype, bad extra argument, an
            option the launcher owns, a non-ASCII API key, a version older than known). Valid values are
            listed in the message.
    """
    request = request if request is not None else LaunchRequest()
    try:
        return _compose(environment, request, capabilities)
    except (UnsupportedCombination, InvalidEnvironment) as exc:
        note = _abbreviation_note(request, environment.sglang_version)
        if note and note not in str(exc):
            raise type(exc)(f"{exc} (as SGLang reads the extra arguments: {note})") from None
        raise


def _abbreviation_note(request: LaunchRequest, version: str) -> str:
    try:
        user = read_server_args(request.extra_args, version)
    except (InvalidEnvironment, TypeError):
        return ""
    notes = [user.abbreviations()] if user.abbreviations() else []
    prefill = user.get("--prefill-attention-backend")
    if prefill is not None and user.attention_backend == prefill.value:
        notes.append(
            f"equal --prefill-attention-backend and --decode-attention-backend {prefill.value} are SGLang's "
            f"--attention-backend {prefill.value}"
        )
    return "; ".join(notes)


def _compose(
    environment: Environment,
    request: LaunchRequest,
    capabilities: Capabilities | None,
) -> LaunchPlan:
    """The body of :func:`compose`."""

    rocm = _check_environment(environment)
    known = capabilities_for(environment.sglang_version)  # validates the version
    caps = capabilities if capabilities is not None else known
    decisions: list[Decision] = [
        Decision(Action.NOTED, "environment", note, "mlaprop.detect") for note in environment.notes
    ]
    running = Version(environment.sglang_version)
    if running.base_version != str(running) and running.base_version == caps.version:
        decisions.append(
            Decision(
                Action.NOTED,
                "sglang",
                f"SGLang {environment.sglang_version} is a pre-release, development or local build; the rules of "
                f"{caps.version} are used",
                "mlaprop.capabilities",
            )
        )
    if Version(environment.sglang_version) > Version(NEWEST):
        decisions.append(
            Decision(
                Action.NOTED,
                "sglang",
                f"SGLang {environment.sglang_version} is newer than the newest version mlaprop knows "
                f"({NEWEST}); its rules are used; confirm with `tox -e contract`",
                "mlaprop.capabilities",
            )
        )

    # 1. The user's extra arguments: fold the ones mlaprop composes, keep the rest.
    user, merge_notes = _read_user_args(request, environment.sglang_version)
    decisions += merge_notes
    backend = request.attention_backend
    if user.attention_backend is not None:
        user_backend = parse_enum(AttentionBackend, user.attention_backend, "attention backend")
        both = user.get("--prefill-attention-backend")
        given = (
            f"--prefill-attention-backend and --decode-attention-backend {user_backend} (SGLang makes equal "
            "ones the attention backend)"
            if both is not None and both.value == user.attention_backend
            else f"--attention-backend {user_backend}"
        )
        decisions.append(
            Decision(
                Action.REPLACED,
                "--attention-backend",
                f"the user's {given} replaces "
                + (f"the requested {backend}" if backend else "SGLang's own choice"),
                "user extra arguments",
            )
        )
        backend = user_backend
    kv = request.kv_cache_dtype
    if user.kv_cache_dtype is not None:
        user_kv = parse_enum(KVCacheDtype, user.kv_cache_dtype, "KV-cache dtype")
        decisions.append(
            Decision(
                Action.REPLACED,
                "--kv-cache-dtype",
                f"the user's {user_kv} replaces {kv}",
                "user extra arguments",
            )
        )
        kv = user_kv
    tp = request.tp_size
    if user.tp_size is not None:
        raw_tp = user.tp_size
        if not raw_tp.isdigit() or int(raw_tp) < 1:
            raise InvalidEnvironment(f"--tp-size must be a whole number >= 1, got {raw_tp!r}")
        decisions.append(
            Decision(
                Action.REPLACED, "--tp-size", f"the user's tp {raw_tp} replaces {tp}", "user extra arguments"
            )
        )
        tp = int(raw_tp)
    user_forces_deterministic = user.deterministic
    # 2. Deterministic inference: on NVIDIA, never where any AMD signal is present.
    signals = amd_signals(environment)
    wanted = request.deterministic or user_forces_deterministic
    marker = read_amd_marker(environment.ci)
    if marker.parsers_disagree or marker.unrecognised:
        decisions.append(
            Decision(
                Action.NOTED,
                "SGLANG_IS_IN_CI_AMD",
                f"value {marker.raw!r} reads as {marker.test_utils} to SGLang's is_in_amd_ci (the MLA FP8 test) "
                f"and {marker.envbool} to EnvBool (the launcher); mlaprop counts it as an AMD signal only if either "
                "says true",
                SOURCES["amd_ci_marker"] + "; " + SOURCES["envbool"],
            )
        )
    if signals and environment.vendor is Vendor.NVIDIA:
        decisions.append(
            Decision(
                Action.NOTED,
                "vendor",
                f"AMD signal on NVIDIA hardware ({'; '.join(signals)}): the AMD signal wins for the "
                "deterministic flag, as in SGLang's test",
                SOURCES["test"],
            )
        )
    deterministic = False
    dcar = user.get("--disable-custom-all-reduce") is not None
    if caps.rocm_rccl_check and rocm and user_forces_deterministic and tp > 2 and dcar:
        raise UnsupportedCombination(
            f"SGLang {caps.version} refuses deterministic inference on ROCm with --tp-size {tp} and "
            '--disable-custom-all-reduce: "the all-reduce would run through RCCL, which is not batch-invariant" '
            f"({SOURCES['rocm_rccl']}); mlaprop leaves deterministic inference out on AMD anyway: remove "
            f"{user.deterministic_by}"
        )
    if wanted and signals:
        if user_forces_deterministic:
            by = user.deterministic_by or DETERMINISTIC_FLAG
            said = user.spelled(by)
            how = (f"{said}, so {by}" if said else by) + " was passed as an extra argument"
            if by != DETERMINISTIC_FLAG:
                how += f" and turns SGLang's {DETERMINISTIC_FLAG} on (_handle_deterministic_inference)"
            raise UnsupportedCombination(
                f"{how}, but this is an AMD/ROCm environment "
                f"({'; '.join(signals)}): SGLang's ROCm MLA backend aiter is in no version's deterministic "
                "allow-list, and triton on ROCm hits upstream bugs (sglang issue 23536). Remove the flag; "
                "mlaprop leaves it out on AMD by design"
            )
        decisions.append(
            Decision(
                Action.DROPPED,
                DETERMINISTIC_FLAG,
                f"AMD signal ({'; '.join(signals)}): the ROCm default MLA backend aiter is not in the "
                f"deterministic allow-list {caps.deterministic_allowlist()} (SGLang raised ValueError up to "
                "0.5.11), and triton on ROCm hits upstream runtime bugs",
                SOURCES["test"] + "; " + SOURCES["deterministic_allowlist"],
            )
        )
    elif wanted:
        deterministic = True
    else:
        decisions.append(
            Decision(Action.NOTED, DETERMINISTIC_FLAG, "deterministic inference not requested", "request")
        )

    if tp > environment.gpu_count:
        raise UnsupportedCombination(
            f"tensor parallel size {tp} needs {tp} GPUs, but {environment.gpu_count} "
            f"{'is' if environment.gpu_count == 1 else 'are'} visible: lower --tp, or make more GPUs visible "
            "(CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES)"
        )
    if request.model != DEFAULT_MODEL and request.kv_heads == LaunchRequest().kv_heads:
        decisions.append(
            Decision(
                Action.NOTED,
                "model",
                f"{request.model} is assumed to have {request.kv_heads} KV heads like the test model (this decides "
                "ROCm's default backend and the tp check); pass --kv-heads if it has another count",
                "request",
            )
        )
    if request.kv_heads % tp:
        divisors = [str(d) for d in range(1, request.kv_heads + 1) if request.kv_heads % d == 0]
        raise UnsupportedCombination(
            f"tensor parallel size {tp} does not divide the model's {request.kv_heads} attention heads, so "
            f"SGLang cannot shard them: use --tp {', '.join(divisors)}"
        )

    # 3. Explicit backends must run here and pass SGLang's checks.
    hw_vendor = Vendor.AMD if rocm else Vendor.NVIDIA
    _check_choices(caps, backend, kv, rocm, environment)
    if backend is not None and deterministic and backend not in caps.deterministic_backends:
        allow = caps.deterministic_allowlist()
        raise UnsupportedCombination(
            f"attention backend {backend} cannot be used with deterministic inference on SGLang "
            f"{caps.version}: the allow-list is {', '.join(allow)}. SGLang would refuse to start with: "
            + deterministic_error(allow, backend.value)
            + " Pick one of the allow-list, or drop the backend and let mlaprop choose"
        )
    if (
        backend is not None
        and deterministic
        and request.deepseek_family
        and caps.deepseek_needs_radix_backend
        and backend not in caps.deepseek_allowed()
    ):
        radix = sorted(b.value for b in caps.deepseek_allowed())
        raise UnsupportedCombination(
            f"attention backend {backend} cannot be used with deterministic inference for a DeepSeek-family "
            f"(absorbed MLA) model on SGLang {caps.version}: SGLang allows only {', '.join(radix)} there and "
            "refuses to start. Pick one of those, or drop the backend and let mlaprop choose"
        )
    # SGLang replaces fa3 + fp8_e5m2 by triton before anything runs, so judge the backend that will run.
    runs = _B.TRITON if backend is _B.FA3 and kv is KVCacheDtype.FP8_E5M2 else backend
    if runs is not None and not backend_runs_on(runs, hw_vendor, environment.arch, caps.version):
        runnable = [
            b.value
            for b in sorted(caps.attention_backends, key=lambda b: b.value)
            if backend_runs_on(b, hw_vendor, environment.arch, caps.version)
        ]
        raise UnsupportedCombination(
            f"attention backend {backend} has no kernels for {hw_vendor} {environment.arch}"
            + f"; backends that run there: {', '.join(runnable)}"
        )
    # SGLang's own guards, which also check the CUDA version (srt/utils/common.py).
    if backend is _B.FA4 and caps.fa4_prefill_only:
        raise UnsupportedCombination(
            f'SGLang {caps.version} refuses --attention-backend fa4: "FA4 backend is only supported for prefill" '
            f"({SOURCES['fa4_prefill']}). Use fa3 or triton, or SGLang 0.5.8+"
        )
    if (
        backend is _B.TRTLLM_MLA
        and caps.trtllm_mla_sm100_only
        and not is_sm100(environment.arch, environment.cuda_version)
    ):
        raise UnsupportedCombination(
            f"attention backend trtllm_mla needs SM100 with CUDA >= 12.8 on SGLang {caps.version} (SM12x from "
            f"0.5.5); this is {environment.arch} with CUDA {environment.cuda_version}: SGLang refuses to start "
            f"({SOURCES['trtllm_mla_arch']}). Use triton"
        )
    if backend is _B.TRTLLM_MLA and not is_blackwell(environment.arch, environment.cuda_version):
        raise UnsupportedCombination(
            f"attention backend trtllm_mla needs a Blackwell GPU (SM100/SM110/SM120) with CUDA >= 12.8; this is "
            f"{environment.arch} with CUDA {environment.cuda_version}: SGLang refuses to start. Use triton"
        )
    if (
        backend is _B.FA4
        and deterministic
        and request.deepseek_family
        and not (
            is_blackwell(environment.arch, environment.cuda_version)
            and not is_sm120(environment.arch, environment.cuda_version)
        )
    ):
        raise UnsupportedCombination(
            "deterministic inference with absorbed-MLA models on the fa4 attention backend needs SM100/SM110 with "
            f"CUDA >= 12.8; this is {environment.arch} with CUDA {environment.cuda_version}: SGLang refuses to "
            "start. Use triton"
        )
    if (
        backend is _B.TOKENSPEED_MLA
        and caps.alias_of(backend) is backend
        and not is_blackwell(environment.arch, environment.cuda_version)
    ):
        raise UnsupportedCombination(
            f"attention backend tokenspeed_mla needs a Blackwell GPU (SM100/SM12x) with CUDA >= 12.8 on SGLang "
            f"{caps.version}; this is {environment.arch} with CUDA {environment.cuda_version}: SGLang refuses to "
            "start. Use triton"
        )
    if (
        backend is not None
        and caps.alias_of(backend) is _B.CUTEDSL_MLA
        and not is_sm100(environment.arch, environment.cuda_version)
    ):
        raise UnsupportedCombination(
            f"attention backend {backend} (cutedsl_mla on SGLang {caps.version}) needs SM100 with CUDA >= 12.8; this is {environment.arch} with CUDA "
            f"{environment.cuda_version}: SGLang refuses to start. Use triton"
        )
    allowed_kv = caps.kv_allowed_with(backend) if backend is not None else None
    if backend is not None and allowed_kv is not None and kv not in allowed_kv:
        choices = sorted(k.value for k in allowed_kv & caps.kv_cache_dtypes)
        renamed = caps.alias_of(backend)
        raise UnsupportedCombination(
            f"attention backend {backend} accepts only {', '.join(choices)} KV cache on SGLang {caps.version}, "
            f"not {kv}; use --kv-cache-dtype fp8_e4m3 or another backend"
            + (
                f" (SGLang {caps.version} would run it as {renamed} and silently switch the KV cache to "
                "fp8_e4m3, so the test would not test the KV dtype it asked for)"
                if renamed is not backend
                else ""
            )
        )

    # 4. Predict SGLang's resolution; set the backend only where SGLang's own choice cannot run.
    predicted, steps = resolve_backend(
        rocm=rocm,
        arch=environment.arch,
        cuda_version=environment.cuda_version,
        capabilities=caps,
        deterministic=deterministic,
        explicit=backend,
        kv_cache_dtype=kv,
        tp_size=tp,
        kv_heads=request.kv_heads,
        deepseek_family=request.deepseek_family,
    )
    decisions += steps
    backend_flag = backend
    if (
        backend is None
        and deterministic
        and request.deepseek_family
        and caps.deepseek_needs_radix_backend
        and predicted not in caps.deepseek_allowed()
        and backend_runs_on(predicted, hw_vendor, environment.arch, caps.version)
    ):
        radix = sorted(b.value for b in caps.deepseek_allowed())
        decisions.append(
            Decision(
                Action.ADDED,
                "--attention-backend",
                f"SGLang {caps.version} would fill in its default {predicted} and then refuse it for "
                f"deterministic inference on a DeepSeek-family model (radix list {radix}); triton is in every "
                "radix list",
                SOURCES["pipeline_order"] + "; " + SOURCES["radix"],
            )
        )
        backend_flag = predicted = _B.TRITON
    elif backend is None and not backend_runs_on(predicted, hw_vendor, environment.arch, caps.version):
        decisions.append(
            Decision(
                Action.ADDED,
                "--attention-backend",
                f"SGLang would resolve to {predicted}, which has no kernels for {environment.arch}; triton is in "
                "every deterministic allow-list and runs on every GPU",
                SOURCES["pipeline_order"] + "; " + SOURCES["hardware"],
            )
        )
        backend_flag = predicted = _B.TRITON
    elif backend is not None:
        decisions.append(
            Decision(Action.ADDED, "--attention-backend", f"{backend} requested explicitly", "request")
        )

    # 5. Assemble argv, each option once.
    argv: list[str] = []
    if request.trust_remote_code or user.get("--trust-remote-code") is not None:
        argv.append("--trust-remote-code")
        decisions.append(
            Decision(Action.ADDED, "--trust-remote-code", "the test model ships custom code", SOURCES["test"])
        )
    argv += ["--kv-cache-dtype", kv.value]
    decisions.append(Decision(Action.ADDED, "--kv-cache-dtype", f"KV cache stored as {kv}", SOURCES["test"]))
    if rocm and kv in (KVCacheDtype.FP8_E5M2, KVCacheDtype.FP8_E4M3):
        fnuz = environment.arch.lower().startswith("gfx94")
        decisions.append(
            Decision(
                Action.NOTED,
                "--kv-cache-dtype",
                f"on ROCm {kv} KV is stored as {'float8_e4m3fnuz' if fnuz else 'float8_e4m3fn'} "
                f"on {environment.arch}",
                SOURCES["rocm_kv_fp8"],
            )
        )
    if tp > 1:
        argv += ["--tp-size", str(tp)]
        decisions.append(Decision(Action.ADDED, "--tp-size", f"tensor parallel over {tp} GPUs", "request"))
    if backend_flag is not None:
        argv += ["--attention-backend", backend_flag.value]
    if deterministic:
        argv.append(DETERMINISTIC_FLAG)
        decisions.append(
            Decision(
                Action.ADDED,
                DETERMINISTIC_FLAG,
                f"NVIDIA with no AMD signal: {predicted} is in SGLang {caps.version}'s deterministic allow-list "
                f"{caps.deterministic_allowlist()}; pins dispatch and reduction order so the score is stable",
                SOURCES["test"] + "; " + SOURCES["deterministic_allowlist"],
            )
        )
        if predicted not in caps.radix_backends:
            decisions.append(
                Decision(
                    Action.NOTED,
                    "radix cache",
                    f"{predicted} is outside the radix list under deterministic inference: SGLang disables the "
                    "radix cache",
                    SOURCES["deterministic_allowlist"],
                )
            )
        if tp > 1:
            decisions.append(
                Decision(
                    Action.NOTED,
                    "NCCL_ALGO",
                    "SGLang itself sets NCCL_ALGO=allreduce:tree and disables custom all-reduce for tp > 1",
                    SOURCES["deterministic_allowlist"],
                )
            )
    for opt in user.options:
        if opt.name in _FOLDED or opt.name == "--trust-remote-code":
            continue
        argv += opt.tokens()
        decisions.append(Decision(Action.ADDED, opt.name, "user extra argument", "user extra arguments"))

    _, sim_args = split_simulator_args(request.extra_args)
    if sim_args:
        argv += sim_args
        decisions.append(
            Decision(
                Action.ADDED,
                "--sim-*",
                "the simulated server's own flags, passed through last (SGLang itself would refuse them)",
                "mlaprop.simserver",
            )
        )

    # 6. Environment variables for the server.
    env: dict[str, str] = {}
    users = environment.rocm_fused_decode_mla
    if rocm and predicted is not _B.AITER and caps.rocm_fused_decode_mla_any_backend:
        env["SGLANG_ROCM_FUSED_DECODE_MLA"] = "0"
        decisions.append(
            Decision(
                Action.ADDED,
                "SGLANG_ROCM_FUSED_DECODE_MLA",
                f"SGLang {caps.version} (0.5.4 to 0.5.15.post1) takes the fused ROCm MLA decode path on every "
                f"backend when this is true, which breaks {predicted}'s metadata; 0 turns it off (from 0.5.16 it "
                "applies to aiter only)",
                SOURCES["rocm_fused_decode_mla"],
            )
        )
        if users is not None and users != "0":
            decisions.append(
                Decision(
                    Action.REPLACED,
                    "SGLANG_ROCM_FUSED_DECODE_MLA",
                    f"you set SGLANG_ROCM_FUSED_DECODE_MLA={users!r}; mlaprop sets 0 for the server, because "
                    f"SGLang {caps.version} would take the fused aiter decode path on {predicted}",
                    SOURCES["rocm_fused_decode_mla"],
                )
            )
    elif rocm and users is not None and predicted is not _B.AITER:
        decisions.append(
            Decision(
                Action.NOTED,
                "SGLANG_ROCM_FUSED_DECODE_MLA",
                f"your SGLANG_ROCM_FUSED_DECODE_MLA={users!r} is left as is: from 0.5.16 SGLang applies it to aiter "
                f"only, and this plan runs {predicted}",
                SOURCES["rocm_fused_decode_mla"],
            )
        )
    # The plan as SGLang will read it: no spelling may bring deterministic inference to an AMD signal.
    final = read_server_args(split_simulator_args(tuple(argv))[0], environment.sglang_version)
    if final.deterministic != deterministic or (final.deterministic and signals):
        raise UnsupportedCombination(
            f"SGLang would read deterministic inference as {final.deterministic} from the plan "
            f"{' '.join(argv)!r} (by {final.deterministic_by}), but mlaprop decided {deterministic}"
            + (f" on an AMD/ROCm environment ({'; '.join(signals)})" if signals else "")
            + ": remove that option from the extra arguments"
        )
    return LaunchPlan(
        argv=tuple(argv),
        env=env,
        attention_backend=predicted,
        deterministic=deterministic,
        decisions=tuple(decisions),
        model=request.model,
        sglang_version=environment.sglang_version,
    )
