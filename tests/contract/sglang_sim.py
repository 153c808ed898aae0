"""Run SGLang's own argument pipeline for a simulated platform, on a CPU machine.

``load()`` imports the installed SGLang once (with the stand-ins below) and returns an :class:`SGLang`
whose :meth:`SGLang.resolve` feeds an argv to SGLang's real CLI parser (``prepare_server_args``) and its
real resolution, with the platform facts of an mlaprop :class:`~mlaprop.environment.Environment`:

- SGLang >= 0.5.12 or so has ``sglang.srt.runtime_context.override_platform(**facts)``; it is used as is.
- Older SGLang (0.5.11) resolves inside ``ServerArgs.__post_init__`` and reads the probes it imported into
  ``sglang.srt.server_args`` (``is_hip``, ``is_cuda``, ``is_sm90_supported``, ...). Those names are
  discovered in the installed module and patched for the duration of one resolution; a probe this module
  does not know fails loudly (:class:`SimulationGap`) rather than keeping the CPU machine's answer.

Stand-ins (the only things not real):

- ``torchvision``: the PyPI wheel needs a CUDA torch; ``sgl_kernel`` (CUDA kernels, imported by 0.5.8-0.5.10
  while loading the FP8 quantization config) likewise. An import stand-in answers SGLang's module-level
  ``import torchvision...`` lines; it is installed only after transformers has cached "torchvision not
  available", so transformers never takes a torchvision code path.
- ``transformers.AutoImageProcessor`` on transformers builds that gate it on torchvision (5.6, used by SGLang
  0.5.11): SGLang registers multimodal image processors at import time; the registration is replaced by a
  no-op. The argument pipeline never builds an image processor.

Limits of the simulation: the GPU memory probe (``get_device_memory_capacity``) and a few probes called
directly from ``sglang.srt.utils.common`` (``is_npu``; ``is_gfx95_supported`` from 0.5.19) keep the CPU
machine's answer; they steer memory sizing and MoE kernels, not the attention backend.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import io
import json
import logging
import os
import re
import sys
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.version import Version

from mlaprop.capabilities import parse_arch
from mlaprop.environment import Environment, Vendor

__all__ = [
    "MODEL_CONFIG",
    "Outcome",
    "Platform",
    "SGLang",
    "SimulationGap",
    "load",
    "platform_for",
    "write_model_dir",
]

#: ``config.json`` of ``neuralmagic/DeepSeek-Coder-V2-Lite-Instruct-FP8`` (the model of SGLang's
#: ``test/registered/mla/test_mla_fp8.py``), reduced to what SGLang's argument pipeline reads: architecture,
#: MLA shape, MoE shape, FP8 quantization. No weights, no tokenizer.
MODEL_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 64,
    "num_experts_per_tok": 6,
    "n_shared_experts": 2,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "greedy",
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "norm_topk_prob": False,
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
    "vocab_size": 102400,
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
    },
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "torch_dtype": "bfloat16",
    "quantization_config": {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "ignored_layers": ["lm_head"],
    },
}


def write_model_dir(folder: Path) -> Path:
    """Write :data:`MODEL_CONFIG` as ``folder/config.json``; return ``folder`` (a ``--model-path``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(MODEL_CONFIG, indent=2) + "\n")
    return folder


class SimulationGap(RuntimeError):
    """The installed SGLang reads a platform fact this simulation does not set; extend :func:`platform_for`."""


@dataclass(frozen=True)
class Platform:
    """Platform facts in SGLang's terms (the keys of ``override_platform``), derived from an Environment."""

    is_cuda: bool
    is_hip: bool
    major: int  # device capability as torch reports it (ROCm too: gfx942 -> 9.4)
    minor: int
    cuda: tuple[int, int]  # torch.version.cuda; (0, 0) on ROCm
    has_flashinfer: bool

    def _cuda_sm(self, majors: tuple[int, ...], need: tuple[int, int]) -> bool:
        # sglang/srt/utils/common.py _check_cuda_device_version: is_cuda and major in majors and CUDA >= need
        return self.is_cuda and self.major in majors and self.cuda >= need

    def facts(self) -> dict[str, Any]:
        """Every fact of SGLang 0.5.23's ``_PLATFORM_PROBES`` / ``_PLATFORM_VALUES``."""
        sm90 = self._cuda_sm((9,), (12, 3))
        return {
            "is_cuda": self.is_cuda,
            "is_hip": self.is_hip,
            "is_npu": False,
            "is_xpu": False,
            "is_musa": False,
            "is_mps": False,
            "is_sm90": sm90,
            "is_sm100": self._cuda_sm((10,), (12, 8)),
            "is_sm100_or_sm110": self._cuda_sm((10, 11), (12, 8)),
            "is_sm110": self._cuda_sm((11,), (12, 8)),
            "is_sm120": self._cuda_sm((12,), (12, 8)),
            "is_blackwell": self._cuda_sm((10, 11, 12), (12, 8)),
            "is_hopper_with_cuda_12_3": sm90,
            # not an override_platform fact: the legacy probe is_gfx95_supported (gcnArchName contains gfx95)
            "is_gfx95": self.is_hip and (self.major, self.minor) == (9, 5),
            "has_amx": False,
            "has_flashinfer": self.has_flashinfer,
            "device_sm": self.major * 10 + self.minor,
            "device_capability": (self.major, self.minor),
        }


#: torch's device capability on ROCm (gcnArchName gfx9XY -> (9, Y)).
_ROCM_CAPABILITY = {"gfx90a": (9, 0), "gfx942": (9, 4), "gfx950": (9, 5), "gfx1100": (11, 0)}


def platform_for(environment: Environment) -> Platform:
    """What SGLang's probes answer on ``environment``.

    ROCm whenever ``torch.version.hip`` is set or the vendor is AMD (SGLang's ``is_hip``; a HIP torch has no
    ``torch.version.cuda``, so ``is_cuda`` is false and every SM check with it). On NVIDIA an unknown CUDA
    version (``None``: detected without torch) is taken as 12.8, the version mlaprop's rules assume then.
    """
    family, n = parse_arch(environment.arch)
    if environment.vendor is Vendor.AMD or environment.torch_hip:
        if family == "gfx":
            major, minor = _ROCM_CAPABILITY.get(environment.arch.lower(), (9, 4))
        else:
            major, minor = divmod(n, 10)
        return Platform(False, True, major, minor, (0, 0), False)
    if environment.vendor is not Vendor.NVIDIA or family != "sm":
        raise ValueError(f"no SGLang platform for {environment.vendor} {environment.arch}")
    major, minor = divmod(n, 10)
    cuda = tuple(int(p) for p in (environment.cuda_version or "12.8").split(".")[:2])
    return Platform(True, False, major, minor, (cuda[0], cuda[1]), True)


@dataclass(frozen=True)
class Outcome:
    """What SGLang made of one argv: the resolved attention backend, or the error it raised."""

    backend: str | None = None
    error: str | None = None  # "ValueError: ..." ; SystemExit from argparse reads "argparse: exit 2"
    parse_error: bool = False  # the CLI parser itself refused the argv
    values: Mapping[str, Any] = field(default_factory=dict)  # other resolved fields worth asserting

    @property
    def ok(self) -> bool:
        return self.error is None


# --- stand-ins ------------------------------------------------------------------------------------------


class _StubMeta(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _StubMeta(name, (cls,), {})


class _Stub(metaclass=_StubMeta):
    """Any attribute of the torchvision stand-in: a class that can be subclassed, called and dotted into."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub()


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Stand-in modules for ``names`` (``torchvision``; ``sgl_kernel``, the CUDA kernel wheel that SGLang
    0.5.8-0.5.10 import while loading an FP8 model's quantization config)."""

    def __init__(self, names: tuple[str, ...] = ("torchvision",)) -> None:
        self.names = names

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = types.ModuleType(
            spec.name, "mlaprop contract-test stand-in: the argument pipeline needs no torchvision"
        )
        module.__path__ = []

        def __getattr__(name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)
            return _StubMeta(name, (_Stub,), {})

        module.__getattr__ = __getattr__  # type: ignore[method-assign]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class _NoImageProcessors:
    """Takes the place of a torchvision-gated ``transformers.AutoImageProcessor``: registration is a no-op."""

    @staticmethod
    def register(*args: Any, **kwargs: Any) -> None:
        return None


def _install_stand_ins() -> None:
    if importlib.util.find_spec("torchvision") is None:
        from transformers.utils import import_utils

        if import_utils.is_torchvision_available():  # pragma: no cover - the finder is not installed yet
            raise SimulationGap("transformers reports torchvision available although it is not installed")
        sys.meta_path.insert(0, _TorchvisionStandIn())
    if importlib.util.find_spec("sgl_kernel") is None:
        sys.meta_path.insert(0, _TorchvisionStandIn(("sgl_kernel",)))
    import sglang  # noqa: F401  (applies SGLang's transformers patches, which may rebuild the module)

    transformers = importlib.import_module("transformers")
    if "torchvision" in getattr(transformers.AutoImageProcessor, "_backends", ()):
        transformers.AutoImageProcessor = _NoImageProcessors


# --- the SGLang adapter ---------------------------------------------------------------------------------

#: Probes imported into ``sglang.srt.server_args`` (0.5.11) and the fact each one answers.
_LEGACY_PROBES: dict[str, str] = {
    "is_cuda": "is_cuda",
    "is_hip": "is_hip",
    "is_npu": "is_npu",
    "is_xpu": "is_xpu",
    "is_musa": "is_musa",
    "is_mps": "is_mps",
    "is_cpu": "_false",
    "cpu_has_amx_support": "has_amx",
    "is_sm90_supported": "is_sm90",
    "is_sm100_supported": "is_sm100",
    "is_sm100_or_sm110_supported": "is_sm100_or_sm110",
    "is_sm110_supported": "is_sm110",
    "is_sm120_supported": "is_sm120",
    "is_blackwell_supported": "is_blackwell",
    "is_gfx95_supported": "is_gfx95",  # 0.5.16-0.5.18 arg_groups/overrides.py: mxfp8 MoE default on ROCm
    "xpu_has_xmx_support": "_false",  # 0.5.15-0.5.18 arg_groups/overrides.py: Intel XPU only
    "is_hopper_with_cuda_12_3": "is_hopper_with_cuda_12_3",
    "is_flashinfer_available": "has_flashinfer",
    "get_device_sm": "device_sm",
    "get_device_capability": "device_capability",
}
#: Facts only the legacy probe patching reads (no ``override_platform`` keyword of any release).
_LEGACY_ONLY_FACTS = frozenset({"is_gfx95"})
#: Names in ``sglang.srt.server_args`` that look like probes but are not facts about the GPU.
_NOT_PLATFORM = frozenset(
    {
        "is_in_ci",
        "is_remote_url",
        "is_runai_obj_uri",
        "is_no_spec_infer_or_topk_one",
        "is_triton_kernels_available",
        "is_valid_ipv6_address",
        "is_port_available",
        "is_npu_available",
        "is_fa3_default_architecture",  # 0.5.5-0.5.7: a property of the model's architecture (MHA models)
        "is_host_cpu_arm64",  # 0.5.12-0.5.18: the host CPU (the CPU machine's answer, x86, is the runners')
        "is_mnnvl_fabric_device",  # 0.5.17-0.5.18: multi-node NVLink, steers all-reduce, not attention
        "is_record",
    }
)
_PROBE_NAME = re.compile(r"^(is_[a-z0-9_]+|cpu_has_[a-z0-9_]+|get_device_sm|get_device_capability)$")

#: Environment variables SGLang's resolution writes (deterministic inference, NCCL) are restored after it.
_LOGGING_NAMES = ("sglang",)


@contextlib.contextmanager
def _preserved_process_state(env: Mapping[str, str]) -> Iterator[None]:
    """Apply ``env`` for one resolution; afterwards restore ``os.environ`` and the root logger exactly."""
    saved_environ = dict(os.environ)
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved_environ)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


class SGLang:
    """The installed SGLang's argument pipeline, for simulated platforms."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.server_args = importlib.import_module("sglang.srt.server_args")
        self.version: str = importlib.import_module("sglang.version").__version__
        self.has_override_platform = hasattr(self.server_args.ServerArgs, "resolve_once")
        self._legacy_probes: dict[str, str] = {}
        self._live_facts: set[str] = set()
        if self.has_override_platform:
            rc = importlib.import_module("sglang.srt.runtime_context")
            known = set(Platform(True, False, 9, 0, (12, 8), True).facts())
            live = set(getattr(rc, "_PLATFORM_PROBES", {})) | set(getattr(rc, "_PLATFORM_VALUES", {}))
            #: the facts this version's override_platform accepts (0.5.19 has no is_mps / is_sm110)
            self._live_facts = live
            if live - known:
                raise SimulationGap(
                    f"SGLang {self.version}'s override_platform knows facts this simulation does not set: "
                    f"{sorted(live - known)}; add them to tests/contract/sglang_sim.py Platform.facts()"
                )
        else:
            with contextlib.suppress(ImportError):  # 0.5.15-0.5.19: imported lazily by the resolution
                importlib.import_module("sglang.srt.arg_groups.overrides")
            self._legacy_probes = self._discover_legacy_probes()
        #: 0.5.4 fills the MLA default and switches fa3 + fp8_e5m2 to triton at start-up (model_runner), not
        #: in server_args: that step is applied after SGLang's argument pipeline (:func:`_model_runner_0_5_4`).
        self.runtime_default = Version(self.version) < Version("0.5.5")
        self._cache: dict[tuple[Any, ...], Outcome] = {}
        self._parser: argparse.ArgumentParser | None = None
        #: hand ``prepare_server_args`` the prebuilt parser (set False to build one per call, as SGLang does)
        self.reuse_parser = True

    def _discover_legacy_probes(self) -> dict[str, str]:
        """The probes ``server_args`` and (0.5.15-0.5.18) ``srt/arg_groups/*.py`` import by name, mapped to
        facts. Each module is scanned: 0.5.15's ``arg_groups/overrides.py`` imports ``is_blackwell_supported``
        (the ``trtllm_mla`` / ``tokenspeed_mla`` Blackwell gates) although ``server_args`` does not.
        Raises :class:`SimulationGap` for a probe not in ``_LEGACY_PROBES`` or ``_NOT_PLATFORM``."""
        found: dict[str, str] = {}
        unknown = set()
        for module in _resolution_modules(self.server_args):
            for name, obj in vars(module).items():
                if (
                    not _PROBE_NAME.match(name)
                    or name in _NOT_PLATFORM
                    or not callable(obj)
                    or isinstance(obj, type)
                ):
                    continue
                if getattr(obj, "__module__", None) == module.__name__:
                    continue  # defined in that module itself: not an imported probe
                if name in _LEGACY_PROBES:
                    found[name] = _LEGACY_PROBES[name]
                else:
                    unknown.add(f"{module.__name__}.{name}")
        if unknown:
            raise SimulationGap(
                f"SGLang {self.version} imports platform probes this simulation does not patch: "
                f"{sorted(unknown)}; map them in tests/contract/sglang_sim.py _LEGACY_PROBES (or _NOT_PLATFORM)"
            )
        if "is_hip" not in found or "is_cuda" not in found:
            raise SimulationGap(f"sglang.srt.server_args {self.version} no longer imports is_hip/is_cuda")
        return found

    # -- live rules -----------------------------------------------------------------------------------

    def deterministic_allowlist(self) -> frozenset[str]:
        """``DETERMINISTIC_ATTENTION_BACKEND_CHOICES`` as this SGLang has it."""
        return frozenset(self.server_args.DETERMINISTIC_ATTENTION_BACKEND_CHOICES)

    def radix_list(self) -> frozenset[str]:
        """``RADIX_SUPPORTED_DETERMINISTIC_ATTENTION_BACKEND`` as this SGLang has it (0.5.4 has no such list:
        ``_handle_deterministic_inference`` keeps the radix cache for ``fa3`` and ``triton`` literally)."""
        return frozenset(
            getattr(self.server_args, "RADIX_SUPPORTED_DETERMINISTIC_ATTENTION_BACKEND", ("fa3", "triton"))
        )

    def rocm_fused_decode_gated_to_aiter(self) -> bool:
        """Whether ``SGLANG_ROCM_FUSED_DECODE_MLA`` takes the fused decode path only on ``aiter``.

        Read from the source of ``_dispatch_mla_subtype`` (``srt/models/deepseek_common/
        attention_backend_handler.py``) without importing the model code: the ``if`` testing
        ``rocm_fused_decode_mla`` also compares the backend with ``"aiter"`` from 0.5.23 on.
        """
        spec = importlib.util.find_spec("sglang")
        assert spec is not None and spec.submodule_search_locations
        root = Path(next(iter(spec.submodule_search_locations)))
        path = root / "srt/models/deepseek_common/attention_backend_handler.py"
        if not path.exists():  # up to 0.5.7 the dispatch lives in the model file
            path = root / "srt/models/deepseek_v2.py"
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "_dispatch_mla_subtype":
                for test in (n.test for n in ast.walk(node) if isinstance(n, ast.If)):
                    text = ast.unparse(test)
                    if "rocm_fused_decode_mla" in text:
                        return "'aiter'" in text
        raise SimulationGap(f"_dispatch_mla_subtype with a rocm_fused_decode_mla test not found in {path}")

    # -- parsing and resolution -----------------------------------------------------------------------

    def argv(self, plan_argv: Sequence[str]) -> list[str]:
        """The full server argv: the launcher's part (model, host, port), the device, then the plan's."""
        return [
            "--model-path",
            str(self.model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            "30000",
            "--device",
            "cuda",  # the CPU machine would answer "No accelerator"; ROCm's torch device is "cuda" too
            *plan_argv,
        ]

    def parser(self) -> argparse.ArgumentParser:
        """SGLang's CLI parser, built as ``prepare_server_args`` builds it (once: it takes ~40 ms to build and
        argparse parsers are reusable)."""
        if self._parser is None:
            parser = argparse.ArgumentParser(prog="sglang serve")
            self.server_args.ServerArgs.add_cli_args(parser)
            self._parser = parser
        return self._parser

    def parse(self, plan_argv: Sequence[str]) -> str | None:
        """Run SGLang's CLI parser alone; ``None`` when it accepts ``plan_argv``, else its complaint."""
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                self.parser().parse_args(self.argv(plan_argv))
        except SystemExit as exc:
            last = (err.getvalue().strip().splitlines() or [""])[-1]
            return f"argparse exit {exc.code}: {last}"
        return None

    @contextlib.contextmanager
    def _prebuilt_parser(self) -> Iterator[None]:
        """Run ``prepare_server_args`` unchanged except that it gets :meth:`parser` instead of building one.

        ``prepare_server_args`` calls ``argparse.ArgumentParser(...)`` through ``server_args``' own
        ``argparse`` global and then ``ServerArgs.add_cli_args(parser)``; both are redirected for the call
        (``test_prebuilt_parser_resolves_like_a_fresh_one`` checks the shortcut changes nothing).
        """
        parser = self.parser()
        sa = self.server_args
        shim = types.ModuleType("argparse")
        shim.__dict__.update(vars(argparse))
        shim.ArgumentParser = lambda *args, **kwargs: parser  # type: ignore[attr-defined]
        original_add = sa.ServerArgs.__dict__["add_cli_args"]
        sa.argparse = shim
        sa.ServerArgs.add_cli_args = staticmethod(lambda p: None)
        try:
            yield
        finally:
            sa.argparse = argparse
            sa.ServerArgs.add_cli_args = original_add

    def _parser_for_prepare(self) -> contextlib.AbstractContextManager[None]:
        return self._prebuilt_parser() if self.reuse_parser else contextlib.nullcontext()

    def resolve(self, plan_argv: Sequence[str], platform: Platform, env: Mapping[str, str] = {}) -> Outcome:
        """Parse with ``prepare_server_args`` and resolve on ``platform`` with ``env`` set; cached."""
        key = (tuple(plan_argv), tuple(sorted(platform.facts().items())), tuple(sorted(env.items())))
        if key not in self._cache:
            self._cache[key] = self._resolve(list(plan_argv), platform, env)
        return self._cache[key]

    def _resolve(self, plan_argv: list[str], platform: Platform, env: Mapping[str, str]) -> Outcome:
        full = self.argv(plan_argv)
        facts = platform.facts()
        with _preserved_process_state(env):
            try:
                if self.has_override_platform:
                    from sglang.srt.arg_groups.overrides import resolution_result
                    from sglang.srt.runtime_context import override_platform

                    with self._parser_for_prepare():
                        args = self.server_args.prepare_server_args(full)
                    # arg_groups modules of 0.5.15+ also call probes they imported by name
                    accepted = {
                        k: v
                        for k, v in facts.items()
                        if (k in self._live_facts if self._live_facts else k not in _LEGACY_ONLY_FACTS)
                    }
                    with override_platform(**accepted), self._legacy_platform(facts):
                        args.resolve_once()

                    def read(name: str) -> Any:
                        return resolution_result(args, name)
                else:
                    with self._legacy_platform(facts), self._parser_for_prepare():
                        args = self.server_args.prepare_server_args(full)

                    def read(name: str) -> Any:
                        return getattr(args, name)
            except SystemExit as exc:
                return Outcome(error=f"argparse: exit {exc.code}", parse_error=True)
            except Exception as exc:  # SGLang's refusal: ValueError, AssertionError, ...
                return Outcome(error=f"{type(exc).__name__}: {exc}")
            values = {
                name: read(name)
                for name in (
                    "enable_deterministic_inference",
                    "sampling_backend",
                    "disable_radix_cache",
                    "tp_size",
                )
            }
            backend = read("attention_backend")
            if self.runtime_default:
                backend = _model_runner_0_5_4(
                    backend, read("kv_cache_dtype"), int(read("tp_size") or 1), facts
                )
            return Outcome(backend=backend, values=values)

    @contextlib.contextmanager
    def _legacy_platform(self, facts: Mapping[str, Any]) -> Iterator[None]:
        # 0.5.15-0.5.19 moved parts of the resolution to srt/arg_groups/*.py, which import the same probes
        # by name: patch them there too.
        modules = _resolution_modules(self.server_args)
        saved = [
            (m, name, getattr(m, name)) for m in modules for name in self._legacy_probes if hasattr(m, name)
        ]
        try:
            for module, name, _ in saved:
                fact = self._legacy_probes[name]
                setattr(module, name, _constant(False if fact == "_false" else facts[fact]))
            yield
        finally:
            for module, name, original in saved:
                setattr(module, name, original)


def _model_runner_0_5_4(backend: str | None, kv: str, tp: int, facts: Mapping[str, Any]) -> str | None:
    """SGLang 0.5.4's ``ModelRunner.model_specific_adjustment`` for an MLA model with 16 KV heads
    (``srt/model_executor/model_runner.py``): the default backend, then fa3 + fp8_e5m2 -> triton."""
    if backend is None:
        if facts["is_hopper_with_cuda_12_3"]:
            backend = "fa3"
        elif facts["is_sm100"]:
            backend = "flashinfer"
        elif facts["is_hip"]:
            backend = "aiter" if 16 // max(tp, 1) in (16, 128) else "triton"
        else:
            backend = "triton"
    if backend == "fa3" and kv == "fp8_e5m2":
        backend = "triton"
    return backend


def _resolution_modules(server_args: types.ModuleType) -> list[types.ModuleType]:
    """``server_args`` and every imported ``sglang.srt.arg_groups.*`` module (0.5.15+ resolve there)."""
    return [server_args] + [
        m
        for n, m in sorted(sys.modules.items())
        if n.startswith("sglang.srt.arg_groups.") and isinstance(m, types.ModuleType)
    ]


def _constant(value: Any) -> Any:
    def probe(*args: Any, **kwargs: Any) -> Any:
        return value

    return probe


def load(model_dir: Path) -> SGLang:
    """Import the installed SGLang (once per process) with the stand-ins; raise ImportError if absent."""
    if importlib.util.find_spec("sglang") is None:
        raise ImportError("sglang is not installed")
    for name in _LOGGING_NAMES:
        logging.getLogger(name).setLevel(logging.ERROR)
    _install_stand_ins()
    return SGLang(model_dir)
