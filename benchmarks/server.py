"""Launcher latencies against the simulated server, next to SGLang's ``popen_launch_server`` policy.

Run from the repository root: ``python benchmarks/server.py`` (about 30 s). Prints the median of 5 runs of

- exit-to-error: a server crashes during start-up; time from its exit (the wall-clock moment it logged just
  before exiting) to :class:`~mlaprop.server.ServerExited` reaching the caller. Target <= 0.5 s.
- ready-to-return: a server becomes healthy after a delay; time from the moment it logged being ready to
  :func:`~mlaprop.server.launch` returning. Target <= 0.25 s.
- teardown: a server with two children and a double-forked grandchild in another session holding the port;
  time for teardown to return with every process gone and the port free. Target <= grace + 1 s. Also with
  the server and grandchild ignoring SIGTERM (grace 1 s), which forces the SIGKILL path.

SGLang's column applies its policy (``sglang/test/test_utils.py``) to the same events: ``popen_launch_server``
checks the process and polls ``/health_generate`` right after starting and then every 10 s, so an event at
``t`` seconds after start is noticed at the next multiple of 10 s; its teardown (``kill_process_tree``) is run
for real on the same kind of server: SIGKILL to the children found by walking down from the parent. Exits 1 if
a target is missed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
try:
    import mlaprop  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

from mlaprop.server import Server, ServerExited, launch, port_is_bindable, start  # noqa: E402

SIM = (sys.executable, "-m", "mlaprop.simserver")
RUNS = 5
SGLANG_POLL = 10.0


def sglang_notice_delay(event_after_start: float) -> float:
    """Seconds SGLang's loop (check, poll, sleep 10 s) takes to notice an event ``t`` s after start."""
    polls = -(-event_after_start // SGLANG_POLL)  # ceil
    return polls * SGLANG_POLL - event_after_start


def logged_time(lines: list[str], marker: str) -> float:
    return float(next(line for line in lines if marker in line).split("t=")[1].rstrip(")"))


def exit_to_error() -> tuple[float, float]:
    t0 = time.time()
    try:
        with launch(None, "sim/model", command_prefix=SIM, extra_args=["--sim-crash-at-start", "1"]):
            raise AssertionError("the server should have crashed")
    except ServerExited as exc:
        caught = time.time()
        exited = logged_time(list(exc.log_tail), "simulated crash")
    return caught - exited, sglang_notice_delay(exited - t0)


def ready_to_return(healthy_after: float) -> tuple[float, float]:
    t0 = time.time()
    with launch(
        None, "sim/model", command_prefix=SIM, extra_args=["--sim-healthy-after", str(healthy_after)]
    ) as server:
        returned = time.time()
        ready = logged_time(server.log_tail(), "ready to roll")
    return returned - ready, sglang_notice_delay(ready - t0)


def family(server: Server) -> list[int]:
    pids = [server.pid]
    for line in server.log_tail(100):
        for marker in ("grandchild pid ", "child pid "):
            if marker in line:
                pids.append(int(line.split(marker)[1].split()[0]))
                break
    return pids


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def teardown(sim: list[str], grace: float) -> float:
    server = start(None, "sim/model", command_prefix=SIM, extra_args=sim, grace=grace)
    pids = family(server)
    t0 = time.monotonic()
    server.stop()
    took = time.monotonic() - t0
    assert not any(alive(p) for p in pids) and port_is_bindable(server.host, server.port)
    return took


def sglang_teardown(sim: list[str]) -> tuple[float, bool, bool]:
    """SGLang's ``kill_process_tree``: SIGKILL children found walking down from the parent, then the
    parent; wait for those to go. Returns (seconds, grandchild survived, port still busy)."""
    server = start(None, "sim/model", command_prefix=SIM, extra_args=sim, grace=1.0)
    pids = family(server)
    t0 = time.monotonic()
    parent = psutil.Process(server.pid)
    victims = [*parent.children(recursive=True), parent]
    for p in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 60  # its wait; zombies count as gone, as in mlaprop's teardown
    while any(alive(p.pid) for p in victims) and time.monotonic() < deadline:
        time.sleep(0.005)
    with contextlib.suppress(psutil.Error):
        parent.wait(timeout=1)  # reap the server process (our child)
    took = time.monotonic() - t0
    survived = any(alive(p) for p in pids)
    busy = not port_is_bindable(server.host, server.port)
    server.stop()  # clean up what SGLang's policy left
    return took, survived, busy


def median(fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(RUNS))


def main() -> int:
    grace = 10.0
    exits = [exit_to_error() for _ in range(RUNS)]
    readies = [ready_to_return(0.3 + 0.3 * i) for i in range(RUNS)]
    family_sim = ["--sim-grandchild", "--sim-children", "2"]
    stubborn = [
        "--sim-ignore-sigterm",
        "--sim-grandchild",
        "--sim-grandchild-ignore-sigterm",
        "--sim-children",
        "2",
    ]
    soft = median(lambda: teardown(family_sim, grace))
    hard = median(lambda: teardown(stubborn, 1.0))
    sg = [sglang_teardown(family_sim) for _ in range(RUNS)]

    rows = [
        (
            "exit-to-error",
            statistics.median(e[0] for e in exits),
            0.5,
            f"{statistics.median(e[1] for e in exits):.2f} s (first poll at start, then every 10 s)",
        ),
        (
            "ready-to-return",
            statistics.median(r[0] for r in readies),
            0.25,
            f"{statistics.median(r[1] for r in readies):.2f} s (ready 0.3-1.5 s after start)",
        ),
        (
            f"teardown, grandchild (grace {grace:g} s)",
            soft,
            grace + 1.0,
            f"{statistics.median(s[0] for s in sg):.3f} s, but the grandchild survived in "
            f"{sum(s[1] for s in sg)}/{RUNS} runs and the port stayed busy in {sum(s[2] for s in sg)}/{RUNS}",
        ),
        ("teardown, SIGTERM ignored (grace 1 s)", hard, 2.0, "(same policy: SIGKILL at once, same misses)"),
    ]
    print(f"mlaprop.server vs SGLang popen_launch_server policy, median of {RUNS} runs (seconds)\n")
    print(f"{'event':<40} {'mlaprop':>9} {'target':>9}  SGLang policy on the same events")
    missed = 0
    for name, value, target, theirs in rows:
        ok = value <= target
        missed += not ok
        print(f"{name:<40} {value:>9.3f} {'<= ' + format(target, 'g'):>9}{'' if ok else ' MISSED'}  {theirs}")
    print(
        "\nSGLang's expected notice delay for an event at a random moment is 5 s (uniform over its 10 s poll)."
    )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
