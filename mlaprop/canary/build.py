"""Building the canary: train, save as SGLang loads a DeepSeek block-FP8 checkpoint, check the saved weights
with a plain-torch reference forward, cache under a hash of the recipe. Importing this module imports torch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch  # type: ignore[import-not-found,unused-ignore]

from mlaprop.canary import CANARY_VERSION, CanaryError, canary_config, recipe
from mlaprop.canary.checkpoint import load_checkpoint, save_checkpoint
from mlaprop.canary.data import Example, corpus, examples
from mlaprop.canary.model import CanaryLM, Numerics
from mlaprop.canary.train import TrainConfig, batch, greedy, train
from mlaprop.mgsm import MgsmDataset, MgsmItem, Parser, is_correct, parse_answer_simple_evals
from mlaprop.tinymodel import _special_ids, train_tokenizer, write_model_folder

__all__ = ["BuildResult", "build_canary", "reference_check"]


@dataclass(frozen=True)
class BuildResult:
    """A built canary.

    Attributes:
        path: the model folder.
        seconds: total build time (tokenizer, training, saving, reference check), seconds.
        train_seconds: the training loop's time, seconds.
        bytes: size of ``model.safetensors``.
        reference_correct: questions the reference forward of the saved weights answers right (plain fp32).
        serving_correct: the same with serving numerics (bf16, FP8 activations, e5m2 latent KV).
        min_margin: smallest top-1 minus top-2 logit gap of the plain reference's answer tokens.
    """

    path: Path
    seconds: float
    train_seconds: float
    bytes: int
    reference_correct: int
    serving_correct: int
    min_margin: float


def _pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    if torch.cuda.is_available():  # CUDA and ROCm (HIP) builds of torch both answer here
        return torch.device("cuda")
    raise CanaryError(
        "building the canary trains a model and needs a GPU (CUDA or ROCm torch); none is visible to torch. "
        "Run `mlaprop canary build` on the GPU runner, or pass --device cpu to train on the CPU (hours)."
    )


def reference_check(
    path: Path,
    items: tuple[MgsmItem, ...],
    exs: list[Example],
    tok: Any,
    config: Mapping[str, Any],
    device: torch.device,
) -> dict[str, Any]:
    """Greedy answers of the SAVED weights (dequantized): plain float32 (the reference) and serving numerics.

    Returns ``{"questions": [...], "reference_correct": n, "serving_correct": n, "min_margin": x}``.
    """
    weights = load_checkpoint(path, config)
    model = CanaryLM(config, weights).to(device).eval()
    eos, pad = int(config["eos_token_id"]), int(config["pad_token_id"])
    prompts = [e.prompt_ids for e in exs]
    plain = greedy(model, prompts, eos, pad)
    serving_num = Numerics(fp8_weights=False, fp8_activations=True, kv_e5m2=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    serving = greedy(model, prompts, eos, pad, num=serving_num, dtype=dtype)
    rows = []
    for item, (ids, gap), (sids, _sgap) in zip(items, plain, serving, strict=True):
        text, stext = tok.decode(ids), tok.decode(sids)
        extracted = parse_answer_simple_evals(text)
        rows.append(
            {
                "qid": item.qid,
                "target": item.target,
                "reference": text,
                "extracted": extracted,
                "correct": is_correct(Parser.SIMPLE_EVALS, item.target, extracted),
                "margin": round(gap, 4),
                "serving_reference": stext,
                "serving_correct": is_correct(
                    Parser.SIMPLE_EVALS, item.target, parse_answer_simple_evals(stext)
                ),
            }
        )
    return {
        "questions": rows,
        "reference_correct": sum(r["correct"] for r in rows),
        "serving_correct": sum(r["serving_correct"] for r in rows),
        "min_margin": min((r["margin"] for r in rows), default=0.0),
    }


def build_canary(
    dataset: MgsmDataset,
    out: Path,
    *,
    device: str | None = None,
    train_config: TrainConfig | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    require_all: bool = True,
    log: Callable[[str], None] = lambda _s: None,
) -> BuildResult:
    """Train the canary on ``dataset`` and write the model folder ``out`` (replaced atomically).

    Args:
        device: torch device (``None``: the GPU; refuses the CPU unless named).
        train_config: training recipe (default :class:`TrainConfig`).
        config_overrides: changes to the model config (tests shrink it).
        require_all: refuse a model whose reference forward misses any question.

    Raises:
        CanaryError: no GPU; training did not reach the answers; the saved weights' reference forward misses
            a question (``require_all``).
        OSError: ``out`` cannot be written.
    """
    started = time.monotonic()
    tc = train_config or TrainConfig()
    dev = _pick_device(device)
    torch.manual_seed(tc.seed)
    items = dataset.items
    tok = train_tokenizer(corpus(items), int(canary_config()["vocab_size"]))
    bos, eos, pad = _special_ids(tok)
    config = canary_config(tok.get_vocab_size(), bos=bos, eos=eos, pad=pad, overrides=config_overrides)
    exs = examples(items, tok, eos)
    ids, labels = batch(exs, pad, dev)
    model = CanaryLM(config, seed=tc.seed).to(dev)
    log(f"canary: {len(exs)} questions, longest {ids.shape[1]} tokens, training on {dev}")
    stats = train(model, ids, labels, tc, log)
    log(
        f"canary: trained {stats.steps} steps in {stats.seconds:.1f} s, loss {stats.final_loss:.4f}, "
        f"{stats.correct}/{len(exs)} correct, min margin {stats.min_margin:.2f}"
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_model_folder(tmp, tok, config)
        weights = {n: w.detach().cpu() for n, w in model.named_weights().items()}
        saved = save_checkpoint(tmp, weights, config)
        del model
        ref = reference_check(tmp, items, exs, tok, config, dev)
        log(
            f"canary: reference forward of the saved weights: {ref['reference_correct']}/{len(items)} "
            f"(serving numerics {ref['serving_correct']}/{len(items)}), min margin {ref['min_margin']:.2f}"
        )
        meta = {
            "canary_version": CANARY_VERSION,
            "recipe": recipe(dataset.sha256, tc.to_dict(), config_overrides),
            "dataset": {"path": dataset.path, "sha256": dataset.sha256, "rows": len(items)},
            "train": {
                "steps": stats.steps,
                "seconds": round(stats.seconds, 2),
                "final_loss": stats.final_loss,
                "converged": stats.converged,
                "device": stats.device,
                "torch": torch.__version__,
                "history": [list(h) for h in stats.history],
            },
            "checkpoint": saved,
            **ref,
        }
        (tmp / "canary.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if require_all and ref["reference_correct"] != len(items):
            raise CanaryError(
                f"the reference forward of the saved canary answers {ref['reference_correct']}/{len(items)} "
                f"questions (training: {stats.steps} steps, converged={stats.converged}); nothing was cached. "
                "Raise TrainConfig.max_steps or time_limit_s"
            )
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:  # another build of the same recipe finished first: keep its folder
            if not (out / "canary.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BuildResult(
        path=out,
        seconds=time.monotonic() - started,
        train_seconds=stats.seconds,
        bytes=int(saved["bytes"]),
        reference_correct=int(ref["reference_correct"]),
        serving_correct=int(ref["serving_correct"]),
        min_margin=float(ref["min_margin"]),
    )
