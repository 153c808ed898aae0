"""Benchmark the MGSM eval client against the simulated SGLang server (loopback only), fairly against SGLang.

Prints, for a fixed per-request latency, the eval's wall time against whole waves
(``ceil(requests / concurrency) * latency``; target: at most ``1.1 * waves + 0.5 s``), and the client's
requests per second at zero latency (where the simulated server, on the same cores, is part of the cost).

With ``--sglang-python PY`` (an interpreter with ``pip install --no-deps sglang==0.5.23`` plus ``openai==2.8.0
httpx jinja2 numpy tqdm requests psutil``), SGLang's own ``run_eval`` (``--eval-name mgsm_en``; loaded by
``benchmarks/sglang_real.py``, which says what it stands in for) runs on the same server with the **same
settings**: the same concurrency (default 1024, what SGLang's MLA FP8 test passes), the same questions (the
zero-latency line writes the dataset ``--repeat`` times into one file that both read), and the same number of
repetitions (the median of ``--reps`` for both). Ratios are mlaprop / SGLang.

Usage, from the repository root:
``python benchmarks/eval.py [--dataset PATH] [--latency 0.5] [--concurrency 1024] [--reps 3] [--sglang-python PY]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
try:
    import mlaprop  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

from mlaprop import server  # noqa: E402
from mlaprop.evalclient import GATE_CONCURRENCY, ClientConfig, run_mgsm  # noqa: E402
from mlaprop.mgsm import MgsmDataset, Parser, load_dataset  # noqa: E402

SIM = (sys.executable, "-m", "mlaprop.simserver")
REAL = ROOT / "benchmarks" / "sglang_real.py"


def _dataset(path: str | None) -> MgsmDataset:
    shared = Path(os.environ.get("MLAPROP_SHARED") or ROOT.parent / "shared")
    return load_dataset(path or shared / "data" / "mgsm" / "mgsm_en.tsv", "en")


def _repeated(ds: MgsmDataset, times: int, folder: Path) -> MgsmDataset:
    """``ds``'s file written ``times`` times into one TSV (both tools read the same questions)."""
    text = Path(ds.path).read_text(encoding="utf-8")
    if not text.endswith("\n"):
        text += "\n"
    path = folder / f"mgsm_en_x{times}.tsv"
    path.write_text(text * times, encoding="utf-8")
    return load_dataset(path, "en")


def _sglang(python: str, dataset: MgsmDataset, base_url: str, threads: int) -> tuple[float, float]:
    done = subprocess.run(
        [
            python,
            str(REAL),
            "eval",
            "--dataset",
            dataset.path,
            "--base-url",
            base_url,
            "--threads",
            str(threads),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return float(out["eval_s"]), float(out["score"])


def _serve(dataset: MgsmDataset, latency: float) -> server.Server:
    args = ["--sim-dataset", dataset.path, "--sim-accuracy", "0.9", "--sim-latency", str(latency)]
    return server.start(model="sim", command_prefix=SIM, extra_args=args, ready_timeout=30, grace=2)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 when the latency target is met, else 1."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", help="MGSM-en TSV (default: $MLAPROP_SHARED/data/mgsm/mgsm_en.tsv)")
    p.add_argument("--latency", type=float, default=0.5, help="simulated seconds per request (default: 0.5)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=GATE_CONCURRENCY,
        help=f"concurrency of both clients (default: {GATE_CONCURRENCY}, SGLang's MLA FP8 test)",
    )
    p.add_argument(
        "--repeat", type=int, default=4, help="dataset copies for the zero-latency run (default: 4)"
    )
    p.add_argument("--reps", type=int, default=3, help="repetitions of each timing, median (default: 3)")
    p.add_argument("--sglang-python", help="an interpreter with the sglang wheel (--no-deps) and openai")
    args = p.parse_args(argv)
    ds = _dataset(args.dataset)
    cfg = ClientConfig(concurrency=args.concurrency, progress=False, request_timeout_s=60)
    print(
        f"cpu cores: {os.cpu_count()}, python {sys.version.split()[0]}, concurrency {args.concurrency} "
        f"(both), median of {args.reps}"
    )

    srv = _serve(ds, args.latency)
    try:
        runs = [run_mgsm(srv.base_url, ds, config=cfg, model="sim") for _ in range(args.reps)]
        wall = statistics.median(r.wall_s for r in runs)
        waves = -(-len(ds) // args.concurrency) * args.latency
        target = 1.1 * waves + 0.5
        ok = wall <= target
        score = runs[0].score(Parser.SIMPLE_EVALS)
        print(
            f"latency {args.latency:g} s, {len(ds)} requests: wall {wall:.2f} s, whole waves {waves:.2f} s, "
            f"target <= {target:.2f} s: {'met' if ok else 'MISSED'}; "
            f"score {score.score if score else float('nan'):.3f}, errors {runs[0].errors}, "
            f"{runs[0].retry_counts.describe()}"
        )
        if args.sglang_python:
            theirs = [
                _sglang(args.sglang_python, ds, srv.base_url, args.concurrency) for _ in range(args.reps)
            ]
            swall = statistics.median(t[0] for t in theirs)
            print(
                f"  SGLang run_eval mgsm_en, same server and settings: wall {swall:.2f} s, score "
                f"{theirs[0][1]:.3f}; mlaprop / SGLang {wall / swall:.2f}"
            )
    finally:
        srv.stop()

    with tempfile.TemporaryDirectory(prefix="mlaprop-bench-") as tmp:
        many = _repeated(ds, args.repeat, Path(tmp))
        srv = _serve(many, 0.0)
        try:
            walls, cpus = [], []
            for _ in range(args.reps):
                cpu = time.process_time()
                walls.append(run_mgsm(srv.base_url, many, config=cfg, model="sim").wall_s)
                cpus.append(time.process_time() - cpu)
            mine = statistics.median(walls)
            print(
                f"zero latency, {len(many)} requests: {mine:.2f} s = {len(many) / mine:.0f} requests/s, client CPU "
                f"{statistics.median(cpus):.2f} s (client and simulated server share the cores)"
            )
            if args.sglang_python:
                theirs = statistics.median(
                    _sglang(args.sglang_python, many, srv.base_url, args.concurrency)[0]
                    for _ in range(args.reps)
                )
                print(
                    f"  SGLang run_eval, same server, same {len(many)} requests: {theirs:.2f} s = "
                    f"{len(many) / theirs:.0f} requests/s; mlaprop / SGLang {mine / theirs:.2f}"
                )
        finally:
            srv.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
