"""SGLang's rules as data, keyed by SGLang version: the one place to edit when SGLang changes.

Read from the SGLang wheels 0.5.4 to 0.5.23 on PyPI and checked against SGLang's own argument pipeline
(``tox -e contract``). Paths are inside the ``sglang`` package of the 0.5.23 wheel unless a version is named.
"""

from __future__ import annotations

from dataclasses import dataclass

from packaging.version import InvalidVersion, Version

from mlaprop.environment import AttentionBackend, InvalidEnvironment, KVCacheDtype, Vendor

__all__ = [
    "KNOWN_VERSIONS",
    "NEWEST",
    "SOURCES",
    "Capabilities",
    "backend_runs_on",
    "capabilities_for",
    "cuda_at_least",
    "is_blackwell",
    "is_hopper",
    "is_sm100",
    "is_sm120",
    "parse_arch",
]

_B = AttentionBackend
_K = KVCacheDtype

#: Upstream sources cited by decisions; keys are short names used in this package.
SOURCES: dict[str, str] = {
    "test": "https://github.com/sgl-project/sglang/blob/main/test/registered/mla/test_mla_fp8.py",
    "deterministic_allowlist": (
        "https://github.com/sgl-project/sglang/blob/main/python/sglang/srt/arg_groups/choices.py"
        " (server_args.py before 0.5.20): DETERMINISTIC_ATTENTION_BACKEND_CHOICES"
    ),
    "pipeline_order": (
        "https://github.com/sgl-project/sglang/blob/main/python/sglang/srt/arg_groups/pipeline.py"
        " (deterministic pass runs before the default backend from 0.5.12)"
    ),
    "default_backend": (
        "https://github.com/sgl-project/sglang/blob/main/python/sglang/srt/arg_groups/model_override_base.py"
        " get_default_attn_backend"
    ),
    "fa3_fp8_e5m2": (
        "https://github.com/sgl-project/sglang/blob/main/python/sglang/srt/arg_groups/attention_hook.py"
        " (FlashAttention3 only supports fp8_e4m3 KV cache: fa3 + fp8_e5m2 -> triton)"
    ),
    "rocm_fused_decode_mla": (
        "https://github.com/sgl-project/sglang/issues/23536; srt/models/deepseek_common/attention_backend_handler.py"
        " _dispatch_mla_subtype (srt/models/deepseek_v2.py before 0.5.8): every backend up to 0.5.15.post1, aiter"
        " only from 0.5.16 (https://github.com/sgl-project/sglang/pull/30355)"
    ),
    "v054_runtime_default": (
        "sglang 0.5.4 srt/model_executor/model_runner.py model_specific_adjustment (the MLA default and the"
        " fa3 + fp8_e5m2 -> triton switch are made at start-up, after server_args' deterministic pass);"
        " srt/server_args.py _handle_deterministic_inference (flashinfer on SM100/SM120 for every model, and a"
        " backend outside fa3/triton only disables the radix cache)"
    ),
    "tokenspeed_mla": (
        "sglang 0.5.12-0.5.22 srt/server_args.py (arg_groups/kv_cache_hook.py from 0.5.20): tokenspeed_mla needs"
        " Blackwell (is_blackwell_supported) and --kv-cache-dtype fp8_e4m3; 0.5.23 arg_groups/serving_hook.py:"
        " a deprecated alias of cutedsl_mla that forces fp8_e4m3 KV"
    ),
    "rocm_rccl": (
        "sglang 0.5.23 srt/arg_groups/overrides.py _deterministic_rocm_rccl_check (deterministic inference on ROCm"
        " with tp > 2 refuses --disable-custom-all-reduce)"
    ),
    "fa4_prefill": "sglang 0.5.4-0.5.7 srt/server_args.py (FA4 backend is only supported for prefill)",
    "trtllm_mla_arch": (
        "srt/server_args.py _handle_attention_backend_compatibility: trtllm_mla needs is_sm100_supported in"
        " 0.5.4, is_blackwell_supported (SM100/SM12x) from 0.5.5 (arg_groups/attention_hook.py from 0.5.20)"
    ),
    "fa4_arch": (
        "srt/layers/attention/flashattention_backend.py (fa_impl_ver 4: flash_attn.cute for sm90/sm100/sm110;"
        " an sm120 kernel from 0.5.18)"
    ),
    "rocm_kv_fp8": "https://github.com/sgl-project/sglang/blob/main/python/sglang/srt/mem_cache/kv_cache_dtype.py",
    "amd_ci_marker": "https://github.com/sgl-project/sglang/blob/main/python/sglang/test/test_utils.py is_in_amd_ci",
    "envbool": "https://github.com/sgl-project/sglang/blob/main/python/sglang/srt/environ.py EnvBool",
    "is_hip": "https://github.com/sgl-project/sglang/blob/main/python/sglang/srt/utils/common.py is_hip",
    "mla_fp8_kv": (
        "https://github.com/sgl-project/sglang/blob/main/python/sglang/srt/arg_groups/attention_hook.py"
        " (trtllm_mla and cutedsl_mla accept only fp8_e4m3, bf16 or auto KV cache)"
    ),
    "hardware": "https://docs.sglang.ai/advanced_features/attention_backend.html (backend support matrix)",
    "radix": (
        "https://github.com/sgl-project/sglang/blob/main/python/sglang/srt/arg_groups/attention_hook.py"
        " (deterministic inference on absorbed-MLA / DeepSeek models needs a backend in the radix list;"
        " server_args.py _handle_deterministic_inference before 0.5.20)"
    ),
    "choices": (
        "https://github.com/sgl-project/sglang/blob/main/python/sglang/srt/arg_groups/fields/model.py"
        " (--kv-cache-dtype and --attention-backend choices; server_args.py before 0.5.20)"
    ),
    "kv_hooks": (
        "https://github.com/sgl-project/sglang/blob/main/python/sglang/srt/arg_groups/kv_cache_hook.py"
        " (mxfp8 needs Blackwell; FP4 KV caches constrain prefill/decode backends)"
    ),
    "sm_checks": (
        "https://github.com/sgl-project/sglang/blob/main/python/sglang/srt/utils/common.py"
        " _check_cuda_device_version (sm90 needs CUDA 12.3; sm100/sm110/sm120 need CUDA 12.8)"
    ),
    "launcher": "mlaprop.server (the launcher owns --model-path, --host and --port)",
    "argparse": (
        "https://github.com/sgl-project/sglang/blob/main/python/sglang/srt/server_args.py prepare_server_args"
        " (plain argparse: unique prefixes, --name=value, last repeat wins); tables in mlaprop/data/sglang_options.json"
    ),
}


@dataclass(frozen=True)
class Capabilities:
    """What one SGLang version does with the flags mlaprop composes.

    Attributes:
        version: the SGLang version these rules describe, as ``"0.5.11"``.
        deterministic_backends: attention backends ``--enable-deterministic-inference`` accepts
            (``DETERMINISTIC_ATTENTION_BACKEND_CHOICES``); any other raises SGLang's ``ValueError``.
        radix_backends: backends that keep the radix cache on under deterministic inference
            (DeepSeek-family models need one of them for absorbed MLA).
        deterministic_resolves_first: from 0.5.12 the deterministic pass chooses a backend before the
            platform default is filled in; up to 0.5.11 the default (``aiter`` on ROCm) came first and then
            failed the allow-list check.
        rocm_fused_decode_mla_any_backend: ``SGLANG_ROCM_FUSED_DECODE_MLA`` applies to every backend (up to
            0.5.22), which breaks ``triton`` on ROCm; 0.5.23 applies it to ``aiter`` only.
        attention_backends: the ``--attention-backend`` choices of this version among those mlaprop models
            (``cutlass_mla`` up to 0.5.19, ``cutedsl_mla`` from 0.5.13).
        kv_cache_dtypes: the ``--kv-cache-dtype`` choices (``fp4_e2m1`` 0.5.5-0.5.20; ``mxfp8``, ``nvfp4``,
            ``fp4_mx_block16`` from 0.5.16).
        kv_restrictions: backends that accept only some KV-cache dtypes (``trtllm_mla``: fp8_e4m3, fp4_e2m1,
            bf16, auto; ``cutedsl_mla``: fp8_e4m3, bf16, bfloat16, auto; ``tokenspeed_mla``: fp8_e4m3); SGLang
            raises for others.
        deepseek_needs_radix_backend: deterministic inference on a DeepSeek-family model raises unless the
            backend is in :attr:`deepseek_backends` (0.5.5+); 0.5.4 only disables the radix cache.
        deepseek_backends: the backends that check accepts. ``server_args.py`` tests the literal
            ``["fa3", "triton"]`` up to 0.5.16 (0.5.16 even though its radix list has ``fa4``; up to 0.5.15 the
            message prints the radix list instead), and ``RADIX_SUPPORTED_DETERMINISTIC_ATTENTION_BACKEND``
            from 0.5.17. Empty means the radix list.
        deterministic_deepseek_triton: the deterministic fallback on SM100/SM120 picks ``triton`` for
            DeepSeek-family models (0.5.5+); 0.5.4 picks ``flashinfer`` for every model.
        backend_aliases: backends SGLang renames before resolving (0.5.23: ``tokenspeed_mla`` ->
            ``cutedsl_mla``).
        rocm_rccl_check: deterministic inference on ROCm with tp > 2 refuses ``--disable-custom-all-reduce``
            (0.5.23).
        fa4_prefill_only: ``--attention-backend fa4`` raises "FA4 backend is only supported for prefill"
            (0.5.4-0.5.7, ``srt/server_args.py``).
        trtllm_mla_sm100_only: ``trtllm_mla`` needs SM100 (``is_sm100_supported``; 0.5.4), Blackwell
            (``is_blackwell_supported``: SM100/SM110/SM12x) from 0.5.5.
    """

    version: str
    deterministic_backends: frozenset[AttentionBackend]
    radix_backends: frozenset[AttentionBackend]
    deterministic_resolves_first: bool
    rocm_fused_decode_mla_any_backend: bool
    attention_backends: frozenset[AttentionBackend] = frozenset(AttentionBackend)
    kv_cache_dtypes: frozenset[KVCacheDtype] = frozenset(KVCacheDtype)
    kv_restrictions: tuple[tuple[AttentionBackend, frozenset[KVCacheDtype]], ...] = ()
    deepseek_needs_radix_backend: bool = True
    deterministic_deepseek_triton: bool = True
    deepseek_backends: frozenset[AttentionBackend] = frozenset()
    backend_aliases: tuple[tuple[AttentionBackend, AttentionBackend], ...] = ()
    rocm_rccl_check: bool = False
    fa4_prefill_only: bool = False
    trtllm_mla_sm100_only: bool = False

    def alias_of(self, backend: AttentionBackend) -> AttentionBackend:
        """The backend SGLang runs for ``backend`` in this version (an alias resolved; else itself)."""
        for old, new in self.backend_aliases:
            if old is backend:
                return new
        return backend

    def deepseek_allowed(self) -> frozenset[AttentionBackend]:
        """The backends deterministic inference on a DeepSeek-family model accepts (see ``deepseek_backends``)."""
        return self.deepseek_backends or self.radix_backends

    def deepseek_refusal(self, backend: str) -> str:
        """SGLang's ``ValueError`` text when ``backend`` fails the DeepSeek check: it prints the radix list
        except in 0.5.16, whose ``deepseek_deterministic_attention_backends`` it prints (``server_args.py``)."""
        shown = self.deepseek_allowed() if Version(self.version) == Version("0.5.16") else self.radix_backends
        return (
            f"Currently only {self.printed(shown)} attention backends are supported "
            f"for deterministic inference with DeepSeek models. But you're using {backend}."
        )

    def kv_allowed_with(self, backend: AttentionBackend) -> frozenset[KVCacheDtype] | None:
        """The KV-cache dtypes ``backend`` accepts in this version, or ``None`` when it accepts all."""
        for b, kinds in self.kv_restrictions:
            if b is backend:
                return kinds
        return None

    def deterministic_allowlist(self) -> list[str]:
        """The allow-list, sorted: ``['fa3', 'flashinfer', 'triton']``."""
        return sorted(b.value for b in self.deterministic_backends)

    def printed(self, backends: frozenset[AttentionBackend]) -> str:
        """A backend list as this SGLang version's messages print it (the list's ``repr``): in source order
        (``flashinfer, fa3, triton, ascend``; radix ``fa3, triton, ascend``) up to 0.5.15, sorted from 0.5.16."""
        names = {b.value for b in backends}
        if Version(self.version) >= Version("0.5.16"):
            return repr(sorted(names))
        order = ("flashinfer", "fa3", "triton", "ascend")
        return repr([n for n in order if n in names])


def _rules(version: str) -> Capabilities:
    v = Version(version)
    det = {_B.FLASHINFER, _B.FA3, _B.TRITON}
    radix = {_B.FA3, _B.TRITON}
    if v >= Version("0.5.13"):
        det.add(_B.ASCEND)
        radix.add(_B.ASCEND)
    if v >= Version("0.5.16"):
        det.add(_B.FA4)
        radix.add(_B.FA4)
    if v >= Version("0.5.19"):
        det.add(_B.INTEL_XPU)
    backends = set(AttentionBackend)
    if v < Version("0.5.12"):
        backends.discard(_B.TOKENSPEED_MLA)
    if v < Version("0.5.13"):
        backends.discard(_B.CUTEDSL_MLA)
    if v >= Version("0.5.20"):
        backends.discard(_B.CUTLASS_MLA)
    kv = {_K.AUTO, _K.FP8_E5M2, _K.FP8_E4M3, _K.BF16, _K.BFLOAT16}
    if Version("0.5.5") <= v < Version("0.5.21"):
        kv.add(_K.FP4_E2M1)
    if v >= Version("0.5.16"):
        kv |= {_K.MXFP8, _K.NVFP4, _K.FP4_MX_BLOCK16}
    restrictions = (
        (_B.TRTLLM_MLA, frozenset({_K.FP8_E4M3, _K.FP4_E2M1, _K.BF16, _K.AUTO})),
        (_B.CUTEDSL_MLA, frozenset({_K.FP8_E4M3, _K.BF16, _K.BFLOAT16, _K.AUTO})),
        (_B.TOKENSPEED_MLA, frozenset({_K.FP8_E4M3})),
    )
    v054 = v < Version("0.5.5")
    return Capabilities(
        version=version,
        deterministic_backends=frozenset(det),
        radix_backends=frozenset(radix),
        # 0.5.4 fills the MLA default at start-up (model_runner), after the deterministic pass; 0.5.5-0.5.11
        # fill it in server_args before; 0.5.12+ run the deterministic pass first again.
        deterministic_resolves_first=v054 or v >= Version("0.5.12"),
        rocm_fused_decode_mla_any_backend=v < Version("0.5.16"),
        attention_backends=frozenset(backends),
        kv_cache_dtypes=frozenset(kv),
        kv_restrictions=restrictions,
        deepseek_needs_radix_backend=not v054,
        deterministic_deepseek_triton=not v054,
        # server_args.py tests the literal ["fa3", "triton"] up to 0.5.16, the radix list from 0.5.17
        deepseek_backends=frozenset({_B.FA3, _B.TRITON}) if v < Version("0.5.17") else frozenset(),
        backend_aliases=((_B.TOKENSPEED_MLA, _B.CUTEDSL_MLA),) if v >= Version("0.5.23") else (),
        rocm_rccl_check=v >= Version("0.5.23"),
        fa4_prefill_only=v < Version("0.5.8"),
        trtllm_mla_sm100_only=v054,
    )


#: Every SGLang version whose rules are encoded, oldest first.
KNOWN_VERSIONS: tuple[str, ...] = tuple(f"0.5.{n}" for n in range(4, 24))
#: The newest known SGLang version.
NEWEST: str = KNOWN_VERSIONS[-1]

_TABLE: dict[str, Capabilities] = {v: _rules(v) for v in KNOWN_VERSIONS}


def capabilities_for(version: str) -> Capabilities:
    """The rules for SGLang ``version``.

    A version newer than :data:`NEWEST` gets the newest rules (compose records a decision saying so);
    a pre-release or local version (``0.5.11rc1``, ``0.5.11+rocm``) gets its release's rules.

    Raises:
        InvalidEnvironment: ``version`` is not a version, or is older than the oldest known (0.5.4).
    """
    try:
        v = Version(str(version).strip())
    except InvalidVersion:
        raise InvalidEnvironment(
            f"SGLang version {version!r} is not a version number; expected one like {NEWEST!r} "
            f"(known: {KNOWN_VERSIONS[0]} to {NEWEST})"
        ) from None
    key = v.base_version
    if key in _TABLE:
        return _TABLE[key]
    if v < Version(KNOWN_VERSIONS[0]):
        raise InvalidEnvironment(
            f"SGLang {version} is older than the oldest version mlaprop knows ({KNOWN_VERSIONS[0]}); "
            f"known: {KNOWN_VERSIONS[0]} to {NEWEST}"
        )
    if v > Version(NEWEST):
        return _TABLE[NEWEST]
    # A gap inside the known range cannot happen (the table is contiguous) unless a micro like 0.5.11.1.
    older = [k for k in KNOWN_VERSIONS if Version(k) <= v]
    return _TABLE[older[-1]]


def parse_arch(arch: str) -> tuple[str, int]:
    """Split a GPU architecture into family and number: ``"sm90"`` -> ``("sm", 90)``, ``"gfx942"`` ->
    ``("gfx", 942)`` (gfx targets are hex-ish, e.g. ``gfx90a``: the number is parsed as hex then).

    Raises:
        InvalidEnvironment: not of the form ``sm<digits>`` or ``gfx<hex digits>``.
    """
    a = arch.strip().lower()
    try:
        if a.startswith("sm") and a[2:].isdigit():
            return "sm", int(a[2:])
        if a.startswith("gfx") and a[3:]:
            return "gfx", int(a[3:], 16) if not a[3:].isdigit() else int(a[3:])
    except ValueError:
        pass
    raise InvalidEnvironment(
        f"unknown GPU architecture {arch!r}: expected a CUDA compute capability like sm80, sm90, sm100 "
        "or a ROCm target like gfx90a, gfx942, gfx950"
    )


def cuda_at_least(cuda_version: str | None, minimum: str) -> bool:
    """``torch.version.cuda`` is at least ``minimum``; an unknown CUDA version (``None``) counts as new enough."""
    return cuda_version is None or Version(cuda_version) >= Version(minimum)


def _major(arch: str) -> int | None:
    family, n = parse_arch(arch)
    return n // 10 if family == "sm" else None


def is_hopper(arch: str, cuda_version: str | None = None) -> bool:
    """SGLang's ``is_sm90_supported`` / ``is_hopper_with_cuda_12_3``: compute capability 9.x and CUDA >= 12.3."""
    return _major(arch) == 9 and cuda_at_least(cuda_version, "12.3")


def is_sm100(arch: str, cuda_version: str | None = None) -> bool:
    """SGLang's ``is_sm100_supported``: compute capability 10.x (B200, GB200, B300) and CUDA >= 12.8."""
    return _major(arch) == 10 and cuda_at_least(cuda_version, "12.8")


def is_sm120(arch: str, cuda_version: str | None = None) -> bool:
    """SGLang's ``is_sm120_supported``: compute capability 12.x (RTX 50xx, GB10) and CUDA >= 12.8."""
    return _major(arch) == 12 and cuda_at_least(cuda_version, "12.8")


def is_blackwell(arch: str, cuda_version: str | None = None) -> bool:
    """SGLang's ``is_blackwell``: compute capability 10.x, 11.x or 12.x and CUDA >= 12.8
    (``srt/utils/common.py`` ``_check_cuda_device_version``)."""
    return _major(arch) in (10, 11, 12) and cuda_at_least(cuda_version, "12.8")


# Where each attention backend's kernels exist (NVIDIA by compute capability, AMD by vendor).
_NVIDIA_ANY = frozenset({_B.TRITON, _B.FLASHINFER, _B.TORCH_NATIVE})
_AMD_ANY = frozenset({_B.AITER, _B.TRITON, _B.WAVE, _B.TORCH_NATIVE})


def backend_runs_on(backend: AttentionBackend, vendor: Vendor, arch: str, version: str | None = None) -> bool:
    """Whether ``backend`` has kernels for this GPU (SGLang's attention backend support matrix), by
    architecture alone: SGLang's own CUDA-version checks are applied where SGLang applies them.

    ``fa3`` needs Hopper (sm90); ``fa4`` sm90/sm100/sm110, and sm120 from SGLang 0.5.18 (``version``;
    ``None`` counts as the newest); ``flashmla`` sm90/sm100; ``cutlass_mla`` and ``cutedsl_mla`` sm100;
    ``trtllm_mla`` and ``tokenspeed_mla`` Blackwell (sm100/sm110/sm120); ``aiter`` and ``wave`` ROCm only;
    ``ascend`` and ``intel_xpu`` neither vendor. Source: ``SOURCES["hardware"]``, ``SOURCES["fa4_arch"]``.
    """
    if vendor is Vendor.AMD:
        return backend in _AMD_ANY
    if vendor is not Vendor.NVIDIA:
        return False
    if backend in _NVIDIA_ANY:
        return True
    major = _major(arch)
    if backend is _B.FA3:
        return major == 9
    if backend is _B.FA4:
        sm120 = version is None or Version(Version(version).base_version) >= Version("0.5.18")
        return major in (9, 10, 11) or (major == 12 and sm120)
    if backend is _B.FLASHMLA:
        return major in (9, 10)
    if backend in (_B.CUTLASS_MLA, _B.CUTEDSL_MLA):
        return major == 10
    if backend in (_B.TRTLLM_MLA, _B.TOKENSPEED_MLA):
        return major in (10, 11, 12)
    return False
