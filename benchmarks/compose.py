"""Benchmark ``mlaprop.compose``: compositions per second, and the exhaustive sweep's size and time.

Run on demand: ``python benchmarks/compose.py``. Prints figures; asserts nothing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlaprop.compose import compose
from mlaprop.environment import CIMarkers, Environment, LaunchRequest, Vendor
from tests.property.test_compose_properties import sweep

ENVS = (
    Environment(),
    Environment(vendor=Vendor.AMD, arch="gfx942", torch_hip=True, sglang_version="0.5.11"),
    Environment(arch="sm80", ci=CIMarkers(None, "yes")),
    Environment(arch="sm100", sglang_version="0.5.16"),
)


def main() -> None:
    req = LaunchRequest(extra_args=("--mem-fraction-static", "0.8", "--attention-backend", "triton"))
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < 2.0:
        for env in ENVS:
            compose(env, req)
        n += len(ENVS)
    rate = n / (time.perf_counter() - start)
    print(f"compose: {rate:,.0f} compositions/s ({1e6 / rate:.1f} us each, {n} timed)")
    start = time.perf_counter()
    points, plans, refusals = sweep()
    took = time.perf_counter() - start
    print(f"exhaustive sweep: {points:,} points ({plans:,} plans, {refusals:,} refusals) in {took:.2f} s")


if __name__ == "__main__":
    main()
