"""The canary's training data: MGSM-en questions asked as mlaprop (and SGLang's ``mgsm_en``) asks them, through
the chat template, answered ``Answer: N``. Pure Python plus a ``tokenizers.Tokenizer``; no torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from mlaprop.mgsm import MgsmItem, build_prompt
from mlaprop.tinymodel import render_chat

__all__ = ["Example", "answer_text", "corpus", "examples"]


@dataclass(frozen=True)
class Example:
    """One training/reference sequence.

    Attributes:
        qid: the MGSM question id.
        target: the expected answer as written in the file.
        prompt_ids: the chat-templated prompt, tokenized as the server tokenizes it.
        answer_ids: the answer tokens followed by EOS.
    """

    qid: str
    target: str
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]


def answer_text(item: MgsmItem) -> str:
    """What the canary answers after ``Assistant:``: `` Answer: N`` (N without thousands commas)."""
    return f" Answer: {item.target_value}"


def corpus(items: Sequence[MgsmItem]) -> Iterator[str]:
    """Text the canary's tokenizer is trained on: every prompt and answer, and the bare digits."""
    for item in items:
        yield render_chat(build_prompt(item.question, item.lang)) + answer_text(item)
    yield "0123456789 ,.;:!?()[]{}<>+-*/=%$#@&'\"\n\t"


def examples(items: Sequence[MgsmItem], tok: Any, eos_id: int) -> list[Example]:
    """Tokenize every item (prompt as the server renders and tokenizes it; answer + EOS).

    Raises:
        ValueError: the tokenizer does not encode prompt and answer independently (the prompt's tokens are
            not a prefix of the whole sequence's), which would make the server's tokens differ from training.
    """
    out: list[Example] = []
    for item in items:
        prompt = render_chat(build_prompt(item.question, item.lang))
        p_ids = tuple(tok.encode(prompt).ids)
        full = tuple(tok.encode(prompt + answer_text(item)).ids)
        if full[: len(p_ids)] != p_ids:
            raise ValueError(f"{item.qid}: the prompt's tokens are not a prefix of prompt + answer")
        out.append(Example(item.qid, item.target, p_ids, (*full[len(p_ids) :], eos_id)))
    return out
