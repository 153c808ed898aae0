"""Extract the option table of SGLang's ``launch_server`` parser, per SGLang version, into
``mlaprop/data/sglang_options.json``.

Usage::

    python tools/extract_options.py --wheels DIR [--versions 0.5.4 0.5.23 ...]   # regenerate from wheels
    python tools/extract_options.py --installed                                   # print the installed one

With ``--wheels`` each ``sglang-X-*.whl`` in DIR (``pip download --no-deps sglang==X -d DIR``) is unpacked
and imported in a subprocess of its own, with every module the wheel cannot import on a CPU machine
(torch, triton, CUDA kernels, ...) replaced by an import stand-in, and ``ServerArgs.add_cli_args`` is run on a
fresh ``argparse.ArgumentParser`` exactly as ``prepare_server_args`` does. The table keeps, per option:
its option strings, ``dest``, argparse action class, ``nargs``, ``type`` when ``int`` or ``float`` (argparse
exits 2 on a value that does not convert) and (for a few options mlaprop checks) its ``choices``. ``tests/contract/test_options.py`` regenerates the table of the installed SGLang with its real
dependencies and compares it with the shipped data, so a stand-in that changed a table is caught.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path
from typing import Any

#: Options whose ``choices`` are kept in the table (the others' choices are not needed by mlaprop).
CHOICES_KEPT = (
    "attention_backend",
    "kv_cache_dtype",
    "prefill_attention_backend",
    "decode_attention_backend",
    "rl_on_policy_target",
    "load_format",
)
DATA = Path(__file__).resolve().parent.parent / "mlaprop" / "data" / "sglang_options.json"


def table_from_parser(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The option table of a built parser: ``{"allow_abbrev": bool, "options": [...]}`` sorted by dest."""
    options = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        entry: dict[str, Any] = {
            "strings": sorted(action.option_strings),
            "dest": action.dest,
            "action": type(action).__name__,
            "nargs": action.nargs
            if action.nargs is None or isinstance(action.nargs, str)
            else int(action.nargs),
        }
        if action.type in (int, float):
            entry["type"] = action.type.__name__
        if action.dest in CHOICES_KEPT and action.choices is not None:
            entry["choices"] = sorted(str(c) for c in action.choices)
        options.append(entry)
    options.sort(key=lambda e: (e["dest"], e["strings"]))
    return {"allow_abbrev": parser.allow_abbrev, "options": options}


def implies_deterministic(source: str) -> list[str]:
    """Options that turn deterministic inference on by themselves, read from SGLang's source text:
    ``--rl-on-policy-target`` from 0.5.5 (``_handle_deterministic_inference``: "Enable deterministic
    inference because of rl_on_policy_target")."""
    return ["--rl-on-policy-target"] if "because of rl_on_policy_target" in source else []


# --- the stand-in import machinery (runs inside the per-version subprocess) ----------------------------


class _StubMeta(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _StubMeta(name, (cls,), {})

    def __iter__(cls) -> Any:
        return iter(())

    def __or__(cls, other: Any) -> Any:
        return cls

    def __add__(cls, other: Any) -> Any:
        return list(other) if isinstance(other, (list, tuple)) else cls

    def __radd__(cls, other: Any) -> Any:
        return list(other) if isinstance(other, (list, tuple)) else cls

    def __len__(cls) -> int:
        return 0

    __ror__ = __or__

    def __getitem__(cls, item: Any) -> Any:
        return cls


class _Stub(metaclass=_StubMeta):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]  # used as a decorator
        return _Stub()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub()

    def __iter__(self) -> Any:
        return iter(())

    def __bool__(self) -> bool:
        return False

    def __getitem__(self, item: Any) -> Any:
        return _Stub()


def _stub_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name, "extract_options stand-in")
    module.__path__ = []  # type: ignore[attr-defined]

    def __getattr__(attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _StubMeta(attr, (_Stub,), {})

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    return module


class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers imports no real finder can (and the heavy GPU stack) with a stand-in module."""

    HEAVY = ("torch", "triton", "torchvision", "sgl_kernel", "flashinfer", "vllm", "deep_gemm", "cuda")

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        top = fullname.split(".")[0]
        if top in self.HEAVY:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        if top == "sglang":
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            try:
                spec = finder.find_spec(fullname, path, target)  # type: ignore[attr-defined]
            except Exception:
                spec = None
            if spec is not None:
                return None  # a real module: import it
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: Any) -> types.ModuleType:
        return _stub_module(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class _Forgiving(importlib.abc.MetaPathFinder):
    """Imports ``sglang`` modules for real; a module whose body raises keeps the names it defined and
    answers the rest with stand-ins (the parser needs option definitions, not the kernels)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if not fullname.startswith("sglang"):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        real = spec.loader

        class Loader(importlib.abc.Loader):
            def create_module(self, spec: Any) -> Any:
                return None

            def exec_module(self, module: types.ModuleType) -> None:
                core = fullname == "sglang.srt.server_args" or fullname.startswith("sglang.srt.arg_groups")
                if not core:
                    # names a failed import left undefined (here or in a module this one star-imports)

                    def __getattr__(attr: str) -> Any:
                        if attr.startswith("__"):
                            raise AttributeError(attr)
                        return _StubMeta(attr, (_Stub,), {})

                    module.__getattr__ = __getattr__  # type: ignore[attr-defined]
                try:
                    real.exec_module(module)  # type: ignore[union-attr]
                except Exception:
                    if core:
                        raise

        spec.loader = Loader()
        return spec


def _extract_here(root: str | None) -> dict[str, Any]:
    if root is not None:
        sys.path.insert(0, root)
        sys.meta_path.insert(0, _Forgiving())
        sys.meta_path.insert(0, _StandIns())
    import logging

    logging.disable(logging.CRITICAL)
    server_args = importlib.import_module("sglang.srt.server_args")
    parser = argparse.ArgumentParser(prog="sglang serve")
    server_args.ServerArgs.add_cli_args(parser)
    table = table_from_parser(parser)
    table["implies_deterministic"] = implies_deterministic(Path(server_args.__file__).read_text())
    for extra in Path(server_args.__file__).parent.glob("arg_groups/*.py"):
        for name in implies_deterministic(extra.read_text()):
            if name not in table["implies_deterministic"]:
                table["implies_deterministic"].append(name)
    return table


def extract_installed() -> dict[str, Any]:
    """The table of the SGLang importable in this interpreter, imported with its real dependencies."""
    return _extract_here(None)


def extract_wheel(wheel: Path) -> dict[str, Any]:
    """The table of one SGLang wheel, unpacked and imported with stand-ins in a fresh interpreter."""
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(tmp, [n for n in zf.namelist() if n.startswith("sglang/")])
        out = subprocess.run(
            [sys.executable, __file__, "--unpacked", tmp],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"{wheel.name}: {out.stderr[-3000:]}")
        return json.loads(out.stdout)  # type: ignore[no-any-return]


def dumps(data: dict[str, Any]) -> str:
    """The data file's text: one line per option, so a diff between regenerations reads option by option."""
    lines = ["{"]
    for i, (version, table) in enumerate(data.items()):
        head = {k: v for k, v in table.items() if k != "options"}
        lines.append(f"{json.dumps(version)}: {{")
        for key, value in head.items():
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)},")
        lines.append('  "options": [')
        opts = table["options"]
        for j, opt in enumerate(opts):
            lines.append("    " + json.dumps(opt, separators=(",", ":")) + ("," if j < len(opts) - 1 else ""))
        lines.append("  ]")
        lines.append("}" + ("," if i < len(data) - 1 else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wheels", type=Path, help="folder of sglang-X-*.whl files")
    p.add_argument("--versions", nargs="*", help="only these versions (default: every wheel in --wheels)")
    p.add_argument("--installed", action="store_true", help="print the installed SGLang's table")
    p.add_argument("--unpacked", help=argparse.SUPPRESS)
    p.add_argument("--output", type=Path, default=DATA)
    args = p.parse_args(argv)
    if args.unpacked:
        json.dump(_extract_here(args.unpacked), sys.stdout)
        return 0
    if args.installed:
        json.dump(extract_installed(), sys.stdout, indent=1)
        return 0
    if args.wheels is None:
        p.error("give --wheels DIR or --installed")
    data = json.loads(args.output.read_text()) if args.output.exists() else {}
    for wheel in sorted(args.wheels.glob("sglang-*.whl")):
        version = wheel.name.split("-")[1]
        if args.versions and version not in args.versions:
            continue
        print(f"extracting {version}", file=sys.stderr)
        data[version] = extract_wheel(wheel)
    ordered = dict(
        sorted(data.items(), key=lambda kv: tuple(int(x) for x in kv[0].split(".") if x.isdigit()))
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(dumps(ordered))
    return 0


if __name__ == "__main__":
    sys.exit(main())
