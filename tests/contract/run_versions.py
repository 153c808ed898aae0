"""Run the contract suite against every SGLang release mlaprop claims, in one environment.

The heavy stack (CPU torch, triton, ...: ``tests/contract/requirements.txt``) is installed once by tox; per
version only SGLang and the packages it pins exactly that the stack must match (``transformers``,
``tokenizers``, and ``huggingface_hub`` below transformers 5) are installed with ``--no-deps`` into a folder of
their own (``<cache>/sglang-X``), which is put first on ``PYTHONPATH`` for a pytest subprocess. Pins are read
from the wheel's own ``METADATA``, so a new release needs no edit here.

Usage (tox ``-e contract`` / ``-e contract-newest`` call it)::

    python tests/contract/run_versions.py [--versions 0.5.4 0.5.23 ...] [--newest] [-- pytest args]

``--newest`` asks PyPI for the newest SGLang release and fails, naming it, when mlaprop's rules do not know
it (``mlaprop.capabilities.KNOWN_VERSIONS`` and the option tables); otherwise it runs the suite on it.
Versions other than the anchors (0.5.11, 0.5.23) run a stratified sample of the sweep
(``MLAPROP_CONTRACT_SAMPLE``). A summary line per version gives its test counts and wall time.
"""

from __future__ import annotations

import argparse
import email.parser
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ANCHORS = ("0.5.11", "0.5.23")
#: Every Nth sweep case off the anchors (stratified by platform and request kind in test_contract.py).
SAMPLE_EVERY = 7


def claimed_versions() -> tuple[str, ...]:
    sys.path.insert(0, str(REPO))
    from mlaprop.capabilities import KNOWN_VERSIONS

    return KNOWN_VERSIONS


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True)


def pins(wheel: Path) -> list[str]:
    """The exact pins of ``wheel`` that the shared stack must follow: transformers, tokenizers (0.22.2 where
    the wheel does not pin it, and ``huggingface_hub<1`` for transformers 4)."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(zf.read(meta).decode())
    out = []
    for req in msg.get_all("Requires-Dist") or []:
        if "extra ==" in req:
            continue
        m = re.match(r"^(transformers|tokenizers)\s*==\s*([\w.]+)", req.strip())
        if m:
            out.append(f"{m.group(1)}=={m.group(2)}")
    if any(p.startswith("transformers==4.") for p in out):
        out.append("huggingface_hub<1")
    if not any(p.startswith("tokenizers") for p in out):
        out.append("tokenizers==0.22.2")  # what transformers 4.57-5.12 accept (>=0.22,<=0.23.0)
    return out


def install(version: str, cache: Path) -> Path:
    """SGLang ``version`` and its pins, in ``cache/sglang-<version>`` (reused when present)."""
    target = cache / f"sglang-{version}"
    if (target / ".complete").exists():
        return target
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    _pip("download", "--no-deps", "-d", str(wheels), f"sglang=={version}")
    wheel = next(w for w in wheels.glob(f"sglang-{version}-*.whl"))
    _pip("install", "--no-deps", "--target", str(target), str(wheel), *pins(wheel))
    (target / ".complete").write_text(json.dumps(pins(wheel)))
    return target


def newest_release() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "sglang"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"sglang \(([^)]+)\)", out)
    if not m:
        raise SystemExit(f"could not read the newest SGLang release from pip: {out[:300]}")
    return m.group(1)


def run(version: str, cache: Path, pytest_args: list[str]) -> tuple[int, str]:
    target = install(version, cache)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), str(REPO), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env["MLAPROP_CONTRACT"] = "1"
    env["MLAPROP_CONTRACT_SGLANG"] = version
    if version not in ANCHORS:
        env.setdefault("MLAPROP_CONTRACT_SAMPLE", str(SAMPLE_EVERY))
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/contract",
            "-m",
            "contract",
            "-p",
            "no:cacheprovider",
            "-q",
            "--no-header",
            *pytest_args,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.monotonic() - start
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    sys.stdout.write(proc.stdout if proc.returncode else "")
    sys.stderr.write(proc.stderr[-4000:] if proc.returncode else "")
    return proc.returncode, f"SGLang {version}: {tail} ({wall:.0f} s)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, pytest_args = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--versions", nargs="*", help="default: every claimed version")
    p.add_argument("--newest", action="store_true", help="the newest SGLang release on PyPI only")
    p.add_argument(
        "--cache", type=Path, default=Path(os.environ.get("MLAPROP_CONTRACT_CACHE", REPO / ".tox" / "sglang"))
    )
    args = p.parse_args(argv)
    claimed = claimed_versions()
    if args.newest:
        newest = newest_release()
        from mlaprop.args import table_versions

        if newest not in claimed or newest not in table_versions():
            print(
                f"SGLang {newest} is the newest release on PyPI, but mlaprop's rules stop at {claimed[-1]}: add it "
                "to mlaprop/capabilities.py KNOWN_VERSIONS (and _rules() for what changed), regenerate the option "
                f"table (python tools/extract_options.py --wheels DIR --versions {newest}), then run "
                f"`tox -e contract -- --versions {newest}`",
                file=sys.stderr,
            )
            return 1
        versions = [newest]
    else:
        versions = args.versions or list(claimed)
    failed = []
    lines = []
    for version in versions:
        code, line = run(version, args.cache, pytest_args)
        print(line, flush=True)
        lines.append(line)
        if code:
            failed.append(version)
    print("\n".join(["contract summary:", *lines]))
    if failed:
        print(f"contract failures on SGLang {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
