"""Benchmark the MGSM eval client against the simulated SGLang server (loopback only).

Prints, for a fixed per-request latency, the eval's wall time against the ideal
``requests * latency / concurrency`` (target: at most ``1.1 * ideal + 0.5 s``), and the client's own
requests per second at zero latency (where the simulated server, on the same cores, is part of the cost).

With ``--sglang-python PY`` (an interpreter that has the ``sglang`` wheel installed with ``--no-deps`` plus
``openai``, ``httpx``, ``jinja2``, ``numpy``, ``tqdm``), SGLang's own MGSM eval (``simple_eval_mgsm.MGSMEval``
with ``simple_eval_common.ChatCompletionSampler``, what ``sglang.test.run_eval --eval-name mgsm_en`` runs) is
timed on the same servers. ``sglang.test.run_eval`` itself cannot be imported without torch (``import sglang``
pulls in ``sglang.srt``: ~2.5 GB of CPU wheels), so the two modules are loaded under a stub ``sglang``
package, and their hard-coded dataset download is redirected to the local file.

Usage, from the repository root: ``python -m benchmarks.eval [--dataset PATH] [--latency 0.5] [--concurrency 64] [--sglang-python PY]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from mlaprop import server
from mlaprop.evalclient import ClientConfig, run_mgsm
from mlaprop.mgsm import MgsmDataset, MgsmItem, Parser, load_dataset

REPO = Path(__file__).resolve().parent.parent
SIM = (sys.executable, "-m", "mlaprop.simserver")

_SGLANG_RUNNER = textwrap.dedent(
    """
    import importlib.util, io, pathlib, sys, time, types, urllib.request
    site, dataset, base_url, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    root = pathlib.Path(site) / "sglang"
    for name, path in (("sglang", root), ("sglang.test", root / "test")):
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]
        sys.modules[name] = mod
    data = pathlib.Path(dataset).read_bytes()
    urllib.request.urlopen = lambda url, *a, **k: io.BytesIO(data)  # no download: the local file
    import os
    os.environ.setdefault("OPENAI_API_KEY", "EMPTY")
    from sglang.test.simple_eval_common import ChatCompletionSampler
    from sglang.test.simple_eval_mgsm import MGSMEval
    sampler = ChatCompletionSampler(base_url=base_url + "/v1", temperature=0.0, max_tokens=2048)
    ev = MGSMEval(num_examples_per_lang=250, num_threads=threads, languages=["en"])
    t = time.monotonic()
    result = ev(sampler)
    print(f"{time.monotonic() - t:.4f} {result.score:.4f}")
    """
).strip()


def _dataset(path: str | None) -> MgsmDataset:
    shared = Path(os.environ.get("MLAPROP_SHARED") or REPO.parent / "shared")
    return load_dataset(path or shared / "data" / "mgsm" / "mgsm_en.tsv", "en")


def _repeat(ds: MgsmDataset, times: int) -> MgsmDataset:
    items = tuple(
        MgsmItem(index=k * len(ds) + i.index, line=i.line, question=i.question, target=i.target, lang=i.lang)
        for k in range(times)
        for i in ds.items
    )
    return MgsmDataset(ds.lang, ds.path, ds.sha256, items, ds.canonical)


def _sglang_site(python: str) -> str:
    code = "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('sglang').origin).parent.parent)"
    return subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def _time_sglang(python: str, dataset: MgsmDataset, base_url: str, threads: int) -> tuple[float, float]:
    out = subprocess.run(
        [python, "-c", _SGLANG_RUNNER, _sglang_site(python), dataset.path, base_url, str(threads)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout.split()
    return float(out[-2]), float(out[-1])


def _serve(dataset: MgsmDataset, latency: float) -> server.Server:
    args = ["--sim-dataset", dataset.path, "--sim-accuracy", "0.9", "--sim-latency", str(latency)]
    return server.start(model="sim", command_prefix=SIM, extra_args=args, ready_timeout=30, grace=2)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 when the latency target is met, else 1."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", help="MGSM-en TSV (default: $MLAPROP_SHARED/data/mgsm/mgsm_en.tsv)")
    p.add_argument("--latency", type=float, default=0.5, help="simulated seconds per request (default: 0.5)")
    p.add_argument("--concurrency", type=int, default=64, help="client concurrency (default: 64)")
    p.add_argument(
        "--repeat", type=int, default=4, help="dataset copies for the zero-latency run (default: 4)"
    )
    p.add_argument("--sglang-python", help="an interpreter with the sglang wheel (--no-deps) and openai")
    args = p.parse_args(argv)
    ds = _dataset(args.dataset)
    cfg = ClientConfig(concurrency=args.concurrency, progress=False, request_timeout_s=60)
    print(f"cpu cores: {os.cpu_count()}, python {sys.version.split()[0]}, concurrency {args.concurrency}")

    srv = _serve(ds, args.latency)
    try:
        result = run_mgsm(srv.base_url, ds, config=cfg, model="sim")
        ideal = len(ds) * args.latency / args.concurrency
        waves = -(-len(ds) // args.concurrency) * args.latency
        target = 1.1 * ideal + 0.5
        ok = result.wall_s <= target
        score = result.score(Parser.SIMPLE_EVALS)
        print(
            f"latency {args.latency:g} s, {len(ds)} requests: wall {result.wall_s:.2f} s, ideal {ideal:.2f} s "
            f"(whole waves {waves:.2f} s), ratio {result.wall_s / ideal:.3f}, target <= {target:.2f} s: "
            f"{'met' if ok else 'MISSED'}; score {score.score if score else float('nan'):.3f}, errors {result.errors}"
        )
        if args.sglang_python:
            wall, sc = _time_sglang(args.sglang_python, ds, srv.base_url, args.concurrency)
            print(
                f"  SGLang MGSMEval, same server: wall {wall:.2f} s, ratio {wall / ideal:.3f}, score {sc:.3f}"
            )
    finally:
        srv.stop()

    srv = _serve(ds, 0.0)
    try:
        many = _repeat(ds, args.repeat)
        best = min(run_mgsm(srv.base_url, many, config=cfg, model="sim").wall_s for _ in range(3))
        print(
            f"zero latency, {len(many)} requests: best of 3 {best:.2f} s = {len(many) / best:.0f} requests/s "
            "(client and simulated server share the cores)"
        )
        if args.sglang_python:
            wall, _ = _time_sglang(args.sglang_python, ds, srv.base_url, args.concurrency)
            print(f"  SGLang MGSMEval, same server, {len(ds)} requests: {len(ds) / wall:.0f} requests/s")
    finally:
        srv.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
