"""On the H200 with real SGLang 0.5.11: mlaprop against SGLang's own code, on real servers.

Run by ``benchmarks/h200_peer.sh`` (which installs the bundle from ``../shared/h200`` and sets the
environment). Two measurements, each printed as mlaprop / SGLang:

A. **eval against one running server**: one SGLang server (the tiny random-weight MLA FP8 model, the MLA
   FP8 test's flags, ``--load-format dummy``); ``mlaprop eval`` (CLI, a process) and SGLang's ``run_eval``
   MGSM-en (``benchmarks/sglang_real.py eval``: the real ``sglang.test.run_eval``, the MGSM URL pointed at
   the local ``--dataset`` file) at the same concurrency (1024, the test's) on the same questions, order
   alternating. Times: the eval phase inside each process (mlaprop's ``timings_s.mgsm``, SGLang's timed
   ``run_eval``), and each process start to exit.
B. **whole run**: ``mlaprop run --smoke --limit N`` (launch, eval, determinism check, report, teardown)
   against SGLang's MLA FP8 test flow (``benchmarks/sglang_real.py flow``: the real
   ``popen_launch_server``, ``run_eval``, ``kill_process_tree``) with the same server arguments (mlaprop's
   plan, read from its ``summary.json``), the same model folder and questions.

Random weights answer nonsense: scores are reported, not gated (``--gate 0`` for ``mlaprop eval``).
Writes ``OUT/h200_peer.json`` and prints a table. ``--simulate LATENCY --sglang-python PY`` dry-runs the whole
script on a CPU machine against the simulated server (SGLang's side from ``PY``, as in ``sglang_peer.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

from mlaprop import server  # noqa: E402
from mlaprop.tinymodel import write_tiny_mla  # noqa: E402

REAL = ROOT / "benchmarks" / "sglang_real.py"
SIM = (sys.executable, "-m", "mlaprop.simserver")
MLAPROP = (sys.executable, "-c", "import sys; from mlaprop.cli import main; sys.exit(main())")
#: test_mla_fp8.py's server arguments on NVIDIA, and the smoke model's loader (no weights on disk)
TEST_ARGS = ("--trust-remote-code", "--kv-cache-dtype", "fp8_e5m2", "--enable-deterministic-inference")
SMOKE_ARGS = ("--load-format", "dummy")


def _run(
    cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None
) -> tuple[int, float, str]:
    t = time.monotonic()
    with log.open("w", encoding="utf-8") as err:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout, env=env)
    return done.returncode, time.monotonic() - t, done.stdout


def _last_json(stdout: str) -> dict[str, Any]:
    return dict(json.loads(stdout.strip().splitlines()[-1]))


def _sim_flags(dataset: str, latency: float) -> list[str]:
    return ["--sim-dataset", dataset, "--sim-accuracy", "0.9", "--sim-latency", repr(latency)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="MGSM-en TSV on the device")
    p.add_argument("--out", default="/tmp/h200-peer", help="folder for logs, reports and the JSON")
    p.add_argument("--server-args", default="--grammar-backend none --mem-fraction-static 0.3")
    p.add_argument("--limit", type=int, default=250, help="questions for both tools (default: all 250)")
    p.add_argument("--threads", type=int, default=1024, help="concurrency of both evals (default: 1024)")
    p.add_argument("--reps", type=int, default=1, help="repetitions of part A (default: 1)")
    p.add_argument("--skip-whole-run", action="store_true")
    p.add_argument("--skip-eval", action="store_true", help="only part B (whole runs)")
    p.add_argument("--sglang-python", default=sys.executable, help="interpreter for SGLang's side")
    p.add_argument(
        "--model",
        choices=("canary", "dummy"),
        default="canary",
        help="served model: the trained canary (smoke mode's default) or dummy random weights",
    )
    p.add_argument(
        "--simulate",
        type=float,
        metavar="LATENCY",
        help="CPU dry run of this script: the simulated server (this latency) instead of SGLang",
    )
    args = p.parse_args()
    sim = args.simulate is not None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if sim:
        model, smoke = out / "sim-model", ()
    elif args.model == "canary":  # what smoke mode serves: real weights, short answers, gated
        from mlaprop.canary import ensure_canary

        model, smoke = ensure_canary(args.dataset), ()
    else:  # random dummy weights: every answer runs to max_tokens
        model, smoke = write_tiny_mla(out / "tiny-mla-fp8"), SMOKE_ARGS
    extra = shlex.split(args.server_args) if not sim else _sim_flags(args.dataset, args.simulate or 0.0)
    n = str(args.limit)
    results: dict[str, Any] = {"limit": args.limit, "threads": args.threads, "server_args": extra}

    # ---- A: one running server, the two evals
    mine: list[tuple[float, float]] = []
    theirs: list[tuple[float, float]] = []
    if not args.skip_eval:
        _part_a(args, results, model, smoke, extra, sim, out, n, mine, theirs)
    _part_b(args, results, model, smoke, extra, sim, out, n)
    _print_table(args, results, sim, mine, theirs)
    return 0


def _part_a(args, results, model, smoke, extra, sim, out, n, mine, theirs):  # type: ignore[no-untyped-def]
    started = time.monotonic()
    srv = server.start(
        None,
        str(model),
        command_prefix=SIM if sim else server.DEFAULT_COMMAND_PREFIX,
        extra_args=[*TEST_ARGS, *smoke, *extra],
        log_path=out / "a-server.log",
        ready_timeout=900,
        grace=10,
    )
    results["a_server_ready_s"] = time.monotonic() - started
    print(f"A: server ready in {results['a_server_ready_s']:.0f} s at {srv.base_url}", flush=True)
    try:
        for rep in range(args.reps):
            for who in ("mlaprop", "sglang") if rep % 2 == 0 else ("sglang", "mlaprop"):
                if who == "mlaprop":
                    report = out / f"a-mlaprop-{rep}"
                    cmd = [
                        *MLAPROP,
                        "eval",
                        "--base-url",
                        srv.base_url,
                        "--dataset",
                        args.dataset,
                        "--limit",
                        n,
                    ]
                    cmd += ["--concurrency", str(args.threads), "--gate", "0", "--no-progress"]
                    cmd += ["--report-dir", str(report)]
                    rc, wall, _ = _run(cmd, out / f"a-mlaprop-{rep}.log", 900)
                    summary = json.loads((report / "summary.json").read_text(encoding="utf-8"))
                    mine.append((float(summary["timings_s"]["mgsm"]), wall))
                    print(
                        f"  mlaprop eval: rc {rc}, eval {mine[-1][0]:.2f} s, process {wall:.2f} s", flush=True
                    )
                else:
                    cmd = [args.sglang_python, str(REAL), "eval", "--dataset", args.dataset]
                    cmd += ["--base-url", srv.base_url, "--threads", str(args.threads), "--num-examples", n]
                    rc, wall, stdout = _run(cmd, out / f"a-sglang-{rep}.log", 900)
                    got = _last_json(stdout)
                    theirs.append((float(got["eval_s"]), wall))
                    print(
                        f"  SGLang run_eval: rc {rc}, eval {got['eval_s']:.2f} s, process {wall:.2f} s, "
                        f"score {got.get('score')}, stand-ins {got['stand_ins']} {got.get('real_import_error', '')}",
                        flush=True,
                    )
    finally:
        srv.stop()
    a_eval = statistics.median(m[0] / s[0] for m, s in zip(mine, theirs, strict=True))
    a_proc = statistics.median(m[1] / s[1] for m, s in zip(mine, theirs, strict=True))
    results["a"] = {"mlaprop": mine, "sglang": theirs, "ratio_eval": a_eval, "ratio_process": a_proc}


def _part_b(args, results, model, smoke, extra, sim, out, n):  # type: ignore[no-untyped-def]
    if not args.skip_whole_run:
        report = out / "b-mlaprop"
        cmd = [*MLAPROP, "run", "--limit", n, "--dataset", args.dataset, "--no-progress"]
        cmd += ["--report-dir", str(report), "--ready-timeout", "900"]
        if sim:
            cmd += ["--simulate", "--sim-latency", repr(args.simulate), "--sglang-version", "0.5.23"]
        else:
            cmd += ["--smoke", "--smoke-model", args.model, "--server-args", args.server_args]
        rc, m_wall, _ = _run(cmd, out / "b-mlaprop.log", 900)
        summary = json.loads((report / "summary.json").read_text(encoding="utf-8"))
        plan_args = [*summary["plan"]["argv"]]
        print(
            f"B: mlaprop run --smoke: rc {rc}, {m_wall:.1f} s, timings {summary.get('timings_s')}", flush=True
        )
        bindir = out / "bin"
        bindir.mkdir(exist_ok=True)
        py3 = bindir / "python3"  # popen_launch_server runs `python3 -m ...` or `sglang serve`
        if not py3.exists():
            py3.symlink_to(sys.executable)
        if sim:  # `sglang serve ARGS` runs the simulated server
            exe = bindir / "sglang"
            flags = " ".join(shlex.quote(a) for a in (*SIM, *extra))
            exe.write_text(f'#!/bin/sh\n[ "$1" = serve ] && shift\nexec {flags} "$@"\n', encoding="utf-8")
            exe.chmod(0o755)
        path = os.pathsep.join([str(bindir), "/tmp/site/bin", os.environ.get("PATH", "")])
        other = [a for a in plan_args if a not in ("--enable-deterministic-inference",)]
        other = [*other, "--enable-deterministic-inference", *smoke, *([] if sim else extra)]
        port = server.free_port("127.0.0.1")
        cmd = [args.sglang_python, str(REAL), "flow", "--dataset", args.dataset, "--model", str(model)]
        cmd += ["--base-url", f"http://127.0.0.1:{port}", "--threads", str(args.threads), "--timeout", "900"]
        cmd += ["--num-examples", n, "--other-args", " ".join(other)]
        rc, s_wall, stdout = _run(cmd, out / "b-sglang.log", 900, env={**os.environ, "PATH": path})
        got = _last_json(stdout) if rc == 0 else {}
        print(f"B: SGLang test flow: rc {rc}, {s_wall:.1f} s, {got}", flush=True)
        if rc != 0:
            tail = (out / "b-sglang.log").read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
            print("B: SGLang test flow log tail:\n  " + "\n  ".join(tail), flush=True)
        results["b"] = {"mlaprop_s": m_wall, "sglang_s": s_wall, "sglang": got, "ratio": m_wall / s_wall}


def _print_table(args, results, sim, mine, theirs):  # type: ignore[no-untyped-def]
    (out := Path(args.out)).mkdir(parents=True, exist_ok=True)
    (out / "h200_peer.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    where = "simulated server (dry run)" if sim else "on the H200, SGLang 0.5.11, tiny MLA FP8 model"
    print(f"\n| {where} | mlaprop | SGLang | mlaprop / SGLang |")
    print("|---|---|---|---|")
    if "a" in results:
        a = results["a"]
        print(
            f"| A. eval phase, same server, {args.limit} questions at {args.threads} | "
            f"{statistics.median(m[0] for m in mine):.2f} s | {statistics.median(s[0] for s in theirs):.2f} s | "
            f"**{a['ratio_eval']:.2f}** |"
        )
        print(
            f"| A. eval process start to exit | {statistics.median(m[1] for m in mine):.2f} s | "
            f"{statistics.median(s[1] for s in theirs):.2f} s | {a['ratio_process']:.2f} |"
        )
    if "b" in results:
        b = results["b"]
        print(
            f"| B. whole run vs SGLang's test flow | {b['mlaprop_s']:.1f} s | {b['sglang_s']:.1f} s | "
            f"**{b['ratio']:.2f}** |"
        )


if __name__ == "__main__":
    sys.exit(main())
