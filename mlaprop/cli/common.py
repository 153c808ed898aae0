"""Options shared by several ``mlaprop`` commands: the platform (``--vendor``, ``--arch``, ...) and the
launch request (``--model``, ``--tp``, ``--server-args``, ...), parsed into typed values.

Light on purpose (no HTTP client, no progress bars): ``mlaprop compose`` / ``env`` / ``preflight`` start fast.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NoReturn, TypeVar

from mlaprop.capabilities import KNOWN_VERSIONS
from mlaprop.detect import detect_environment
from mlaprop.environment import (
    DEFAULT_MODEL,
    AttentionBackend,
    Environment,
    KVCacheDtype,
    LaunchRequest,
    Vendor,
)
from mlaprop.exitcodes import ExitCode
from mlaprop.redact import redact

__all__ = [
    "PlatformOptions",
    "add_platform_options",
    "add_request_options",
    "arg_type",
    "environment_for",
    "one_line_errors",
    "platform_from_args",
    "request_from_args",
]

_T = TypeVar("_T")


def arg_type(check: Callable[[str], _T]) -> Callable[[str], _T]:
    """An argparse ``type=`` from a validator of the options' own types (:mod:`mlaprop.options`): the rule
    is written once, and argparse reports its ``ValueError`` message as ``argument --x: MESSAGE``."""

    def parse(text: str) -> _T:
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = getattr(check, "__name__", "value")
    return parse


def one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Usage errors of ``parser`` print the cause first, as one ``mlaprop: error:`` line, then exit 2 (the
    usage block is on ``--help``)."""

    def error(message: str) -> NoReturn:
        # redacted: argparse quotes what it could not parse, a secret included (``--api-key KEY``)
        parser.exit(ExitCode.USAGE, redact(f"mlaprop: error: {message} (see {parser.prog} --help)\n"))

    parser.error = error  # type: ignore[method-assign]


@dataclass(frozen=True)
class PlatformOptions:
    """Overrides of detection: preview another machine, or correct what the probes see.

    Attributes:
        vendor: ``--vendor`` (``None``: detected, or ``MLAPROP_VENDOR``).
        arch: ``--arch``, ``smXY`` or ``gfxNNN`` (``None``: detected, or ``MLAPROP_ARCH``).
        sglang_version: ``--sglang-version`` whose rules apply (``None``: installed, or
            ``MLAPROP_SGLANG_VERSION``).
        ci_amd: treat ``SGLANG_IS_IN_CI_AMD`` as set to this raw value.
        gpus: visible GPU count (``None``: detected; a preview gets as many as ``tp`` needs).
    """

    vendor: Vendor | None = None
    arch: str | None = None
    sglang_version: str | None = None
    ci_amd: str | None = None
    gpus: int | None = None

    @property
    def is_preview(self) -> bool:
        """A vendor or architecture was named: this describes another machine than the probes see."""
        return bool(self.vendor or self.arch)


def environment_for(
    platform: PlatformOptions,
    environ: Mapping[str, str] | None,
    *,
    tp: int = 1,
    hardware_speaks: bool = False,
) -> Environment:
    """The :class:`Environment` a command works on: detected, with ``platform``'s overrides applied.

    ``hardware_speaks`` (``run`` on a real server, ``preflight``): every AMD signal of this machine is probed
    whatever the overrides say, and an override the machine contradicts is an error
    (:func:`mlaprop.detect.detect_environment`); otherwise (``compose``, ``env``, ``run --simulate``) an
    override previews another machine.

    Raises:
        InvalidEnvironment: an override or ``MLAPROP_*`` variable holds an unknown value.
        mlaprop.detect.HardwareConflict: with ``hardware_speaks``, the override and the machine disagree.
    """
    env = detect_environment(
        environ,
        vendor=platform.vendor,
        arch=platform.arch,
        sglang_version=platform.sglang_version,
        hardware_speaks=hardware_speaks,
    )
    if platform.ci_amd is not None:
        env = replace(env, ci=replace(env.ci, sglang_is_in_ci_amd=platform.ci_amd))
    gpus = platform.gpus
    if gpus is None and platform.is_preview and env.gpu_count > 0:
        gpus = max(env.gpu_count, tp)  # a preview has the GPUs tp needs, unless the masks hide them all
    return env if gpus is None else replace(env, gpu_count=gpus)


def add_platform_options(p: argparse.ArgumentParser) -> None:
    """``--vendor``, ``--arch``, ``--sglang-version``, ``--ci-amd``, ``--gpus``."""
    g = p.add_argument_group("platform (overrides detection; preview another machine)")
    g.add_argument("--vendor", choices=[v.value for v in Vendor], help="GPU vendor (MLAPROP_VENDOR)")
    g.add_argument("--arch", help="GPU architecture: sm80, sm90, sm100, gfx90a, gfx942 ... (MLAPROP_ARCH)")
    g.add_argument(
        "--sglang-version",
        help=f"SGLang version whose rules apply ({KNOWN_VERSIONS[0]}..{KNOWN_VERSIONS[-1]})",
    )
    g.add_argument("--ci-amd", metavar="VALUE", help="treat SGLANG_IS_IN_CI_AMD as set to VALUE")
    g.add_argument("--gpus", type=int, metavar="N", help="visible GPU count (default: detected)")


def platform_from_args(args: argparse.Namespace) -> PlatformOptions:
    """The platform overrides on the command line."""
    return PlatformOptions(
        vendor=Vendor(args.vendor) if args.vendor else None,
        arch=args.arch or None,
        sglang_version=args.sglang_version or None,
        ci_amd=args.ci_amd,
        gpus=args.gpus,
    )


class _AppendServerArgs(argparse.Action):
    """``--server-args`` may be given more than once: each string's words are appended, in order."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[object] | None,
        option_string: str | None = None,
    ) -> None:
        try:
            words = tuple(shlex.split(str(values)))
        except ValueError as exc:
            # the value is not repeated: a secret in it (``--api-key 'KEY``) is past what redaction can find
            raise argparse.ArgumentError(
                self,
                f"not valid shell quoting ({exc}); close every quote (the value is not shown: it may hold a secret)",
            ) from None
        setattr(namespace, self.dest, (*getattr(namespace, self.dest, ()), *words))


def add_request_options(p: argparse.ArgumentParser) -> None:
    """What to ask of SGLang: model, backend, KV cache dtype, tp, deterministic, extra server arguments."""
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
        action=_AppendServerArgs,
        default=(),
        metavar="ARGS",
        help="extra SGLang server arguments as one string, e.g. --server-args='--mem-fraction-static 0.8'; "
        "repeat it to add more (each is appended), or put them after --: "
        "mlaprop compose -- --mem-fraction-static 0.8",
    )


def request_from_args(args: argparse.Namespace) -> LaunchRequest:
    """The launch request on the command line (``--server-args`` words, then those after ``--``).

    Raises:
        InvalidEnvironment: the request is impossible (``LaunchRequest``'s own checks).
    """
    return LaunchRequest(
        model=args.model,
        kv_cache_dtype=KVCacheDtype(args.kv_cache_dtype),
        deterministic=not args.no_deterministic,
        attention_backend=AttentionBackend(args.attention_backend) if args.attention_backend else None,
        tp_size=args.tp,
        extra_args=(*args.server_args, *getattr(args, "server_argv", ())),
        kv_heads=args.kv_heads,
    )
