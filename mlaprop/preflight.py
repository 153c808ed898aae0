"""Checks that refuse a GPU run loudly, within seconds, before any server is launched.

A GPU CI job that starts on the wrong runner, with every device masked, without SGLang, or offline without
the model's weights would otherwise fail only after the launch timeout (600 s upstream, 3600 s on AMD CI),
or, worse, be skipped and reported green. Each check here says what was expected, what was found, and how
to fix it.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mlaprop.environment import Environment, Vendor

__all__ = [
    "PreflightError",
    "PreflightResult",
    "check_gpu",
    "check_model_available",
    "check_sglang_importable",
    "hf_hub_cache",
    "hf_offline",
    "preflight",
]


class PreflightError(RuntimeError):
    """A GPU run cannot start here. The message's first line names the cause; the rest says how to fix it."""


def check_gpu(environment: Environment, expect: Vendor | None) -> None:
    """Refuse the wrong vendor or no visible GPU.

    Args:
        environment: the detected environment.
        expect: the vendor this run is for (``tox -e gpu-amd`` expects ``Vendor.AMD``), or ``None``.

    Raises:
        PreflightError: no GPU found, every device hidden by the masks, or a vendor other than ``expect``.
    """
    if environment.vendor is Vendor.NONE:
        nvidia, amd = (
            "`mlaprop compose --vendor nvidia --arch sm90`",
            "`mlaprop compose --vendor amd --arch gfx942`",
        )
        preview = nvidia if expect is Vendor.NVIDIA else amd if expect is Vendor.AMD else f"{nvidia} or {amd}"
        raise PreflightError(
            f"no GPU found: expected {'an ' + str(expect).upper() if expect else 'a'} GPU, but torch, nvidia-smi "
            f"and rocminfo saw none.\nRun on a GPU runner, or preview the plan with {preview}."
        )
    if expect is not None and environment.vendor is not expect:
        other = "gpu-nvidia" if environment.vendor is Vendor.NVIDIA else "gpu-amd"
        raise PreflightError(
            f"wrong GPU vendor: this run expects {str(expect).upper()}, but found {str(environment.vendor).upper()} "
            f"{environment.arch} x{environment.gpu_count}.\nUse `tox -e {other}` on this machine."
        )
    if environment.gpu_count == 0:
        raise PreflightError(
            f"no visible GPU: found {environment.vendor} {environment.arch}, but the device masks hide every "
            "device.\n"
            + "\n".join(environment.notes)
            + "\nUnset CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES / "
            "ROCR_VISIBLE_DEVICES or list a device in them."
        )


def check_sglang_importable(find_spec: Callable[[str], object] = importlib.util.find_spec) -> None:
    """Refuse when ``sglang`` cannot be imported by this Python (the one that launches the server).

    Raises:
        PreflightError: ``sglang`` is not importable; the message names this interpreter and how to install.
    """
    import sys

    try:
        spec = find_spec("sglang")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise PreflightError(
            f"SGLang is not importable from {sys.executable}.\nInstall it in this environment "
            "(pip install 'sglang[all]'), or run the tox env with the GPU image's Python, whose SGLang the "
            "gpu-* envs reuse through system_site_packages; if SGLang lives in a venv (such as "
            "/opt/torch/.venv), set MLAPROP_PYTHON to that venv's python for `tox -e gpu-nvidia` / `gpu-amd`."
        )


#: huggingface_hub's ``ENV_VARS_TRUE_VALUES`` (``constants.py``), compared after ``.upper()``, unstripped.
HF_TRUE_VALUES = frozenset({"1", "ON", "YES", "TRUE"})

_VAR = re.compile(r"\$(\w+|\{[^}]*\})")


def hf_offline(environ: Mapping[str, str]) -> tuple[bool, str | None]:
    """Hugging Face offline mode as ``huggingface_hub`` reads it, and the ``NAME=value`` that decided it.

    ``HF_HUB_OFFLINE = _is_true(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))``
    (``huggingface_hub/constants.py``): the first *non-empty* of the two is read, and it is true when its
    upper-cased value is ``1``, ``ON``, ``YES`` or ``TRUE``. So ``HF_HUB_OFFLINE=ON`` and
    ``TRANSFORMERS_OFFLINE=1`` are offline; ``HF_HUB_OFFLINE=y`` is not (SGLang's ``EnvBool`` would say yes);
    ``HF_HUB_OFFLINE=0`` wins over ``TRANSFORMERS_OFFLINE=1``.

    Returns:
        ``(offline, "NAME='value'")``; the second item is ``None`` when neither variable is set non-empty.
    """
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = environ.get(name)
        if value:
            return value.upper() in HF_TRUE_VALUES, f"{name}={value}"
    return False, None


def _expand(path: str, environ: Mapping[str, str]) -> str:
    """``os.path.expandvars(os.path.expanduser(path))`` against ``environ`` instead of ``os.environ``:
    ``~`` and ``~/...`` use ``HOME`` (else the password database), ``$NAME`` / ``${NAME}`` are replaced when
    set and left as written otherwise (``os.path.expandvars``' rule)."""
    if path == "~" or path.startswith("~/"):
        home = environ.get("HOME") or str(Path.home())
        path = home.rstrip("/") + path[1:] if home != "/" else "/" + path[2:]
    elif path.startswith("~"):
        path = os.path.expanduser(path)

    def sub(m: re.Match[str]) -> str:
        name = m.group(1).strip("{}")
        return environ.get(name, m.group(0))

    return _VAR.sub(sub, path)


def hf_hub_cache(environ: Mapping[str, str]) -> Path:
    """The Hugging Face hub cache folder as ``huggingface_hub`` computes it (``constants.py``):
    ``HF_HUB_CACHE``, else the legacy ``HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub`` with ``HF_HOME``
    defaulting to ``$XDG_CACHE_HOME/huggingface`` (``XDG_CACHE_HOME`` defaulting to ``~/.cache``); ``~`` and
    ``$VARS`` expanded in ``HF_HOME`` and in the result (so ``HF_HOME='~/hf'`` is ``$HOME/hf``)."""
    default_home = _expand("~", environ) + "/.cache"
    home = _expand(
        environ.get("HF_HOME", os.path.join(environ.get("XDG_CACHE_HOME", default_home), "huggingface")),
        environ,
    )
    legacy = environ.get("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub"))
    return Path(_expand(environ.get("HF_HUB_CACHE", legacy), environ))


def check_model_available(model: str, environ: Mapping[str, str]) -> None:
    """Refuse a model that cannot be loaded offline.

    A local folder must hold ``config.json``. A Hugging Face id must be in the hub cache (a snapshot with a
    ``config.json``) when Hugging Face offline mode is on (:func:`hf_offline`); online, a missing model is
    downloaded by SGLang.

    Raises:
        PreflightError: the folder is missing or has no ``config.json``, or the model is not cached while
            offline; the message names the model, the variable that set offline mode, ``HF_HOME`` and the
            cache folder.
    """
    local = Path(model).expanduser()
    if local.exists() or model.startswith(("/", "./", "../", "~")):
        if not (local / "config.json").is_file():
            raise PreflightError(
                f"model folder {model} {'has no config.json' if local.exists() else 'does not exist'}.\n"
                "Pass a folder holding a Hugging Face model (config.json, weights, tokenizer) or a hub id."
            )
        return
    offline, why = hf_offline(environ)
    if not offline:
        return
    cache = hf_hub_cache(environ)
    repo = cache / ("models--" + model.replace("/", "--"))
    if not any((repo / "snapshots").glob("*/config.json")):
        raise PreflightError(
            f"model {model} is not in the Hugging Face cache and {why}: looked in {repo} "
            f"(HF_HOME={environ.get('HF_HOME', '<unset>')}).\nDownload it first on a machine with access "
            f"(huggingface-cli download {model}) into that HF_HOME, point HF_HOME at the cache that holds it, "
            "or turn offline mode off (unset HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE)."
        )


@dataclass(frozen=True)
class PreflightResult:
    """What was checked, for the report: one line per check."""

    checks: tuple[str, ...]


def preflight(
    environment: Environment,
    *,
    expect: Vendor | None,
    model: str,
    environ: Mapping[str, str] | None = None,
    need_sglang: bool = True,
    find_spec: Callable[[str], object] = importlib.util.find_spec,
) -> PreflightResult:
    """Run every check, in order: GPU and vendor, SGLang importable, model available.

    Raises:
        PreflightError: the first check that fails.
    """
    env = os.environ if environ is None else environ
    check_gpu(environment, expect)
    checks = [f"GPU: {environment.vendor} {environment.arch} x{environment.gpu_count}"]
    if need_sglang:
        check_sglang_importable(find_spec)
        checks.append("SGLang importable")
    check_model_available(model, env)
    checks.append(f"model available: {model}")
    return PreflightResult(tuple(checks))
