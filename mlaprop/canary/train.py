"""Training the canary: full-batch AdamW on the answer tokens, with the serving numerics simulated, until
every question is answered right with a margin. Importing this module imports torch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch  # type: ignore[import-not-found,unused-ignore]
import torch.nn.functional as F  # type: ignore[import-not-found,unused-ignore]

from mlaprop.canary.data import Example
from mlaprop.canary.model import CanaryLM, Numerics

__all__ = ["TrainConfig", "TrainStats", "batch", "evaluate", "greedy", "train"]

IGNORE = -100


@dataclass(frozen=True)
class TrainConfig:
    """Training recipe (part of the cache key).

    Attributes:
        max_steps: give up after this many steps.
        lr: peak AdamW learning rate (linear warm-up, then constant).
        warmup: warm-up steps.
        weight_decay: AdamW weight decay.
        seed: initialisation and numerics-mask seed.
        check_every: steps between checks of the stopping rule.
        min_margin: stop once every answer token's logit beats every other by this much (logits), in both
            KV settings (bf16 and e5m2), with FP8 weights and activations.
        kv_e5m2_share: share of sequences per step whose latent KV goes through e5m2 (the rest bf16).
        time_limit_s: give up after this many seconds.
        lm_weight: weight of an auxiliary next-token loss on the prompt's tokens (0: answers only). Predicting
            the next token of a memorised text needs to know which token came last, which makes the model use
            position (rope) and so makes the canary sensitive to rope errors.
    """

    max_steps: int = 3000
    lr: float = 1e-3
    warmup: int = 30
    weight_decay: float = 0.0
    seed: int = 0
    check_every: int = 25
    min_margin: float = 3.0
    kv_e5m2_share: float = 0.5
    time_limit_s: float = 240.0
    lm_weight: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainStats:
    """What training did.

    Attributes:
        steps: steps taken.
        seconds: wall time of the loop, seconds.
        final_loss: the last step's loss.
        correct: sequences answered right (teacher forced, both KV settings) at the last check.
        min_margin: smallest answer-token logit margin at the last check.
        converged: the stopping rule was met.
        device: the torch device used.
        history: (step, loss, correct, min margin) at each check.
    """

    steps: int
    seconds: float
    final_loss: float
    correct: int
    min_margin: float
    converged: bool
    device: str
    history: tuple[tuple[int, float, int, float], ...]


def batch(
    exs: Sequence[Example], pad_id: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``ids`` [B, T] and ``labels`` [B, T] (the next token at answer positions, else -100).

    See :func:`prompt_labels` for the prompt's own next tokens."""
    t = max(len(e.prompt_ids) + len(e.answer_ids) for e in exs)
    ids = torch.full((len(exs), t), pad_id, dtype=torch.long)
    labels = torch.full((len(exs), t), IGNORE, dtype=torch.long)
    for i, e in enumerate(exs):
        seq = [*e.prompt_ids, *e.answer_ids]
        ids[i, : len(seq)] = torch.tensor(seq)
        p = len(e.prompt_ids)
        labels[i, p - 1 : len(seq) - 1] = torch.tensor(e.answer_ids)
    return ids.to(device), labels.to(device)


def prompt_labels(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token labels [B, T] over the prompt (positions before the answer), else -100."""
    nxt = torch.full_like(ids, IGNORE)
    nxt[:, :-1] = ids[:, 1:]
    first_answer = (labels != IGNORE).int().argmax(dim=1)  # the position predicting the first answer token
    pos = torch.arange(ids.shape[1], device=ids.device)[None, :]
    return torch.where(pos < first_answer[:, None], nxt, torch.full_like(ids, IGNORE))


def _serving(b: int, e5m2: bool, device: torch.device) -> Numerics:
    return Numerics(
        fp8_weights=True,
        fp8_activations=True,
        kv_e5m2=torch.full((b,), e5m2, dtype=torch.bool, device=device),
    )


@torch.no_grad()
def evaluate(
    model: CanaryLM, ids: torch.Tensor, labels: torch.Tensor, num: Numerics, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced check: per sequence, whether every answer token is the argmax, and its smallest margin
    (label logit minus the best other logit). Returns (correct [B] bool, margin [B] float)."""
    logits = model(ids, num, dtype)
    mask = labels != IGNORE
    safe = labels.clamp(min=0)
    lab = logits.gather(-1, safe[..., None])[..., 0]
    other = logits.scatter(-1, safe[..., None], float("-inf")).amax(-1)
    margin = torch.where(mask, lab - other, torch.full_like(lab, float("inf")))
    m = margin.amin(-1)
    return m > 0, m


def train(
    model: CanaryLM,
    ids: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    log: Callable[[str], None] = lambda _s: None,
) -> TrainStats:
    """Train ``model`` in place on one full batch (``ids``, ``labels`` from :func:`batch`) on their device.

    Computes in bf16 on a GPU (as the server does) and float32 on the CPU; each step sees FP8 weights and
    activations, and a random ``kv_e5m2_share`` of the sequences an e5m2 latent KV.
    """
    device = ids.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    b = ids.shape[0]
    lm_labels = prompt_labels(ids, labels) if cfg.lm_weight else None
    started = time.monotonic()
    history: list[tuple[int, float, int, float]] = []
    loss_v, correct, margin, converged, step = math.nan, 0, -math.inf, False, 0
    for step in range(1, cfg.max_steps + 1):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, step / max(1, cfg.warmup))
        kv = (torch.rand(b, generator=gen) < cfg.kv_e5m2_share).to(device)
        num = Numerics(fp8_weights=True, fp8_activations=True, kv_e5m2=kv)
        logits = model(ids, num, dtype)
        flat = logits.view(-1, logits.shape[-1])
        loss = F.cross_entropy(flat, labels.view(-1), ignore_index=IGNORE)
        if lm_labels is not None:
            loss = loss + cfg.lm_weight * F.cross_entropy(flat, lm_labels.view(-1), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_v = float(loss.detach())
        last = step == cfg.max_steps or time.monotonic() - started > cfg.time_limit_s
        if step % cfg.check_every == 0 or last:
            ok1, m1 = evaluate(model, ids, labels, _serving(b, False, device), dtype)
            ok2, m2 = evaluate(model, ids, labels, _serving(b, True, device), dtype)
            correct = int((ok1 & ok2).sum())
            margin = float(torch.minimum(m1, m2).min())
            history.append((step, loss_v, correct, margin))
            log(f"step {step}: loss {loss_v:.4f}, correct {correct}/{b}, min margin {margin:.2f}")
            if correct == b and margin >= cfg.min_margin:
                converged = True
                break
        if last:
            break
    return TrainStats(
        steps=step,
        seconds=time.monotonic() - started,
        final_loss=loss_v,
        correct=correct,
        min_margin=margin,
        converged=converged,
        device=str(device),
        history=tuple(history),
    )


@torch.no_grad()
def greedy(
    model: CanaryLM,
    prompts: Sequence[Sequence[int]],
    eos_id: int,
    pad_id: int,
    *,
    max_new: int = 16,
    num: Numerics | None = None,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 256,
) -> list[tuple[list[int], float]]:
    """Greedy decoding without a KV cache (each step recomputes the whole sequence): per prompt, the new
    tokens up to and excluding EOS, and the smallest top-1 minus top-2 logit gap over the decoded tokens."""
    device = next(model.parameters()).device
    out: list[tuple[list[int], float]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        lens = torch.tensor([len(p) for p in chunk], device=device)
        t = int(lens.max()) + max_new
        ids = torch.full((len(chunk), t), pad_id, dtype=torch.long, device=device)
        for i, p in enumerate(chunk):
            ids[i, : len(p)] = torch.tensor(list(p), device=device)
        done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        gaps = torch.full((len(chunk),), float("inf"), device=device)
        new: list[list[int]] = [[] for _ in chunk]
        rows = torch.arange(len(chunk), device=device)
        for _ in range(max_new):
            cur = int(lens.max())
            logits = model(ids[:, :cur], num, dtype)[rows, lens - 1]
            top = logits.topk(2, dim=-1)
            nxt = top.indices[:, 0]
            gaps = torch.where(done, gaps, torch.minimum(gaps, top.values[:, 0] - top.values[:, 1]))
            for i in range(len(chunk)):
                if not bool(done[i]):
                    if int(nxt[i]) == eos_id:
                        done[i] = True
                    else:
                        new[i].append(int(nxt[i]))
            ids[rows, lens] = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            lens = lens + (~done).long()
            if bool(done.all()):
                break
        out.extend((n, float(g)) for n, g in zip(new, gaps.tolist(), strict=True))
    return out
