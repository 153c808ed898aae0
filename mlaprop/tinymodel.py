"""A tiny MLA FP8 model folder for smoke runs.

The shape is the test model's (``neuralmagic/DeepSeek-Coder-V2-Lite-Instruct-FP8``, DeepseekV2ForCausalLM)
with the real MLA dimensions (16 heads, 16 KV heads, kv_lora_rank 512, qk_nope 128, qk_rope 64, v_head 128,
yarn rope) shrunk elsewhere: 2 layers (layer 0 dense, layer 1 MoE with 8 routed experts, top-2, 1 shared),
hidden 1024, vocab 2048. Weights are block FP8 (``weight_block_size`` [128, 128], DeepSeek-V3 style):
per-tensor FP8 does not load in SGLang 0.5.11 for this architecture (kv_b_proj scale shape mismatch in
``DeepseekV2 post_load_weights``).

Weights (:class:`SmokeWeights`):

- ``dummy``: no weight files; serve with ``--load-format dummy``. The dummy loader fills uniform(-1e-3, 1e-3),
  which casts to exactly 0 in e4m3 for about 98 % of the FP8 weights: every FP8 layer then adds nothing, the
  logprobs are a uniform distribution's, and no kernel can make an output batch-dependent.
- ``random``: real-scale random weights in ``model.safetensors`` (linears N(0, 1/fan_in) quantized to e4m3
  with 128x128 block scales amax/448 in ``weight_scale_inv``; router gate, embeddings and ``lm_head`` bf16,
  ``lm_head`` in ``ignored_layers``), served with SGLang's real weight loading. On the H200 (SGLang 0.5.11)
  this model's greedy outputs change with the batch without ``--enable-deterministic-inference`` and are
  bit-identical with it, so the determinism check can tell. Every FP8 GEMM keeps K <= 3 N (see
  :data:`mlaprop.canary.checkpoint.MAX_K_OVER_N`). Needs torch and safetensors.

Writing the tokenizer needs the ``tokenizers`` package (``pip install 'mlaprop[smoke]'``).
"""

from __future__ import annotations

import enum
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "BOS",
    "CHAT_TEMPLATE",
    "EOS",
    "PAD",
    "SmokeWeights",
    "TinyModelError",
    "model_config",
    "render_chat",
    "train_tokenizer",
    "write_model_folder",
    "write_tiny_mla",
]

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


class SmokeWeights(str, enum.Enum):
    """What the smoke model's weights are (see the module docstring)."""

    DUMMY = "dummy"
    RANDOM = "random"

    def __str__(self) -> str:
        return str(self.value)


def render_chat(user: str) -> str:
    """What :data:`CHAT_TEMPLATE` renders for one user message with ``add_generation_prompt=True``."""
    return f"{BOS}User: {user}\n\nAssistant:"


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


def train_tokenizer(corpus: Iterable[str], vocab: int) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``corpus`` with up to ``vocab`` entries; the
    special tokens :data:`BOS`, :data:`EOS`, :data:`PAD` get ids 0, 1, 2. Deterministic for a given corpus.

    Raises:
        TinyModelError: the ``tokenizers`` package is missing (the message says how to install it).
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
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def write_model_folder(path: Path, tok: Any, config: dict[str, Any]) -> None:
    """Write ``config.json``, ``generation_config.json``, the tokenizer files and the chat template.

    Raises:
        OSError: ``path`` cannot be written.
    """
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    files: dict[str, Any] = {
        "config.json": config,
        "generation_config.json": {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
            "do_sample": False,
        },
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


def _special_ids(tok: Any) -> tuple[int, int, int]:
    ids = [tok.token_to_id(t) for t in (BOS, EOS, PAD)]
    if any(i is None for i in ids):  # pragma: no cover - special tokens are always added by the trainer
        raise TinyModelError(f"tokenizer training lost a special token: {ids}")
    bos, eos, pad = (int(i) for i in ids)
    return bos, eos, pad


def write_tiny_mla(
    out: Path | str,
    *,
    layers: int = 2,
    vocab: int = 2048,
    block: int = 128,
    weights: SmokeWeights | str = SmokeWeights.DUMMY,
    seed: int = 0,
) -> Path:
    """Write the tiny model folder (``config.json``, ``generation_config.json``, ``tokenizer.json``,
    ``tokenizer_config.json``, ``special_tokens_map.json``; with ``weights="random"`` also
    ``model.safetensors``, about 40 MB) into ``out`` and return its path.

    ``weights="dummy"`` (the default) writes no weights: serve with ``--load-format dummy``. ``"random"``
    writes real-scale random block-FP8 weights from ``seed``: serve with the default (real) load format.
    Takes about a second (plus a few seconds for random weights).

    Raises:
        TinyModelError: the ``tokenizers`` package is missing, or torch/safetensors for random weights
            (the message says how to install them).
        ValueError: unknown ``weights``; random weights without block quantization (``block`` 0).
        OSError: ``out`` cannot be written.
    """
    kind = SmokeWeights(weights)
    if kind is SmokeWeights.RANDOM and not block:
        raise ValueError("random smoke weights are block FP8: pass block=128 (per-tensor FP8 does not load)")
    path = Path(out)
    tok = train_tokenizer(_corpus(), vocab)
    bos, eos, pad = _special_ids(tok)
    config = model_config(layers=layers, vocab=vocab, block=block, bos=bos, eos=eos, pad=pad)
    write_model_folder(path, tok, config)
    if kind is SmokeWeights.RANDOM:
        try:
            from mlaprop.canary.checkpoint import random_weights, save_checkpoint
        except ImportError:
            raise TinyModelError(
                "random smoke weights need torch and safetensors: pip install 'mlaprop[canary]'"
            ) from None
        save_checkpoint(path, random_weights(config, seed), config)
    return path
