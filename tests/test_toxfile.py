"""Tests for ``toxfile.py``, the tox plugin behind ``MLAPROP_PYTHON=/opt/torch/.venv/bin/python tox -e
gpu-nvidia`` (issue 13): a tox env built with ``system_site_packages`` from a virtualenv's Python does not see
that venv's packages; the ``.pth`` line the plugin writes makes them visible, to imports and to
``importlib.metadata`` (what pip checks before installing)."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
tox = pytest.importorskip("tox", reason="toxfile.py is a tox plugin; tox -e unit installs tox")
sys.path.insert(0, str(REPO))
import toxfile  # noqa: E402

PROBE = "import fake_sglang, importlib.metadata as m; print(m.version('fake-sglang'))"


def _python(env: Path) -> str:
    return str(env / "bin" / "python")


def _site(env: Path) -> Path:
    out = subprocess.run(
        [_python(env), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def runner_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A runner image's venv holding an installed package (as /opt/torch/.venv holds SGLang and torch)."""
    env = tmp_path_factory.mktemp("runner") / ".venv"
    venv.create(env, with_pip=False)
    site = _site(env)
    (site / "fake_sglang").mkdir()
    (site / "fake_sglang" / "__init__.py").write_text("")
    dist = site / "fake_sglang-0.5.11.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-sglang\nVersion: 0.5.11\n")
    (dist / "RECORD").write_text("")
    return env


def test_pth_text_runs_addsitedir_per_folder() -> None:
    """One executable ``import site; site.addsitedir(...)`` line per folder, quoted safely."""
    assert toxfile.pth_text(["/a b/site", "/c'd"]) == (
        "import site; site.addsitedir('/a b/site')\nimport site; site.addsitedir(\"/c'd\")\n"
    )


def test_pth_makes_the_venv_packages_visible_to_an_env_built_from_it(
    runner_venv: Path, tmp_path: Path
) -> None:
    """An env made with system site-packages from the venv's Python does not see the venv's package (the
    reported 4-second failure); with the plugin's ``.pth`` it imports it and its metadata is found."""
    tox_env = tmp_path / "gpu-nvidia"
    subprocess.run(
        [_python(runner_venv), "-m", "venv", "--without-pip", "--system-site-packages", str(tox_env)],
        check=True,
    )
    before = subprocess.run([_python(tox_env), "-c", PROBE], capture_output=True, text=True, check=False)
    assert before.returncode != 0 and "No module named 'fake_sglang'" in before.stderr
    dirs = toxfile._site_dirs(_python(runner_venv))
    assert str(_site(runner_venv)) in dirs
    (_site(tox_env) / toxfile.PTH_NAME).write_text(toxfile.pth_text(dirs))
    after = subprocess.run([_python(tox_env), "-c", PROBE], capture_output=True, text=True, check=False)
    assert after.returncode == 0, after.stderr
    assert after.stdout.strip() == "0.5.11"


def test_a_python_that_is_not_a_venv_is_refused() -> None:
    """``MLAPROP_PYTHON`` naming a base interpreter, or nothing runnable, fails with the variable named."""
    base = Path(sys.base_prefix) / "bin" / "python3"
    if base.is_file():
        with pytest.raises(tox.tox_env.errors.Fail, match="is not a virtualenv's Python"):
            toxfile._site_dirs(str(base))
    with pytest.raises(tox.tox_env.errors.Fail, match="MLAPROP_PYTHON=/nonexistent/python: cannot run it"):
        toxfile._site_dirs("/nonexistent/python")
