"""SGLang's own test-flow code, loaded on a CPU machine: ``popen_launch_server``, ``kill_process_tree``,
``run_eval`` (MGSM-en), run as written, from the installed SGLang wheel.

Runs under an interpreter that has ``sglang`` installed with ``pip install --no-deps sglang==0.5.23`` plus
what the eval modules import (``openai==2.8.0 httpx jinja2 numpy tqdm requests psutil``). On a GPU machine
with a complete SGLang (the H200), :func:`load` imports the real modules as they are, with no stand-in.

Without torch, ``import sglang`` (its ``__init__``) and ``sglang.test.test_utils`` cannot be imported, so:

- ``sglang`` and ``sglang.test`` are namespace stand-ins pointing at the installed folders: submodules
  (``sglang.test.run_eval``, ``simple_eval_common``, ``simple_eval_mgsm``, ``sgl_eval_utils``) are the
  installed files, imported for real.
- ``popen_launch_server`` and the helpers it calls (``_launch_server_process``,
  ``_create_clean_subprocess_env``, ``_subprocess_popen_with_outputs``, ``_wait_for_server_health``) are the
  function definitions read from the installed ``sglang/test/test_utils.py`` source and executed unchanged
  in a namespace with their standard imports (``os``, ``subprocess``, ``requests``, ...); ``torch`` there is
  a stand-in whose ``cuda.is_initialized()`` is ``False`` (no GPU), ``sglang.utils.is_in_ci`` reads
  ``SGLANG_IS_IN_CI`` as SGLang's does, and ``dump_metric`` (CI metric upload) does nothing.
- ``kill_process_tree`` and its reaping helpers are read the same way from ``sglang/srt/utils/common.py``.
- The MGSM file URL in ``simple_eval_mgsm.LANG_TO_FPATH`` points at a local ``file://`` copy (its
  ``urllib.request.urlopen`` reads file URLs), so nothing is downloaded.

``popen_launch_server`` starts the command ``sglang serve ...``: the caller puts an executable named
``sglang`` first on ``PATH`` (the simulated server, for the CPU benchmark).

Used by ``benchmarks/sglang_peer.py``: ``python benchmarks/sglang_real.py flow|eval ...`` prints one JSON
line of timings.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import logging
import os
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any

TEST_UTILS_FUNCTIONS = ("popen_launch_server",)
COMMON_FUNCTIONS = ("kill_process_tree",)


def _sglang_dir() -> Path:
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("sglang is not installed in this interpreter (pip install --no-deps sglang==0.5.23)")
    return Path(next(iter(spec.submodule_search_locations)))


def _namespace_package(name: str, path: Path) -> None:
    mod = types.ModuleType(name)
    mod.__path__ = [str(path)]
    sys.modules[name] = mod


def _functions(source: Path, names: tuple[str, ...], namespace: dict[str, Any]) -> None:
    """Execute, unchanged, the undecorated top-level function definitions of ``source`` in ``namespace``
    (``names`` must be among them; the others are there for whatever those call)."""
    tree = ast.parse(source.read_text(encoding="utf-8"), str(source))
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and not n.decorator_list]
    missing = set(names) - {n.name for n in found}
    if missing:
        raise SystemExit(f"{source} no longer defines {sorted(missing)}: update benchmarks/sglang_real.py")
    for node in found:  # one by one: a definition whose defaults need module constants is left out
        try:
            exec(compile(ast.Module(body=[node], type_ignores=[]), str(source), "exec"), namespace)
        except (NameError, AttributeError, TypeError):
            if node.name in names:
                raise


def load(dataset: str) -> types.SimpleNamespace:
    """SGLang's ``popen_launch_server``, ``kill_process_tree`` and ``run_eval``, with MGSM-en read from
    ``dataset`` (a local TSV)."""
    try:  # a complete SGLang (GPU machine): the real modules, nothing stood in
        from sglang.srt.utils import kill_process_tree  # type: ignore[import-not-found]
        from sglang.test import run_eval as run_eval_mod  # type: ignore[import-not-found]
        from sglang.test import simple_eval_mgsm  # type: ignore[import-not-found]
        from sglang.test.test_utils import popen_launch_server  # type: ignore[import-not-found]

        stand_ins = False
        real_error = ""
    except Exception as exc:  # recorded: why the real modules could not be imported
        real_error = f"{type(exc).__name__}: {exc}"[:300]
        root = _sglang_dir()
        _namespace_package("sglang", root)
        _namespace_package("sglang.test", root / "test")
        utils = types.ModuleType("sglang.utils")
        utils.is_in_ci = lambda: os.environ.get("SGLANG_IS_IN_CI", "").lower() in ("1", "true", "yes", "on")  # type: ignore[attr-defined]
        sys.modules["sglang.utils"] = utils
        import psutil
        import requests

        common: dict[str, Any] = {
            "__name__": "sglang.srt.utils.common",
            "os": os,
            "sys": sys,
            "time": time,
            "signal": __import__("signal"),
            "psutil": psutil,
            "logger": logging.getLogger("sglang.srt.utils.common"),
            **{n: getattr(typing, n) for n in ("Any", "List", "Optional")},
        }
        _functions(root / "srt" / "utils" / "common.py", COMMON_FUNCTIONS, common)
        kill_process_tree = common["kill_process_tree"]
        torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_initialized=lambda: False))
        tu_ns: dict[str, Any] = {
            "__name__": "sglang.test.test_utils",
            **{m: __import__(m) for m in ("os", "sys", "time", "subprocess", "threading", "shlex", "json")},
            "requests": requests,
            "psutil": psutil,
            "torch": torch,
            "kill_process_tree": kill_process_tree,
            **{n: getattr(typing, n) for n in ("Any", "Callable", "List", "Optional", "Tuple")},
        }
        _functions(root / "test" / "test_utils.py", TEST_UTILS_FUNCTIONS, tu_ns)
        test_utils = types.ModuleType("sglang.test.test_utils")
        test_utils.__dict__.update(tu_ns)
        test_utils.dump_metric = lambda *a, **k: None  # type: ignore[attr-defined]
        sys.modules["sglang.test.test_utils"] = test_utils
        popen_launch_server = tu_ns["popen_launch_server"]
        import sglang.test.run_eval as run_eval_mod  # type: ignore[import-not-found]
        import sglang.test.simple_eval_mgsm as simple_eval_mgsm  # type: ignore[import-not-found]

        stand_ins = True
    local = Path(dataset).resolve().as_uri()
    if isinstance(getattr(simple_eval_mgsm, "LANG_TO_FPATH", None), dict):
        simple_eval_mgsm.LANG_TO_FPATH["en"] = local
    import urllib.request

    opener = urllib.request.urlopen

    def urlopen(url: Any, *a: Any, **k: Any) -> Any:  # any other MGSM-en download reads the local file
        return opener(local if str(url).endswith("mgsm_en.tsv") else url, *a, **k)

    urllib.request.urlopen = urlopen  # type: ignore[assignment]
    return types.SimpleNamespace(
        popen_launch_server=popen_launch_server,
        kill_process_tree=kill_process_tree,
        run_eval=run_eval_mod.run_eval,
        stand_ins=stand_ins,
        real_error=real_error,
    )


def _eval_args(base_url: str, threads: int, model: str | None, n: int | None) -> types.SimpleNamespace:
    # what test_mla_fp8.py passes (test/registered/mla/test_mla_fp8.py: eval_name mgsm_en, num_threads 1024)
    return types.SimpleNamespace(
        base_url=base_url, model=model, eval_name="mgsm_en", num_examples=n, num_threads=threads
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("flow", "eval"))
    p.add_argument("--dataset", required=True)
    p.add_argument("--base-url", required=True, help="flow: where to launch; eval: the running server")
    p.add_argument("--model", default="sim/model")
    p.add_argument("--threads", type=int, default=1024)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--other-args", default="--trust-remote-code --kv-cache-dtype fp8_e5m2")
    p.add_argument("--num-examples", type=int, help="only the first N questions (default: all, as the test)")
    args = p.parse_args()
    t_import = time.monotonic()
    sg = load(args.dataset)
    out: dict[str, Any] = {
        "stand_ins": sg.stand_ins,
        "real_import_error": sg.real_error,
        "import_s": time.monotonic() - t_import,
    }
    sys.stdout.flush()
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # SGLang prints progress; keep stdout for our one JSON line
    try:
        if args.mode == "eval":
            t = time.monotonic()
            metrics = sg.run_eval(_eval_args(args.base_url, args.threads, args.model, args.num_examples))
            out.update(eval_s=time.monotonic() - t, score=metrics["score"])
        else:
            # test_mla_fp8.py: setUpClass launches, test_mgsm_en evaluates, tearDownClass kills the tree
            t = time.monotonic()
            process = sg.popen_launch_server(
                args.model,
                args.base_url,
                timeout=args.timeout,
                other_args=args.other_args.split(),
                device="cuda",  # what "auto" resolves to on the GPU runner; auto-detection needs torch
            )
            out["launch_s"] = time.monotonic() - t
            try:
                t1 = time.monotonic()
                metrics = sg.run_eval(_eval_args(args.base_url, args.threads, None, args.num_examples))
                out.update(eval_s=time.monotonic() - t1, score=metrics["score"])
            finally:
                t2 = time.monotonic()
                sg.kill_process_tree(process.pid)
                out["teardown_s"] = time.monotonic() - t2
            out["flow_s"] = time.monotonic() - t
    finally:
        sys.stdout = real_stdout
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
