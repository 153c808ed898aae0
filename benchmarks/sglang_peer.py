"""mlaprop side by side with SGLang's own test flow, on the simulated server, in one run.

For each per-request latency (default 0, 0.1, 0.5 and 2 s) and ``--reps`` paired repetitions (order
alternating), it times:

- **whole run**: ``mlaprop run --simulate`` (compose, launch, MGSM-en, the determinism check when the plan
  is deterministic, report, teardown; one process, start to exit) against SGLang's MLA FP8 test flow run as
  SGLang's code does it (``popen_launch_server`` with ``--trust-remote-code --kv-cache-dtype fp8_e5m2
  --enable-deterministic-inference``, ``run_eval`` MGSM-en with ``num_threads=1024``,
  ``kill_process_tree``; one process, start to exit), whose ``sglang serve`` is the same simulated server.
  mlaprop at its defaults, and at SGLang's setting (concurrency 1024).
- **eval phase**: against one running simulated server, mlaprop's :func:`~mlaprop.evalclient.run_mgsm`
  against SGLang's ``run_eval`` (MGSM-en, all 250 questions), both at 1024 and both at ``run_eval``'s CLI
  default 512 (equal settings), timed inside each process (imports excluded).

Prints the median of each and the median of the paired ratios mlaprop / SGLang. The target (issue 15):
whole-run ratio <= 0.5 at every latency with the determinism check on; exit 1 when a latency misses it.

SGLang's code comes from ``benchmarks/sglang_real.py`` under ``--sglang-python`` (an interpreter with
``pip install --no-deps sglang==0.5.23`` and ``openai==2.8.0 httpx jinja2 numpy tqdm requests psutil``;
see that file for the stand-ins its torch-free import needs).

Usage, from the repository root:
``python benchmarks/sglang_peer.py --sglang-python .bench-venv/bin/python [--latencies 0,0.1,0.5,2] [--reps 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
try:
    import mlaprop  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

from mlaprop import server  # noqa: E402
from mlaprop.evalclient import ClientConfig, default_concurrency, run_mgsm  # noqa: E402
from mlaprop.mgsm import MgsmDataset, load_dataset  # noqa: E402

SIM = (sys.executable, "-m", "mlaprop.simserver")
REAL = ROOT / "benchmarks" / "sglang_real.py"
TARGET = 0.5


def _dataset(path: str | None) -> MgsmDataset:
    shared = Path(os.environ.get("MLAPROP_SHARED") or ROOT.parent / "shared")
    return load_dataset(path or shared / "data" / "mgsm" / "mgsm_en.tsv", "en")


def _sim_flags(ds: MgsmDataset, latency: float) -> list[str]:
    # what `mlaprop run --simulate` passes on the H200 CI runner's platform (runner._sim_args)
    return [
        "--sim-platform",
        "cuda",
        "--sim-arch",
        "sm90",
        "--sim-sglang-version",
        "0.5.23",
        "--sim-dataset",
        ds.path,
        "--sim-accuracy",
        "0.9",
        "--sim-latency",
        repr(latency),
    ]


def _fake_sglang_bin(folder: Path, ds: MgsmDataset, latency: float) -> Path:
    """A folder holding an executable ``sglang``: ``sglang serve ARGS`` runs the simulated server."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "sglang"
    sim = " ".join(shlex.quote(a) for a in (*SIM, *_sim_flags(ds, latency)))
    exe.write_text(f'#!/bin/sh\n[ "$1" = serve ] && shift\nexec {sim} "$@"\n', encoding="utf-8")
    exe.chmod(0o755)
    return folder


def _mlaprop_concurrency_is_wired() -> bool:
    """Whether ``mlaprop run`` already applies :func:`default_concurrency` when none is given."""
    try:
        from mlaprop.options import EvalOptions
    except ImportError:
        try:
            from mlaprop.runner import EvalOptions  # type: ignore[no-redef]
        except ImportError:
            return False
    return EvalOptions().concurrency is None  # type: ignore[comparison-overlap]


def whole_mlaprop(ds: MgsmDataset, latency: float, concurrency: int | None, work: Path) -> float:
    report = Path(tempfile.mkdtemp(prefix="mlaprop-peer-", dir=work))
    cmd = [
        sys.executable,
        "-c",
        "import sys; from mlaprop.cli import main; sys.exit(main())",
        "run",
        "--simulate",
        "--sim-latency",
        repr(latency),
        "--sim-accuracy",
        "0.9",
        "--sglang-version",
        "0.5.23",
        "--dataset",
        ds.path,
        "--no-progress",
        "--report-dir",
        str(report),
    ]
    if concurrency is not None:
        cmd += ["--concurrency", str(concurrency)]
    t = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    took = time.monotonic() - t
    if done.returncode != 0:
        raise RuntimeError(
            f"mlaprop run exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )
    summary = json.loads((report / "summary.json").read_text(encoding="utf-8"))
    if summary.get("determinism") is None:
        raise RuntimeError("mlaprop run did not run the determinism check; the comparison needs it on")
    return took


def whole_sglang(python: str, ds: MgsmDataset, latency: float, work: Path) -> tuple[float, dict[str, float]]:
    folder = _fake_sglang_bin(work / f"bin-{latency:g}", ds, latency)
    port = server.free_port("127.0.0.1")
    env = {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [
        python,
        str(REAL),
        "flow",
        "--dataset",
        ds.path,
        "--base-url",
        f"http://127.0.0.1:{port}",
        "--threads",
        "1024",
        "--other-args",
        "--trust-remote-code --kv-cache-dtype fp8_e5m2 --enable-deterministic-inference",
    ]
    t = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    took = time.monotonic() - t
    if done.returncode != 0:
        raise RuntimeError(f"SGLang's flow exited {done.returncode}:\n{done.stderr[-3000:]}")
    return took, json.loads(done.stdout.strip().splitlines()[-1])


def eval_sglang(python: str, ds: MgsmDataset, base_url: str, threads: int) -> float:
    cmd = [python, str(REAL), "eval", "--dataset", ds.path, "--base-url", base_url, "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"SGLang's run_eval exited {done.returncode}:\n{done.stderr[-3000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["eval_s"])


def eval_mlaprop(ds: MgsmDataset, base_url: str, concurrency: int) -> float:
    cfg = ClientConfig(concurrency=concurrency, progress=False)
    return run_mgsm(base_url, ds, config=cfg, model="sim/model").wall_s


def paired(
    fn_a: Callable[[], float], fn_b: Callable[[], float], reps: int
) -> tuple[list[float], list[float]]:
    a: list[float] = []
    b: list[float] = []
    for i in range(reps):
        if i % 2:
            b.append(fn_b())
            a.append(fn_a())
        else:
            a.append(fn_a())
            b.append(fn_b())
    return a, b


def _ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sglang-python", required=True, help="interpreter with the sglang wheel (--no-deps)")
    p.add_argument("--dataset", help="MGSM-en TSV (default: $MLAPROP_SHARED/data/mgsm/mgsm_en.tsv)")
    p.add_argument("--latencies", default="0,0.1,0.5,2", help="seconds per request, comma-separated")
    p.add_argument("--reps", type=int, default=3, help="paired repetitions per cell (default: 3)")
    p.add_argument("--skip-eval-phase", action="store_true", help="only the whole-run table")
    args = p.parse_args(argv)
    ds = _dataset(args.dataset)
    latencies = [float(x) for x in args.latencies.split(",")]
    wired = _mlaprop_concurrency_is_wired()
    default_c = None if wired else default_concurrency(len(ds), None)
    print(
        f"cpu cores {os.cpu_count()}, python {sys.version.split()[0]}, {len(ds)} questions, "
        f"{args.reps} paired repetitions, medians (seconds)"
    )
    print(
        "mlaprop defaults: "
        + (
            "as `mlaprop run` applies them"
            if wired
            else f"--concurrency {default_c} = default_concurrency({len(ds)}, server_info) "
            "(passed explicitly: the CLI default is not wired yet)"
        )
        + "; determinism check on (the plan is deterministic on NVIDIA)"
    )
    work = Path(tempfile.mkdtemp(prefix="mlaprop-peer-"))
    rows: list[tuple[str, list[str]]] = []
    missed = []
    for lat in latencies:
        m_def, s_flow = paired(
            lambda lat=lat: whole_mlaprop(ds, lat, default_c, work),
            lambda lat=lat: whole_sglang(args.sglang_python, ds, lat, work)[0],
            args.reps,
        )
        m_eq, s_flow2 = paired(
            lambda lat=lat: whole_mlaprop(ds, lat, 1024, work),
            lambda lat=lat: whole_sglang(args.sglang_python, ds, lat, work)[0],
            args.reps,
        )
        r_def, r_eq = _ratio(m_def, s_flow), _ratio(m_eq, s_flow2)
        if max(r_def, r_eq) > TARGET:
            missed.append(lat)
        cells = [
            f"{statistics.median(m_def):.2f} / {statistics.median(s_flow):.2f} = **{r_def:.2f}**",
            f"{statistics.median(m_eq):.2f} / {statistics.median(s_flow2):.2f} = **{r_eq:.2f}**",
        ]
        if not args.skip_eval_phase:
            srv = server.start(
                model="sim/model", command_prefix=SIM, extra_args=_sim_flags(ds, lat), ready_timeout=60
            )
            try:
                for threads in (1024, 512):
                    me, se = paired(
                        lambda t=threads, u=srv.base_url: eval_mlaprop(ds, u, t),
                        lambda t=threads, u=srv.base_url: eval_sglang(args.sglang_python, ds, u, t),
                        args.reps,
                    )
                    cells.append(
                        f"{statistics.median(me):.2f} / {statistics.median(se):.2f} = {_ratio(me, se):.2f}"
                    )
            finally:
                srv.stop()
        rows.append((f"{lat:g} s", cells))
        print(f"  latency {lat:g} s done: " + "; ".join(cells), flush=True)
    heads = [
        "whole run, mlaprop defaults / SGLang MLA FP8 test flow",
        "whole run, mlaprop at 1024 / SGLang test flow",
    ]
    if not args.skip_eval_phase:
        heads += ["eval phase, both 1024", "eval phase, both 512"]
    print()
    print("| per-request latency | " + " | ".join(r[0] for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for i, head in enumerate(heads):
        print(f"| {head} | " + " | ".join(r[1][i] for r in rows) + " |")
    print(
        f"\ncells: mlaprop s / SGLang s = median of paired ratios. Target: whole-run ratio <= {TARGET} at every "
        f"latency: {'met' if not missed else 'MISSED at ' + ', '.join(f'{x:g} s' for x in missed)}"
    )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
