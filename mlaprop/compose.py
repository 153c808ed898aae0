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

from mlaprop.args import LAUNCHER_OWNED, Option, parse_args
from mlaprop.capabilities import (
    NEWEST,
    SOURCES,
    Capabilities,
    backend_runs_on,
    capabilities_for,
    is_blackwell,
    parse_arch,
)
from mlaprop.ci import read_amd_marker
from mlaprop.environment import (
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

__all__ = [
    "DETERMINISTIC_FLAG",
    "UnsupportedCombination",
    "amd_signals",
    "compose",
    "deterministic_error",
    "resolve_backend",
]

DETERMINISTIC_FLAG = "--enable-deterministic-inference"
_B = AttentionBackend
_FOLDED = frozenset({"--attention-backend", "--kv-cache-dtype", "--tp-size", DETERMINISTIC_FLAG})


class UnsupportedCombination(ValueError):
    """The request cannot run on this environment with this SGLang version (SGLang would refuse it, or
    accept it and fail at run time). The message names what was asked, why it cannot work, and what to do."""


def deterministic_error(allowlist: list[str], backend: str) -> str:
    """SGLang's own message when deterministic inference meets a backend outside its allow-list
    (``srt/server_args.py`` ``_handle_deterministic_inference``)."""
    return (
        f"Currently only {allowlist} attention backends are supported for deterministic inference, "
        f"but you explicitly specified '{backend}'."
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
) -> tuple[AttentionBackend, tuple[Decision, ...]]:
    """Predict the attention backend SGLang resolves for an MLA model, step by step, as SGLang does.

    Order (``srt/arg_groups/pipeline.py``): up to 0.5.11 the platform default is filled in first and the
    deterministic allow-list checked after; from 0.5.12 the deterministic pass picks ``triton`` (Blackwell,
    DeepSeek-family), ``flashinfer`` (Blackwell, other models) or ``fa3`` (everything else, ROCm and
    pre-Hopper CUDA included). Then ``fa3`` with ``fp8_e5m2`` KV becomes ``triton``.

    Returns:
        the resolved backend and the :class:`Decision` (``PREDICTED``/``NOTED``) for each step.

    Raises:
        UnsupportedCombination: SGLang would raise its deterministic ``ValueError`` (the backend, explicit or
            defaulted, is outside ``capabilities.deterministic_backends``); the message is SGLang's.
    """
    steps: list[Decision] = []
    allow = capabilities.deterministic_allowlist()
    if explicit is not None:
        backend = explicit
        steps.append(
            Decision(Action.PREDICTED, "--attention-backend", f"explicit {backend}", SOURCES["hardware"])
        )
    elif deterministic and capabilities.deterministic_resolves_first:
        if is_blackwell(arch) and not rocm:
            backend = _B.TRITON if deepseek_family else _B.FLASHINFER
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
            _, n = parse_arch(arch)
            cuda_ok = cuda_version is None or Version(cuda_version) >= Version("12.3")
            if n == 90 and cuda_ok:
                backend, why = _B.FA3, "Hopper (sm90) with CUDA >= 12.3 defaults to fa3"
            elif n in (100, 103):
                backend, why = _B.FLASHINFER, f"{arch} defaults to flashinfer for DeepseekV2 MLA"
            else:
                backend, why = _B.TRITON, f"{arch} defaults to triton for MLA"
        steps.append(Decision(Action.PREDICTED, "--attention-backend", why, SOURCES["default_backend"]))
    if deterministic and backend not in capabilities.deterministic_backends:
        raise UnsupportedCombination(
            deterministic_error(allow, backend.value)
            + f" (SGLang {capabilities.version}; deterministic allow-list: {', '.join(allow)})"
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


def _merge_user_args(request: LaunchRequest) -> tuple[dict[str, Option], list[Decision]]:
    """Fold the user's extra arguments by name, last one wins; refuse launcher-owned options."""
    merged: dict[str, Option] = {}
    notes: list[Decision] = []
    for opt in parse_args(request.extra_args):
        if opt.name in LAUNCHER_OWNED:
            raise InvalidEnvironment(
                f"{opt.name} is set by mlaprop's launcher and cannot be an extra argument: pass the model as "
                "--model (mlaprop) and the port with --port to `mlaprop run`"
            )
        if opt.name in merged:
            notes.append(
                Decision(
                    Action.REPLACED,
                    opt.name,
                    f"given more than once in the extra arguments; the last ({opt.value}) is used",
                    "user extra arguments",
                )
            )
            del merged[opt.name]  # keep the position of the last occurrence
        merged[opt.name] = opt
    return merged, notes


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
        UnsupportedCombination: no GPU (``Vendor.NONE``) or every device masked; an explicit attention backend
            with no kernels for this GPU, or outside the version's deterministic allow-list while
            deterministic inference is on (NVIDIA); ``--enable-deterministic-inference`` in the user's extra
            arguments where an AMD signal is present; ``trtllm_mla`` / ``cutlass_mla`` with ``fp8_e5m2`` KV.
        InvalidEnvironment: a malformed value (unknown arch, backend, KV dtype, bad extra argument, an
            option the launcher owns, a version older than known). Valid values are listed in the message.
    """
    request = request if request is not None else LaunchRequest()
    rocm = _check_environment(environment)
    known = capabilities_for(environment.sglang_version)  # validates the version
    caps = capabilities if capabilities is not None else known
    decisions: list[Decision] = [
        Decision(Action.NOTED, "environment", note, "mlaprop.detect") for note in environment.notes
    ]
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
    user, merge_notes = _merge_user_args(request)
    decisions += merge_notes
    backend = request.attention_backend
    if "--attention-backend" in user:
        user_backend = parse_enum(AttentionBackend, user["--attention-backend"].value, "attention backend")
        assert isinstance(user_backend, AttentionBackend)
        decisions.append(
            Decision(
                Action.REPLACED,
                "--attention-backend",
                f"the user's --attention-backend {user_backend} replaces "
                + (f"the requested {backend}" if backend else "SGLang's own choice"),
                "user extra arguments",
            )
        )
        backend = user_backend
    kv = request.kv_cache_dtype
    if "--kv-cache-dtype" in user:
        user_kv = parse_enum(KVCacheDtype, user["--kv-cache-dtype"].value, "KV-cache dtype")
        assert isinstance(user_kv, KVCacheDtype)
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
    if "--tp-size" in user:
        raw_tp = user["--tp-size"].value or ""
        if not raw_tp.isdigit() or int(raw_tp) < 1:
            raise InvalidEnvironment(f"--tp-size must be a whole number >= 1, got {raw_tp!r}")
        decisions.append(
            Decision(
                Action.REPLACED, "--tp-size", f"the user's tp {raw_tp} replaces {tp}", "user extra arguments"
            )
        )
        tp = int(raw_tp)
    user_forces_deterministic = DETERMINISTIC_FLAG in user

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
    if wanted and signals:
        if user_forces_deterministic:
            raise UnsupportedCombination(
                f"{DETERMINISTIC_FLAG} was passed as an extra argument, but this is an AMD/ROCm environment "
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

    # 3. Explicit backends must run here and pass SGLang's checks.
    if backend is not None and deterministic and backend not in caps.deterministic_backends:
        allow = caps.deterministic_allowlist()
        raise UnsupportedCombination(
            f"attention backend {backend} cannot be used with deterministic inference on SGLang "
            f"{caps.version}: the allow-list is {', '.join(allow)}. SGLang would refuse to start with: "
            + deterministic_error(allow, backend.value)
            + " Pick one of the allow-list, or drop the backend and let mlaprop choose"
        )
    hw_vendor = Vendor.AMD if rocm else Vendor.NVIDIA
    if backend is not None and not backend_runs_on(backend, hw_vendor, environment.arch):
        runnable = [b.value for b in AttentionBackend if backend_runs_on(b, hw_vendor, environment.arch)]
        raise UnsupportedCombination(
            f"attention backend {backend} has no kernels for {hw_vendor} {environment.arch}; backends that run "
            f"there: {', '.join(runnable)}"
        )
    if backend in (_B.TRTLLM_MLA, _B.CUTLASS_MLA) and kv is KVCacheDtype.FP8_E5M2:
        raise UnsupportedCombination(
            f"attention backend {backend} accepts only fp8_e4m3, bf16 or auto KV cache, not fp8_e5m2; "
            "use --kv-cache-dtype fp8_e4m3 or another backend"
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
    if backend is None and not backend_runs_on(predicted, hw_vendor, environment.arch):
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
    if request.trust_remote_code or "--trust-remote-code" in user:
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
        if tp > environment.gpu_count:
            decisions.append(
                Decision(
                    Action.NOTED,
                    "--tp-size",
                    f"tp {tp} needs {tp} GPUs but {environment.gpu_count} are visible; SGLang will fail to start",
                    "mlaprop.detect",
                )
            )
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
    for name, opt in user.items():
        if name in _FOLDED or name == "--trust-remote-code":
            continue
        argv += opt.tokens()
        decisions.append(Decision(Action.ADDED, name, "user extra argument", "user extra arguments"))

    # 6. Environment variables for the server.
    env: dict[str, str] = {}
    if rocm and predicted is _B.TRITON and caps.rocm_fused_decode_mla_any_backend:
        env["SGLANG_ROCM_FUSED_DECODE_MLA"] = "0"
        decisions.append(
            Decision(
                Action.ADDED,
                "SGLANG_ROCM_FUSED_DECODE_MLA",
                f"SGLang {caps.version} applies the fused ROCm MLA decode path to every backend, which breaks "
                "triton's metadata; 0 turns it off",
                SOURCES["rocm_fused_decode_mla"],
            )
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
