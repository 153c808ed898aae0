"""Benchmark the determinism check against the simulated SGLang server's faults (loopback only).

For each case, ``--runs`` fresh simulated servers (seeds 0, 1, ...) are checked with the defaults and the
verdicts counted. Printed per case: what a correct check says, PASS / FAIL / ERROR counts, the rate that
matters (catch rate for a batch-dependence fault, false-alarm rate for a deterministic server, the share
reported as ERROR for an infrastructure fault), the median wall time, and the wall time in request
latencies (``--latency``, the simulated per-request latency).

Cases: ``deterministic`` (the flag, no fault), ``no-flag`` (batch-dependent at any batch), ``from-17``
(dependence only at >= 17 sequences in flight), ``lists-only`` (only inside a server-side batch),
``flip-1%`` (1 in 100 sequences generated under load changes a token), ``flush-busy`` (``/flush_cache``
answers 400 one time in five), ``dies`` (exits after a random 3 to 40 generation requests), ``malformed``
(a truncated JSON body every 3rd to 30th request), ``hangs`` (a request from the 2nd to the 20th never
answers; 2 s request timeout).

Usage, from the repository root: ``python -m benchmarks.determinism [--runs 20] [--latency 0.2] [--cases a,b]``
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from mlaprop import server
from mlaprop.determinism import Status, check_determinism
from mlaprop.evalclient import ClientConfig

SIM = (sys.executable, "-m", "mlaprop.simserver")


@dataclass(frozen=True)
class Case:
    """A fault: simulator flags for run ``i``, the right verdict, and how to read the counts."""

    name: str
    flags: Callable[[int], list[str]]
    expect: Status
    deterministic: bool = True
    timeout_s: float = 30.0


def _rng(i: int) -> random.Random:
    return random.Random(1000 + i)


CASES = (
    Case("deterministic", lambda i: [], Status.PASS),
    Case("no-flag", lambda i: [], Status.FAIL, deterministic=False),
    Case("from-17", lambda i: ["--sim-vary-from", "17"], Status.FAIL),
    Case("lists-only", lambda i: ["--sim-vary-lists"], Status.FAIL),
    Case("flip-1%", lambda i: ["--sim-flip-rate", "0.01"], Status.FAIL),
    Case("flush-busy", lambda i: ["--sim-flush-busy-rate", "0.2"], Status.PASS),
    Case("dies", lambda i: ["--sim-die-after-requests", str(_rng(i).randint(3, 40))], Status.ERROR),
    Case("malformed", lambda i: ["--sim-malformed-every", str(_rng(i).randint(3, 30))], Status.ERROR),
    Case("hangs", lambda i: ["--sim-hang-from", str(_rng(i).randint(2, 20))], Status.ERROR, timeout_s=2.0),
)


def run_case(case: Case, runs: int, latency: float) -> tuple[Counter[Status], list[float]]:
    """Check ``runs`` fresh servers; the verdict counts and wall times (seconds)."""
    counts: Counter[Status] = Counter()
    walls: list[float] = []
    for i in range(runs):
        argv = [
            "--sim-latency",
            str(latency),
            "--sim-seed",
            str(i),
            *(["--enable-deterministic-inference"] if case.deterministic else []),
            *case.flags(i),
        ]
        cfg = ClientConfig(max_retries=1, backoff_s=0.05, request_timeout_s=case.timeout_s, progress=False)
        with server.launch(
            model="sim-model", command_prefix=SIM, extra_args=argv, ready_timeout=30, grace=2
        ) as srv:
            result = check_determinism(srv.base_url, config=cfg, is_alive=srv.alive)
        counts[Status(result.status)] += 1
        walls.append(result.wall_s)
    return counts, walls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--latency", type=float, default=0.2, help="simulated per-request latency, seconds")
    p.add_argument("--cases", default=",".join(c.name for c in CASES))
    args = p.parse_args(argv)
    wanted = args.cases.split(",")
    print(f"{args.runs} runs per case, simulated request latency {args.latency:g} s, check defaults")
    print(
        f"{'case':<14}{'right':>7}{'pass':>6}{'fail':>6}{'error':>7}  {'rate':<26}{'wall s':>8}{'latencies':>11}"
    )
    for case in CASES:
        if case.name not in wanted:
            continue
        counts, walls = run_case(case, args.runs, args.latency)
        n = sum(counts.values())
        right = counts[case.expect]
        if case.expect is Status.FAIL:
            rate = f"caught {right}/{n} = {right / n:.0%}"
        elif case.expect is Status.PASS:
            rate = f"false alarms {n - right}/{n} = {(n - right) / n:.0%}"
        else:
            rate = f"ERROR {right}/{n}, FAIL {counts[Status.FAIL]}"
        wall = statistics.median(walls)
        lat = f"{wall / args.latency:.1f}" if args.latency > 0 else "-"
        print(
            f"{case.name:<14}{case.expect.value:>7}{counts[Status.PASS]:>6}{counts[Status.FAIL]:>6}"
            f"{counts[Status.ERROR]:>7}  {rate:<26}{wall:>8.2f}{lat:>11}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
