"""The canary: a tiny DeepseekV2 (MLA, block FP8) model trained to answer the 250 MGSM-en questions, so smoke
mode can gate on a score that only a correct serving stack reaches.

It has the test model's attention shapes (16 heads, kv_lora_rank 512, qk_nope 128, qk_rope 64, v_head 128,
yarn rope), 2 layers (the second a small MoE: 8 experts, top-2, 1 shared), and answers each question, asked
with simple-evals' prompt through the chat template, with `` Answer: N``. It memorises: the score measures
MLA attention, block-FP8 dequantization, the KV cache, rope, MoE routing and the chat template of the
serving stack, not reasoning. It is trained on the runner's GPU (``mlaprop canary build``), checked by a
plain-torch reference forward of the saved weights, and cached under ``$XDG_CACHE_HOME/mlaprop/canary/<recipe
hash>``.

This module imports no torch: :func:`ensure_canary` and the CLI handler import the trainer lazily.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlaprop.exitcodes import ExitCode
from mlaprop.tinymodel import model_config

__all__ = [
    "CANARY_VERSION",
    "CanaryError",
    "ReferenceAgreement",
    "add_canary_parser",
    "canary_config",
    "compare_with_reference",
    "default_cache_dir",
    "ensure_canary",
    "recipe",
    "reference_answers",
]

#: Bumped by hand when the recipe changes in a way the source hash would not show.
CANARY_VERSION = 1
#: Tokenizer vocabulary asked of the BPE trainer.
VOCAB = 4096
#: The file in the model folder that records the recipe, training figures and the reference answers.
META = "canary.json"


class CanaryError(RuntimeError):
    """The canary cannot be built or used here (the message says why and what to do)."""


def canary_config(
    vocab: int = VOCAB,
    *,
    bos: int = 0,
    eos: int = 1,
    pad: int = 2,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The canary's ``config.json``: the smoke model's (:func:`mlaprop.tinymodel.model_config`) with the
    vocabulary rounded up to a multiple of 64, and ``overrides`` applied on top (tests shrink it)."""
    cfg = model_config(
        layers=2, vocab=-(-vocab // 64) * 64, hidden=1024, block=128, bos=bos, eos=eos, pad=pad
    )
    cfg.update(overrides or {})
    return cfg


def _code_digest() -> str:
    here = Path(__file__).parent
    files = [*sorted(here.glob("*.py")), here.parent / "tinymodel.py"]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def recipe(
    dataset_sha256: str, train_config: Mapping[str, Any], config_overrides: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Everything the canary is a function of: code (version and source digest), model config, data, seed
    and training settings. Its SHA-256 names the cache folder."""
    return {
        "canary_version": CANARY_VERSION,
        "code_sha256": _code_digest(),
        "config": canary_config(overrides=config_overrides),
        "vocab": VOCAB,
        "dataset_sha256": dataset_sha256,
        "train": dict(train_config),
    }


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME/mlaprop/canary`` (``~/.cache/mlaprop/canary`` when unset, empty or relative)."""
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path(env.get("HOME") or Path.home()) / ".cache"
    return base / "mlaprop" / "canary"


def _load_dataset(dataset_path: str | os.PathLike[str] | None) -> Any:
    from mlaprop.mgsm import resolve_dataset

    return resolve_dataset("en", dataset_path)


def cached_path(dataset_sha256: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the canary of this recipe lives (it may not exist yet)."""
    from mlaprop.canary.train import TrainConfig  # imports torch

    r = recipe(dataset_sha256, TrainConfig().to_dict(), None)
    digest = hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / digest[:16]


def ensure_canary(
    dataset_path: str | os.PathLike[str] | None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    device: str | None = None,
    force: bool = False,
    log: Any = None,
) -> Path:
    """The canary model folder for this MGSM-en file: from the cache, or trained now (a few minutes on a GPU).

    Args:
        dataset_path: the MGSM-en TSV (``None``: mlaprop's cached download).
        cache_dir: cache root (default :func:`default_cache_dir`).
        device: torch device to train on (``None``: the GPU).
        force: rebuild even when cached.
        log: callable taking a progress line (default: none).

    Raises:
        CanaryError: torch/safetensors/tokenizers missing, no GPU, or the trained model does not answer
            every question in its reference check.
        mlaprop.mgsm.InvalidDataset, mlaprop.mgsm.DatasetUnavailable: the dataset cannot be read.
    """
    try:
        import safetensors  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
        import tokenizers  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
        import torch  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError as exc:
        raise CanaryError(
            f"the canary needs torch, safetensors and tokenizers ({exc}): pip install 'mlaprop[canary]' "
            "(on a GPU runner, use the runner's own torch build)"
        ) from None
    from mlaprop.canary.build import build_canary

    dataset = _load_dataset(dataset_path)
    path = cached_path(dataset.sha256, cache_dir)
    if (path / META).is_file() and (path / "model.safetensors").is_file() and not force:
        return path
    build_canary(dataset, path, device=device, log=log or (lambda _s: None))
    return path


@dataclass(frozen=True)
class ReferenceAgreement:
    """Server answers against the reference forward's, question by question.

    Attributes:
        total: questions compared (those in both).
        same_answer: the extracted answers agree.
        same_text: the texts agree exactly (whitespace stripped).
        differing: qids whose extracted answers differ.
    """

    total: int
    same_answer: int
    same_text: int
    differing: tuple[str, ...]

    @property
    def rate(self) -> float:
        """``same_answer / total`` (0 when nothing was compared)."""
        return self.same_answer / self.total if self.total else 0.0


def reference_answers(model_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """qid -> the reference row (``reference`` text, ``extracted`` answer, ``target``, ``margin``) from the
    canary's ``canary.json``.

    Raises:
        CanaryError: the folder has no ``canary.json`` (not a canary).
    """
    meta = Path(model_dir) / META
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CanaryError(f"{meta}: not a canary model folder ({exc})") from None
    return {row["qid"]: row for row in data["questions"]}


def compare_with_reference(
    model_dir: str | os.PathLike[str], answers: Mapping[str, tuple[str, str]]
) -> ReferenceAgreement:
    """Compare server answers (qid -> (response text, extracted answer)) with the reference's.

    Raises:
        CanaryError: see :func:`reference_answers`.
    """
    ref = reference_answers(model_dir)
    common = [q for q in answers if q in ref]
    same_answer = [q for q in common if answers[q][1] == ref[q]["extracted"]]
    same_text = [q for q in common if answers[q][0].strip() == str(ref[q]["reference"]).strip()]
    differing = tuple(q for q in common if answers[q][1] != ref[q]["extracted"])
    return ReferenceAgreement(len(common), len(same_answer), len(same_text), differing)


def _cmd_build(args: argparse.Namespace, environ: Mapping[str, str] | None) -> int:
    from mlaprop.mgsm import DatasetUnavailable, InvalidDataset

    cache = args.cache_dir or default_cache_dir(environ)
    try:
        path = ensure_canary(
            args.dataset,
            cache,
            device=args.device,
            force=args.force,
            log=lambda s: print(s, file=sys.stderr, flush=True),
        )
    except CanaryError as exc:  # no GPU or torch: usage; a model that misses its reference: infrastructure
        print(f"mlaprop: error: {exc}", file=sys.stderr)
        return ExitCode.INFRASTRUCTURE if "reference forward" in str(exc) else ExitCode.USAGE
    except (InvalidDataset, DatasetUnavailable) as exc:
        print(f"mlaprop: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    meta = json.loads((path / META).read_text(encoding="utf-8"))
    if args.json:
        print(json.dumps({k: v for k, v in meta.items() if k != "questions"}, indent=1))
    else:
        print(path)
    return ExitCode.OK


def add_canary_parser(sub: Any, help_text: str | None = None) -> None:
    """Add ``canary build`` to the CLI's subparsers (``sub`` from ``ArgumentParser.add_subparsers``); the
    handler is stored as ``func(args, environ) -> exit code`` (0 built or cached, 2 no GPU/torch or a bad
    dataset, 3 the trained model misses its reference check)."""
    p = sub.add_parser("canary", help=help_text or "the trained tiny MLA FP8 model smoke mode gates on")
    csub = p.add_subparsers(dest="canary_command", required=True)
    b = csub.add_parser(
        "build",
        help="train the canary on this machine's GPU (a few minutes) or reuse the cached one; prints its folder",
    )
    b.add_argument("--dataset", help="the MGSM-en TSV (default: mlaprop's cached download)")
    b.add_argument("--cache-dir", help="cache root (default: $XDG_CACHE_HOME/mlaprop/canary)")
    b.add_argument("--device", help="torch device to train on (default: the GPU; 'cpu' takes hours)")
    b.add_argument("--force", action="store_true", help="rebuild even when a cached canary exists")
    b.add_argument("--json", action="store_true", help="print the build record (recipe, training, checks)")
    b.set_defaults(func=_cmd_build)
