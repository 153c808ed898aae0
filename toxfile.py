"""tox's inline plugin for this project (tox loads ``toxfile.py`` from the folder holding ``tox.ini``).

GPU runners whose SGLang and torch live in a virtualenv (``/opt/torch/.venv`` on the H200 image, as on many
runner images) cannot use the ``gpu-nvidia`` / ``gpu-amd`` envs as they are: ``system_site_packages`` gives a
tox env the *base* interpreter's packages, never another virtualenv's (virtualenv resolves a venv's Python
to its base interpreter). With ``MLAPROP_PYTHON`` set to that venv's Python::

    MLAPROP_PYTHON=/opt/torch/.venv/bin/python tox -e gpu-nvidia

the GPU envs are built from that interpreter (same Python version and ABI as its packages), and before
anything is installed a ``.pth`` file in the tox env adds the venv's site-packages after the env's own (a
``site.addsitedir`` line, so the venv's own ``.pth`` files run too). pip then counts what the venv has as
installed, so an offline runner installs nothing it already has; mlaprop and its test tools are the tox
env's. Unset, the envs behave as before (the runner's Python and its system site-packages).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tox.config.loader.memory import MemoryLoader
from tox.plugin import impl
from tox.tox_env.errors import Fail

if TYPE_CHECKING:
    from tox.config.sets import EnvConfigSet
    from tox.session.state import State
    from tox.tox_env.api import ToxEnv

#: The variable naming the runner venv's Python.
VARIABLE = "MLAPROP_PYTHON"
#: The file written into the tox env's site-packages.
PTH_NAME = "_mlaprop_runner_venv.pth"
#: The envs that run real SGLang (not the ``-sim`` ones).
GPU_ENVS = ("gpu-nvidia", "gpu-amd")

_PATHS = "import json, sys, sysconfig; print(json.dumps([sys.prefix, sys.base_prefix, sorted({sysconfig.get_path('purelib'), sysconfig.get_path('platlib')})]))"


def pth_text(site_dirs: list[str]) -> str:
    """The ``.pth`` content: one ``import site; site.addsitedir(...)`` line per folder (``.pth`` lines that
    start with ``import`` are executed by ``site``; plain path lines would skip the folder's own ``.pth``)."""
    return "".join(f"import site; site.addsitedir({d!r})\n" for d in site_dirs)


def _runner_python() -> str | None:
    value = os.environ.get(VARIABLE, "").strip()
    return value or None


def _site_dirs(python: str) -> list[str]:
    """The runner venv's site-packages folders, asked of its own interpreter.

    Raises:
        Fail: the interpreter cannot be run, or is not inside a virtualenv.
    """
    try:
        out = subprocess.run([python, "-c", _PATHS], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise Fail(
            f"{VARIABLE}={python}: cannot run it ({exc}); give the venv's python, e.g. /opt/torch/.venv/bin/python"
        ) from None
    prefix, base, dirs = json.loads(out.stdout)
    if prefix == base:
        raise Fail(
            f"{VARIABLE}={python} is not a virtualenv's Python (sys.prefix == sys.base_prefix == {prefix}); "
            "unset it: the gpu envs already see this interpreter's packages through system_site_packages"
        )
    return [str(d) for d in dirs]


@impl
def tox_add_env_config(env_conf: EnvConfigSet, state: State) -> None:
    """With ``MLAPROP_PYTHON`` set, the GPU envs are built from that interpreter."""
    python = _runner_python()
    if python is not None and env_conf.name in GPU_ENVS:
        env_conf.loaders.insert(0, MemoryLoader(base_python=[python]))


def _sync_pth(tox_env: ToxEnv) -> None:
    if tox_env.name not in GPU_ENVS:
        return
    site = Path(str(tox_env.conf["env_site_packages_dir"]))
    pth = site / PTH_NAME
    python = _runner_python()
    if python is None:
        pth.unlink(missing_ok=True)
        return
    text = pth_text(_site_dirs(python))
    if not pth.is_file() or pth.read_text() != text:
        site.mkdir(parents=True, exist_ok=True)
        pth.write_text(text)


@impl
def tox_on_install(tox_env: ToxEnv, arguments: Any, section: str, of_type: str) -> None:
    """Before each install step: the runner venv's site-packages are visible, so pip sees them installed."""
    _sync_pth(tox_env)


@impl
def tox_before_run_commands(tox_env: ToxEnv) -> None:
    """Before the commands (also when nothing was installed this time): the ``.pth`` matches the setting."""
    _sync_pth(tox_env)
