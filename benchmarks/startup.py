"""Start-up cost of ``mlaprop compose --explain``: interpreter + imports versus composing itself.

Run from a checkout with mlaprop installed: ``python benchmarks/startup.py [--runs N]``. Prints, for N fresh
processes, the median wall time of ``python -c pass`` (the interpreter), of ``python -m mlaprop.cli compose
--explain`` (everything), the in-process import time of the command's modules, the composing time, and
which heavy modules (requests, urllib3, tqdm, psutil) the command imported (none expected).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

_PROBE = """
import json, sys, time
t0 = time.perf_counter()
from mlaprop.cli import build_parser
from mlaprop.cli.plan import add_compose
from mlaprop.cli.common import environment_for, PlatformOptions
from mlaprop.compose import compose
from mlaprop.environment import LaunchRequest, Vendor
t1 = time.perf_counter()
env = environment_for(PlatformOptions(vendor=Vendor.NVIDIA, arch="sm90"), {})
plan = compose(env, LaunchRequest())
t2 = time.perf_counter()
heavy = [m for m in ("requests", "urllib3", "tqdm", "psutil") if m in sys.modules]
print(json.dumps({"import_s": t1 - t0, "compose_s": t2 - t1, "heavy": heavy}))
"""

_ENV = {"MLAPROP_VENDOR": "nvidia", "MLAPROP_ARCH": "sm90"}


def _wall(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env={**_ENV, "PATH": ""})
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    runs = parser.parse_args().runs
    bare = [_wall([sys.executable, "-c", "pass"]) for _ in range(runs)]
    full = [_wall([sys.executable, "-m", "mlaprop.cli", "compose", "--explain"]) for _ in range(runs)]
    probes = [
        json.loads(
            subprocess.run([sys.executable, "-c", _PROBE], check=True, capture_output=True, text=True).stdout
        )
        for _ in range(runs)
    ]
    ms = 1000.0
    print(f"runs: {runs} fresh processes each (medians)")
    print(f"interpreter start (python -c pass):       {statistics.median(bare) * ms:7.1f} ms")
    print(f"mlaprop compose --explain, end to end:     {statistics.median(full) * ms:7.1f} ms")
    print(
        f"  import of the compose command's modules: {statistics.median(p['import_s'] for p in probes) * ms:7.1f} ms"
    )
    print(
        f"  detect + compose (in process):           {statistics.median(p['compose_s'] for p in probes) * ms:7.1f} ms"
    )
    print(f"heavy modules imported by compose: {sorted({m for p in probes for m in p['heavy']}) or 'none'}")


if __name__ == "__main__":
    main()
