"""``kill -9`` of ``mlaprop run`` mid-eval on a real GPU: no process of its tree may survive, no GPU memory may
stay held (issue 14). Prints one JSON line with what it saw.

    python benchmarks/h200_kill9.py [--smoke-model dummy] [--settle 20] [-- EXTRA mlaprop run ARGS]

Starts ``mlaprop run --smoke`` (real SGLang), waits until the MGSM eval has started (``MGSM-`` on its
stdout), records every process of the tree and the GPU compute processes (``nvidia-smi
--query-compute-apps``), sends SIGKILL to mlaprop alone, then polls for up to ``--settle`` seconds until no
process of the recorded tree is left and none of them holds GPU memory. Other servers on the same GPU do not
disturb the check: only the tree's own PIDs are followed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import psutil


def gpu_apps() -> dict[int, int]:
    """PID -> used GPU memory (MiB) of every compute process, from ``nvidia-smi``."""
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    apps: dict[int, int] = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            apps[int(parts[0])] = int(parts[1]) if parts[1].isdigit() else -1
    return apps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke-model", default="dummy")
    ap.add_argument("--settle", type=float, default=20.0)
    ap.add_argument("--timeout", type=float, default=400.0)
    ap.add_argument("rest", nargs="*")
    args = ap.parse_args()
    cmd = [
        sys.executable,
        "-m",
        "mlaprop.cli",
        "run",
        "--smoke",
        "--smoke-model",
        args.smoke_model,
        "--report-dir",
        "/tmp/mlaprop-kill9",
        *args.rest,
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    seen: list[str] = []
    started = False
    while time.monotonic() - t0 < args.timeout:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line.rstrip())
        if line.startswith("MGSM-"):
            started = True
            break
    if not started:
        proc.kill()
        print(json.dumps({"error": "the eval never started", "output": seen[-20:]}))
        return 1
    time.sleep(1.0)  # requests in flight
    tree = {p.pid: " ".join(p.cmdline()[:4]) for p in psutil.Process(proc.pid).children(recursive=True)}
    apps_before = gpu_apps()
    tree_gpu_before = {pid: mib for pid, mib in apps_before.items() if pid in tree}
    t_kill = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    alive: list[int] = list(tree)
    holding: dict[int, int] = dict(tree_gpu_before)
    while time.monotonic() - t_kill < args.settle:
        alive = [pid for pid in tree if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        holding = {pid: mib for pid, mib in gpu_apps().items() if pid in tree}
        if not alive and not holding:
            break
        time.sleep(0.25)
    # mlaprop's watchdog and the re-parented server tree are gone; anything left is named
    print(
        json.dumps(
            {
                "output_before_kill": seen[-6:],
                "tree_before_kill": tree,
                "tree_gpu_mib_before_kill": tree_gpu_before,
                "gpu_apps_before_kill": apps_before,
                "seconds_kill_to_clean": round(time.monotonic() - t_kill, 2),
                "survivors": alive,
                "tree_gpu_mib_after": holding,
                "gpu_apps_after": gpu_apps(),
                "clean": not alive and not holding,
            }
        )
    )
    return 0 if not alive and not holding else 1


if __name__ == "__main__":
    raise SystemExit(main())
