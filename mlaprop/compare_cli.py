"""``mlaprop compare`` and ``mlaprop table``: the file-reading edge of :mod:`mlaprop.compare`.

``add_compare(sub, help)`` / ``add_table(sub, help)`` add the commands to ``mlaprop``'s sub-parsers; each
sets ``func(args, environ) -> int``. ``python -m mlaprop.compare_cli compare A B`` runs them without the
main CLI.

Exit codes: 0 compared (or table written); 1 ``compare --fail-if-worse`` and B is significantly lower than
A; 2 a report that cannot be read (missing, not a report, damaged ``items.jsonl``), with one line naming it.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlaprop.cli.common import one_line_errors
from mlaprop.compare import (
    InvalidRun,
    RunRecord,
    compare_runs,
    comparison_json,
    format_comparison,
    gating_parser,
    parse_items,
    table_cells,
    table_html,
    table_markdown,
)
from mlaprop.stats import DEFAULT_ALPHA

__all__ = ["add_compare", "add_table", "find_reports", "load_run", "main"]

SUMMARY_FILE = "summary.json"
ITEMS_FILE = "items.jsonl"

#: A report file larger than this is not a report (bytes; a 250-question items.jsonl is under 2 MiB).
MAX_REPORT_BYTES = 256 * 1024 * 1024

EXIT_OK, EXIT_WORSE, EXIT_USAGE = 0, 1, 2


def _read_text(path: Path) -> str:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InvalidRun(f"{path}: no such file") from None
    except OSError as exc:
        raise InvalidRun(f"{path}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise InvalidRun(f"{path}: not a regular file")
    if info.st_size > MAX_REPORT_BYTES:
        raise InvalidRun(f"{path}: {info.st_size} bytes, larger than any mlaprop report")
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InvalidRun(f"{path}: cannot be read ({exc.strerror})") from None


def _summary_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p / SUMMARY_FILE if p.is_dir() else p


def load_run(path: str | os.PathLike[str], parser: str | None = None, need_items: bool = True) -> RunRecord:
    """Read one run: ``path`` is its ``summary.json`` or the report folder holding it.

    Items come from ``items.jsonl`` beside the summary (a downloaded CI artifact), else from the path the
    summary names. Each item is marked by ``parser`` (default: the run's gating parser).

    Raises:
        InvalidRun: the summary is missing, not JSON or not an mlaprop summary; the items are missing (when
            ``need_items``) or damaged. The message names the file.
    """
    summary_path = _summary_path(path)
    text = _read_text(summary_path)
    try:
        summary = json.loads(text)
    except ValueError as exc:
        raise InvalidRun(f"{summary_path}: not JSON ({exc})") from None
    except RecursionError:
        raise InvalidRun(f"{summary_path}: not an mlaprop summary.json (JSON nested too deeply)") from None
    if not isinstance(summary, dict) or not ({"mgsm", "plan", "status"} & set(summary)):
        raise InvalidRun(f"{summary_path}: not an mlaprop summary.json (no status, plan or mgsm)")
    items_path = summary_path.parent / ITEMS_FILE
    if not items_path.is_file():
        named = summary.get("report", {}).get("items") if isinstance(summary.get("report"), dict) else None
        if isinstance(named, str) and _same_run(summary, Path(named).parent / SUMMARY_FILE):
            items_path = Path(named)
    marked_by = parser or gating_parser(summary)
    if items_path.is_file():
        items = parse_items(_read_text(items_path).splitlines(), marked_by, str(items_path))
    elif need_items:
        raise InvalidRun(
            f"{summary_path}: no {ITEMS_FILE} beside it; compare needs the per-question results (copy the "
            "whole report folder)"
        )
    else:
        items = ()
    return RunRecord(name=str(summary_path), summary=summary, items=items)


def _same_run(summary: Mapping[str, Any], other: Path) -> bool:
    """``other`` (the summary beside the items a summary names) is the same run: a later run into that
    folder replaced the items, which must not be read as this run's."""
    try:
        theirs = json.loads(_read_text(other))
    except (InvalidRun, ValueError, RecursionError):
        return False
    keys = ("started_at", "command")
    return isinstance(theirs, dict) and all(theirs.get(k) == summary.get(k) for k in keys)


def find_reports(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Every ``summary.json`` named by ``paths``: a file itself, a report folder, or a folder searched
    recursively (sorted, each once).

    Raises:
        InvalidRun: a path that does not exist or holds no report.
    """
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            hits = sorted(p.rglob(SUMMARY_FILE))
            if not hits:
                raise InvalidRun(f"{p}: no {SUMMARY_FILE} in it or below it")
            found += hits
        else:
            raise InvalidRun(f"{p}: no such file or folder")
    return list(dict.fromkeys(x.resolve() for x in found))


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _cmd_compare(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    try:
        a = load_run(args.a, args.parser)
        b = load_run(args.b, args.parser or gating_parser(a.summary))
    except InvalidRun as exc:
        print(f"mlaprop: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    result = compare_runs(a, b, parser=args.parser or gating_parser(a.summary), alpha=args.alpha)
    if args.json:
        print(json.dumps(comparison_json(result), indent=2, ensure_ascii=False))
    else:
        print(format_comparison(result, max_flips=args.max_flips))
    return EXIT_WORSE if args.fail_if_worse and result.b_worse else EXIT_OK


def _cmd_table(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    try:
        runs = [load_run(p, need_items=False) for p in find_reports(args.paths)]
    except InvalidRun as exc:
        print(f"mlaprop: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    cells = table_cells(runs)
    fmt = args.format or (
        "html" if args.output and str(args.output).endswith((".html", ".htm")) else "markdown"
    )
    text = table_html(cells) if fmt == "html" else table_markdown(cells)
    if args.output:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as exc:
            print(f"mlaprop: error: cannot write {args.output} ({exc.strerror})", file=sys.stderr)
            return EXIT_USAGE
        print(f"{len(runs)} runs -> {args.output}")
    else:
        sys.stdout.write(text)
    return EXIT_OK


Subparsers = Any  # argparse._SubParsersAction[argparse.ArgumentParser]


def add_compare(sub: Subparsers, help: str = "compare two runs on the same questions") -> None:
    """Add ``mlaprop compare A B``."""
    p = sub.add_parser(
        "compare",
        help=help,
        description=(
            "Pair two runs on the questions both answered: exact McNemar p-value, the questions that flipped, "
            "the score difference with its 95%% interval, the determinism results, and every plan, platform "
            "and provenance difference (NVIDIA vs AMD, deterministic vs not, SGLang A vs B). Exit 0; 1 with "
            "--fail-if-worse when B is significantly lower; 2 when a report cannot be read."
        ),
    )
    p.add_argument("a", metavar="A", help="run A: its summary.json or report folder")
    p.add_argument("b", metavar="B", help="run B: its summary.json or report folder")
    p.add_argument(
        "--parser",
        choices=["simple-evals", "robust"],
        help="compare by this parser (default: A's gating one)",
    )
    p.add_argument(
        "--alpha", type=_alpha, default=DEFAULT_ALPHA, help="significance level (default: %(default)s)"
    )
    p.add_argument("--json", action="store_true", help="print JSON (every flipped question)")
    p.add_argument(
        "--max-flips", type=_count, default=50, metavar="N", help="flipped questions listed (text), >= 0"
    )
    p.add_argument(
        "--fail-if-worse", action="store_true", help="exit 1 when B scores significantly lower than A"
    )
    p.set_defaults(func=_cmd_compare)
    one_line_errors(p)  # the cause first, no usage block, as every other command


def add_table(
    sub: Subparsers, help: str = "merge many runs into one platform x SGLang version table"
) -> None:
    """Add ``mlaprop table DIR...``."""
    p = sub.add_parser(
        "table",
        help=help,
        description=(
            "One row per platform (GPU, vendor, arch, GPU count), one column per SGLang version; each run's "
            "score with its 95%% interval, n, minimum detectable drop, backend and determinism result."
        ),
    )
    p.add_argument(
        "paths", nargs="+", metavar="DIR", help="report folders, summary.json files, or folders of them"
    )
    p.add_argument(
        "--format", choices=["markdown", "html"], help="default: markdown (html for an .html --output)"
    )
    p.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    p.set_defaults(func=_cmd_table)
    one_line_errors(p)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mlaprop.compare_cli {compare,table} ...``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="mlaprop")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_compare(sub)
    add_table(sub)
    args = parser.parse_args(argv)
    return int(args.func(args, None))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
