"""The domain of mlaprop: where a server runs, what is asked of it, and the plan that comes out.

Everything here is a frozen dataclass or a ``StrEnum`` whose values are SGLang's exact CLI spellings,
so a value can be written straight into an argv. Nothing here does I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeVar

__all__ = [
    "DEFAULT_MODEL",
    "Action",
    "AttentionBackend",
    "CIMarkers",
    "Decision",
    "Environment",
    "InvalidEnvironment",
    "KVCacheDtype",
    "LaunchPlan",
    "LaunchRequest",
    "Vendor",
    "option_value",
    "parse_enum",
]

#: The model of SGLang's ``test/registered/mla/test_mla_fp8.py`` (DeepseekV2ForCausalLM, MLA, FP8 weights).
DEFAULT_MODEL = "neuralmagic/DeepSeek-Coder-V2-Lite-Instruct-FP8"


class InvalidEnvironment(ValueError):
    """An environment (or an environment variable feeding one) holds a value mlaprop cannot use.

    The message names the bad value and lists the valid ones.
    """


class _Choice(str, enum.Enum):
    """A ``str`` enum (Python 3.10 has no ``StrEnum``) whose value is the CLI spelling."""

    def __str__(self) -> str:
        return str(self.value)


class Vendor(_Choice):
    """GPU vendor of the machine the server runs on."""

    NVIDIA = "nvidia"
    AMD = "amd"
    NONE = "none"


class AttentionBackend(_Choice):
    """SGLang's ``--attention-backend`` choices that matter for MLA models (``srt/server_args.py`` /
    ``srt/arg_groups/choices.py``); which ones a given SGLang version accepts is in
    :attr:`mlaprop.capabilities.Capabilities.attention_backends`."""

    AITER = "aiter"
    ASCEND = "ascend"
    CUTEDSL_MLA = "cutedsl_mla"
    CUTLASS_MLA = "cutlass_mla"
    FA3 = "fa3"
    FA4 = "fa4"
    FLASHINFER = "flashinfer"
    FLASHMLA = "flashmla"
    INTEL_XPU = "intel_xpu"
    TORCH_NATIVE = "torch_native"
    TRITON = "triton"
    TOKENSPEED_MLA = "tokenspeed_mla"
    TRTLLM_MLA = "trtllm_mla"
    WAVE = "wave"


class KVCacheDtype(_Choice):
    """SGLang's ``--kv-cache-dtype`` choices over all known versions (argparse rejects others with exit code 2);
    which ones a given version accepts is in :attr:`mlaprop.capabilities.Capabilities.kv_cache_dtypes`."""

    AUTO = "auto"
    FP8_E5M2 = "fp8_e5m2"
    FP8_E4M3 = "fp8_e4m3"
    MXFP8 = "mxfp8"
    BF16 = "bf16"
    BFLOAT16 = "bfloat16"
    NVFP4 = "nvfp4"
    FP4_MX_BLOCK16 = "fp4_mx_block16"
    FP4_E2M1 = "fp4_e2m1"


class Action(_Choice):
    """What a :class:`Decision` did to the plan."""

    ADDED = "added"  # a flag or environment variable was put in the plan
    DROPPED = "dropped"  # something requested was left out, on purpose
    REPLACED = "replaced"  # a user value replaced a default
    PREDICTED = "predicted"  # what SGLang will resolve on its own (nothing emitted)
    NOTED = "noted"  # a fact worth showing (a conflict between signals, a known upstream failure)


_C = TypeVar("_C", bound=_Choice)


def parse_enum(kind: type[_C], value: object, what: str) -> _C:
    """Parse ``value`` into a member of ``kind``, accepting the exact CLI spelling (case-insensitive).

    Raises:
        InvalidEnvironment: ``value`` is not one of ``kind``'s spellings; the message lists them.
    """
    if isinstance(value, kind):
        return value
    text = str(value).strip().lower()
    for member in kind:
        if member.value == text:
            return member
    valid = ", ".join(m.value for m in kind)
    raise InvalidEnvironment(f"unknown {what} {value!r}: expected one of {valid}")


@dataclass(frozen=True)
class CIMarkers:
    """Raw values of SGLang's CI environment variables, exactly as found (``None`` when unset).

    Kept raw because SGLang parses them two ways (``sglang/test/test_utils.py`` ``is_in_amd_ci`` and the
    ``EnvBool`` of ``sglang/srt/environ.py``); :mod:`mlaprop.ci` interprets them.
    """

    sglang_is_in_ci: str | None = None
    sglang_is_in_ci_amd: str | None = None


@dataclass(frozen=True)
class Environment:
    """Where the server will run.

    Attributes:
        vendor: GPU vendor; ``Vendor.NONE`` when no GPU is visible.
        arch: GPU architecture in SGLang's terms: CUDA compute capability as ``smXY`` (``sm90`` for H100/H200,
            ``sm100`` for B200, ``sm80`` for A100) or a ROCm ``gfx`` target (``gfx942`` for MI300X); ``""``
            when unknown or no GPU.
        gpu_count: visible GPUs after device masks (``CUDA_VISIBLE_DEVICES`` and friends), >= 0.
        torch_hip: ``torch.version.hip`` is set (SGLang's ``is_hip``); an AMD signal on its own.
        cuda_version: ``torch.version.cuda`` as ``"12.8"``, or ``None`` (SGLang's Hopper default needs >= 12.3).
        ci: raw CI markers.
        sglang_version: the SGLang version the server will run, as ``"0.5.11"``.
        notes: facts detection found worth reporting (conflicting signals, masks); copied into plan decisions.
        amd_evidence: AMD signals the machine itself gave (``rocminfo``, ``/dev/kfd``, a HIP torch), probed
            for commands that run on the machine; each one keeps the deterministic flag out.
        rocm_fused_decode_mla: the user's own ``SGLANG_ROCM_FUSED_DECODE_MLA`` (``None`` when unset); a plan
            that overrides it says so.
    """

    vendor: Vendor = Vendor.NVIDIA
    arch: str = "sm90"
    gpu_count: int = 1
    torch_hip: bool = False
    cuda_version: str | None = "12.8"
    ci: CIMarkers = field(default_factory=CIMarkers)
    sglang_version: str = "0.5.23"
    notes: tuple[str, ...] = ()
    amd_evidence: tuple[str, ...] = ()
    rocm_fused_decode_mla: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.amd_evidence, tuple):
            object.__setattr__(self, "amd_evidence", tuple(self.amd_evidence))
        if not isinstance(self.vendor, Vendor):
            object.__setattr__(self, "vendor", parse_enum(Vendor, self.vendor, "GPU vendor"))
        if isinstance(self.gpu_count, bool) or not isinstance(self.gpu_count, int) or self.gpu_count < 0:
            raise InvalidEnvironment(f"gpu_count must be a whole number >= 0, got {self.gpu_count!r}")
        if not isinstance(self.notes, tuple):
            object.__setattr__(self, "notes", tuple(self.notes))


@dataclass(frozen=True)
class LaunchRequest:
    """What the test asks of the server. The defaults are SGLang's ``test_mla_fp8.py``.

    Attributes:
        model: model path or Hugging Face id passed as ``--model-path``.
        kv_cache_dtype: ``--kv-cache-dtype``.
        deterministic: deterministic inference is wanted (added only where SGLang can honour it).
        attention_backend: an explicit ``--attention-backend``; ``None`` lets SGLang choose.
        tp_size: tensor parallel size (``--tp-size``), >= 1.
        trust_remote_code: pass ``--trust-remote-code``.
        extra_args: extra SGLang arguments from the user, merged into the plan (a user value replaces
            mlaprop's, never duplicates it).
        kv_heads: the model's KV heads (16 for the test model); SGLang's ROCm default backend depends on
            ``kv_heads // tp_size`` (``aiter`` for 16 or 128 per rank, else ``triton``).
        deepseek_family: the model is DeepSeek-family absorbed MLA (DeepseekV2/V3); SGLang's deterministic
            fallback on Blackwell picks ``triton`` for these.
    """

    model: str = DEFAULT_MODEL
    kv_cache_dtype: KVCacheDtype = KVCacheDtype.FP8_E5M2
    deterministic: bool = True
    attention_backend: AttentionBackend | None = None
    tp_size: int = 1
    trust_remote_code: bool = True
    extra_args: tuple[str, ...] = ()
    kv_heads: int = 16
    deepseek_family: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.kv_heads, bool) or not isinstance(self.kv_heads, int) or self.kv_heads < 1:
            raise InvalidEnvironment(f"kv_heads must be a whole number >= 1, got {self.kv_heads!r}")
        if not isinstance(self.kv_cache_dtype, KVCacheDtype):
            object.__setattr__(
                self, "kv_cache_dtype", parse_enum(KVCacheDtype, self.kv_cache_dtype, "KV-cache dtype")
            )
        if self.attention_backend is not None and not isinstance(self.attention_backend, AttentionBackend):
            object.__setattr__(
                self,
                "attention_backend",
                parse_enum(AttentionBackend, self.attention_backend, "attention backend"),
            )
        if isinstance(self.tp_size, bool) or not isinstance(self.tp_size, int) or self.tp_size < 1:
            raise InvalidEnvironment(
                f"tensor parallel size (tp) must be a whole number >= 1, got {self.tp_size!r}"
            )
        if isinstance(self.extra_args, str):
            raise InvalidEnvironment(
                "extra_args must be a sequence of arguments, not one string; split it with shlex.split()"
            )
        if not isinstance(self.extra_args, tuple):
            object.__setattr__(self, "extra_args", tuple(self.extra_args))
        if not isinstance(self.model, str) or not self.model.strip():
            raise InvalidEnvironment("model must be a non-empty path or Hugging Face id")
        if self.model != self.model.strip() or self.model.startswith("-"):
            raise InvalidEnvironment(
                f"model {self.model!r} would be read as an option or padded path by SGLang's parser: pass a "
                "path or Hugging Face id without leading dashes or surrounding spaces (./-x for such a folder)"
            )


@dataclass(frozen=True)
class Decision:
    """One rule applied while composing a plan.

    Attributes:
        action: what it did.
        subject: the flag or environment variable concerned (``--enable-deterministic-inference``).
        reason: why, in one sentence a CI engineer can act on.
        source: the upstream file, issue or PR the rule comes from (a URL or ``sglang/...`` path).
    """

    action: Action
    subject: str
    reason: str
    source: str


@dataclass(frozen=True)
class LaunchPlan:
    """What to run: SGLang server arguments and environment, and why each choice was made.

    Attributes:
        argv: server arguments after ``--model-path M --host H --port P`` (those three are the launcher's).
        env: environment variables to set for the server process (read-only mapping, str -> str).
        attention_backend: the attention backend SGLang is predicted to resolve to.
        deterministic: the plan carries ``--enable-deterministic-inference``.
        decisions: every rule applied, in order.
        model: the model path, as requested.
        sglang_version: the SGLang version whose rules were used.
    """

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(hash=False)
    attention_backend: AttentionBackend
    deterministic: bool
    decisions: tuple[Decision, ...]
    model: str = DEFAULT_MODEL
    sglang_version: str = "0.5.23"

    def __post_init__(self) -> None:
        if not isinstance(self.env, MappingProxyType):
            object.__setattr__(self, "env", MappingProxyType(dict(self.env)))

    def has_flag(self, flag: str) -> bool:
        """``True`` when ``flag`` (``--x`` or ``--x=value``) is in :attr:`argv`."""
        return any(a == flag or a.startswith(flag + "=") for a in self.argv)

    def option(self, flag: str) -> str | None:
        """The value given to ``flag`` in :attr:`argv`, or ``None`` when absent."""
        return option_value(self.argv, flag)


def option_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` in ``argv`` (``--flag value`` or ``--flag=value``; the first one), or ``None``."""
    for i, a in enumerate(argv):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
    return None
