"""A tiny MLA FP8 model folder for smoke runs: real SGLang serves it with ``--load-format dummy``.

The shape is the test model's (``neuralmagic/DeepSeek-Coder-V2-Lite-Instruct-FP8``, DeepseekV2ForCausalLM)
with the real MLA dimensions (16 heads, 16 KV heads, kv_lora_rank 512, qk_nope 128, qk_rope 64, v_head 128,
yarn rope) shrunk elsewhere: 2 layers (layer 0 dense, layer 1 MoE with 8 routed experts, top-2, 1 shared),
hidden 1024, vocab 2048. Weights are block FP8 (``weight_block_size`` [128, 128], DeepSeek-V3 style):
per-tensor FP8 does not load in SGLang 0.5.11 for this architecture (kv_b_proj scale shape mismatch in
``DeepseekV2 post_load_weights``). No weight files: the dummy loader fills every parameter.

Writing the tokenizer needs the ``tokenizers`` package (``pip install 'mlaprop[smoke]'``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["BOS", "CHAT_TEMPLATE", "EOS", "PAD", "TinyModelError", "model_config", "write_tiny_mla"]

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"

#: A DeepSeek-Coder-V2-Instruct-like chat template (no tools).
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


class TinyModelError(RuntimeError):
    """The tiny model cannot be written here (the message says what is missing and how to install it)."""


def _corpus(n: int = 3000, seed: int = 0) -> Iterator[str]:
    rnd = random.Random(seed)
    words = [
        "the",
        "a",
        "an",
        "of",
        "to",
        "in",
        "is",
        "was",
        "for",
        "on",
        "that",
        "with",
        "as",
        "by",
        "at",
        "from",
        "it",
        "this",
        "be",
        "are",
        "answer",
        "question",
        "solve",
        "math",
        "problem",
        "step",
        "number",
        "total",
        "each",
        "more",
        "less",
        "than",
        "apples",
        "eggs",
        "dollars",
        "hours",
        "days",
        "people",
        "books",
        "User",
        "Assistant",
        "reasoning",
        "final",
        "Answer:",
        "therefore",
        "so",
        "then",
        "first",
        "second",
        "add",
        "subtract",
        "multiply",
        "divide",
        "equals",
    ]
    for _ in range(n):
        text = " ".join(rnd.choice(words) for _ in range(rnd.randint(4, 24)))
        nums = " ".join(str(rnd.randint(0, 10 ** rnd.randint(1, 4))) for _ in range(rnd.randint(0, 3)))
        yield f"{text} {nums}. {text.capitalize()}? Answer: {rnd.randint(0, 999)}\n"
    yield "0123456789 ,.;:!?()[]{}<>+-*/=%$#@&'\"\n\t"


def model_config(
    *,
    layers: int = 2,
    vocab: int = 2048,
    hidden: int = 1024,
    block: int = 128,
    bos: int = 0,
    eos: int = 1,
    pad: int = 2,
) -> dict[str, Any]:
    """The ``config.json`` of the tiny model: DeepseekV2 MLA with the test model's attention shape.

    Args:
        layers: decoder layers (>= 2: layer 0 dense, the rest MoE).
        vocab: vocabulary size.
        hidden: hidden size.
        block: FP8 weight block size (``weight_block_size`` [block, block]); 0 for per-tensor FP8.
        bos, eos, pad: special token ids.
    """
    quant: dict[str, Any] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "ignored_layers": ["lm_head"],
    }
    if block:
        quant["weight_block_size"] = [block, block]
    return {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": 2048,
        "kv_lora_rank": 512,
        "max_position_embeddings": 163840,
        "moe_intermediate_size": 256,
        "moe_layer_freq": 1,
        "n_group": 1,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "norm_topk_prob": False,
        "num_attention_heads": 16,
        "num_experts_per_tok": 2,
        "num_hidden_layers": layers,
        "num_key_value_heads": 16,
        "pretraining_tp": 1,
        "q_lora_rank": None,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "rope_theta": 10000,
        "routed_scaling_factor": 1.0,
        "scoring_func": "softmax",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "greedy",
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "v_head_dim": 128,
        "vocab_size": vocab,
        "quantization_config": quant,
    }


def write_tiny_mla(out: Path | str, *, layers: int = 2, vocab: int = 2048, block: int = 128) -> Path:
    """Write the tiny model folder (``config.json``, ``generation_config.json``, ``tokenizer.json``,
    ``tokenizer_config.json``, ``special_tokens_map.json``) into ``out`` and return its path.

    Takes about a second (a byte-level BPE tokenizer is trained on a small synthetic corpus).

    Raises:
        TinyModelError: the ``tokenizers`` package is missing (the message says how to install it).
        OSError: ``out`` cannot be written.
    """
    try:
        from tokenizers import (  # type: ignore[import-not-found,unused-ignore]
            Tokenizer,
            decoders,
            models,
            pre_tokenizers,
            processors,
            trainers,
        )
    except ImportError:
        raise TinyModelError(
            "writing the smoke-test model needs the 'tokenizers' package: pip install 'mlaprop[smoke]' "
            "(or pip install tokenizers)"
        ) from None
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=1,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.save(str(path / "tokenizer.json"))
    ids = [tok.token_to_id(t) for t in (BOS, EOS, PAD)]
    if any(i is None for i in ids):  # pragma: no cover - special tokens are always added by the trainer
        raise TinyModelError(f"tokenizer training lost a special token: {ids}")
    bos, eos, pad = (int(i) for i in ids if i is not None)
    config = model_config(layers=layers, vocab=vocab, block=block, bos=bos, eos=eos, pad=pad)
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    files: dict[str, Any] = {
        "config.json": config,
        "generation_config.json": {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False},
        "special_tokens_map.json": special,
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 16384,
            "chat_template": CHAT_TEMPLATE,
            **special,
        },
    }
    for name, data in files.items():
        (path / name).write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    return path
