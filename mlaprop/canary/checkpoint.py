"""The DeepseekV2 checkpoint layout SGLang loads: tensor names and shapes from a ``config.json``, which of
them are block FP8, and writing/reading ``model.safetensors``.

Names follow ``DeepseekV2ForCausalLM.load_weights`` (SGLang ``python/sglang/srt/models/deepseek_v2.py``) for
a model without ``q_lora_rank``: ``self_attn.{q_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj,
o_proj}``, dense ``mlp.{gate,up,down}_proj`` for the first ``first_k_dense_replace`` layers, then
``mlp.gate`` (router, bf16: SGLang builds it without a quantization config), ``mlp.experts.E.*`` and
``mlp.shared_experts.*``. Every linear except the router and ``lm_head`` (in ``ignored_layers``) is block FP8
with a ``weight_scale_inv`` beside it; embeddings and norms are bf16.

Importing this module imports torch; writing and reading need ``safetensors``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch  # type: ignore[import-not-found,unused-ignore]

from mlaprop.canary.fp8 import dequantize_block_fp8, quantize_block_fp8

__all__ = [
    "CheckpointError",
    "block_size",
    "fp8_linears",
    "load_checkpoint",
    "param_shapes",
    "random_weights",
    "save_checkpoint",
]

#: The FP8 GEMM of SGLang 0.5.11 on sm90 splits the reduction (and stops being batch-invariant, even with
#: ``--enable-deterministic-inference``) when K > 3 N; measured on the H200 with dense intermediate 10880.
#: SGLang merges gate_proj and up_proj into one GEMM of N = 2 x intermediate, so that is the N checked.
MAX_K_OVER_N = 3


class CheckpointError(ValueError):
    """A config or checkpoint that does not fit this layout (the message names the tensor and the fix)."""


def block_size(config: Mapping[str, Any]) -> int:
    """``quantization_config.weight_block_size`` (square blocks only).

    Raises:
        CheckpointError: no block quantization, or non-square blocks.
    """
    quant = config.get("quantization_config") or {}
    wbs = quant.get("weight_block_size")
    if not wbs or len(wbs) != 2 or wbs[0] != wbs[1]:
        raise CheckpointError(f"expected block FP8 with square weight_block_size, got {wbs!r}")
    return int(wbs[0])


def param_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint (scales excluded), name -> shape ([out, in] for linears).

    Raises:
        CheckpointError: the config asks for something this layout does not write (``q_lora_rank``).
    """
    if config.get("q_lora_rank"):
        raise CheckpointError("q_lora_rank is not supported: set it to null (the test model has none)")
    h = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    nope, rope = int(config["qk_nope_head_dim"]), int(config["qk_rope_head_dim"])
    vdim, rank = int(config["v_head_dim"]), int(config["kv_lora_rank"])
    vocab = int(config["vocab_size"])
    inter, moe_inter = int(config["intermediate_size"]), int(config["moe_intermediate_size"])
    experts, shared = int(config["n_routed_experts"]), int(config["n_shared_experts"])
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (heads * (nope + rope), h)
        shapes[p + "self_attn.kv_a_proj_with_mqa.weight"] = (rank + rope, h)
        shapes[p + "self_attn.kv_a_layernorm.weight"] = (rank,)
        shapes[p + "self_attn.kv_b_proj.weight"] = (heads * (nope + vdim), rank)
        shapes[p + "self_attn.o_proj.weight"] = (h, heads * vdim)
        mlps: list[tuple[str, int]]
        if i < int(config["first_k_dense_replace"]):
            mlps = [(p + "mlp.", inter)]
        else:
            shapes[p + "mlp.gate.weight"] = (experts, h)
            mlps = [(f"{p}mlp.experts.{e}.", moe_inter) for e in range(experts)]
            mlps.append((p + "mlp.shared_experts.", moe_inter * shared))
        for prefix, width in mlps:
            shapes[prefix + "gate_proj.weight"] = (width, h)
            shapes[prefix + "up_proj.weight"] = (width, h)
            shapes[prefix + "down_proj.weight"] = (h, width)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (vocab, h)
    return shapes


_NOT_FP8 = re.compile(r"(embed_tokens|layernorm|norm|mlp\.gate|lm_head)\.weight$")


def fp8_linears(config: Mapping[str, Any]) -> list[str]:
    """Names of the block-FP8 weights, in checkpoint order.

    Raises:
        CheckpointError: a non-expert FP8 GEMM has K > 3 N (see :data:`MAX_K_OVER_N`); the message names it.
    """
    shapes = param_shapes(config)
    names = [n for n in shapes if not _NOT_FP8.search(n)]
    for name in names:
        if ".experts." in name:  # routed experts run in the fused MoE kernel, not the FP8 GEMM
            continue
        n, k = shapes[name]
        if name.endswith(("gate_proj.weight", "up_proj.weight")):
            n *= 2  # merged gate_up_proj
        if k > MAX_K_OVER_N * n:
            raise CheckpointError(
                f"{name}: K={k} > {MAX_K_OVER_N} x N={n}: SGLang's FP8 GEMM splits this reduction and is not "
                "batch-invariant; use a larger hidden size or a smaller intermediate size"
            )
    return names


def random_weights(config: Mapping[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Real-scale random weights (float32, CPU): linears N(0, 1/fan_in), embeddings N(0, 1), norms 1.

    The scale matters: SGLang's dummy loader fills uniform(-1e-3, 1e-3), which casts to exactly 0 in e4m3 for
    about 98 % of FP8 weights, so no FP8 layer then contributes anything and nothing can be batch-dependent.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in param_shapes(config).items():
        if len(shape) == 1:
            out[name] = torch.ones(shape)
        elif name.endswith("embed_tokens.weight"):
            out[name] = torch.randn(shape, generator=gen)
        else:
            out[name] = torch.randn(shape, generator=gen) * shape[1] ** -0.5
    return out


def save_checkpoint(
    path: Path | str, weights: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, int]:
    """Write ``model.safetensors`` into folder ``path``: FP8 linears as e4m3 + ``weight_scale_inv``, the rest
    bf16. Returns ``{"bytes": size, "fp8_tensors": n, "tensors": total}``.

    Raises:
        CheckpointError: a tensor is missing or has the wrong shape.
        ImportError: ``safetensors`` is not installed.
    """
    from safetensors.torch import save_file  # type: ignore[import-not-found,unused-ignore]

    shapes = param_shapes(config)
    fp8 = set(fp8_linears(config))
    block = block_size(config)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name not in weights:
            raise CheckpointError(f"{name}: missing from the weights to save")
        w = weights[name].detach().float().cpu()
        if tuple(w.shape) != shape:
            raise CheckpointError(f"{name}: shape {tuple(w.shape)}, the config needs {shape}")
        if name in fp8:
            q, s = quantize_block_fp8(w, block)
            tensors[name] = q
            tensors[name[: -len("weight")] + "weight_scale_inv"] = s
        else:
            tensors[name] = w.to(torch.bfloat16).contiguous()
    file = Path(path) / "model.safetensors"
    save_file(tensors, str(file), metadata={"format": "pt"})
    return {"bytes": file.stat().st_size, "fp8_tensors": len(fp8), "tensors": len(tensors)}


def load_checkpoint(path: Path | str, config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Read ``model.safetensors`` from folder ``path`` and dequantize: name -> float32 tensor (CPU), the
    values SGLang computes with (e4m3 x block scale; bf16 widened).

    Raises:
        CheckpointError: a tensor is missing, has the wrong shape or dtype, or its scale is missing.
        ImportError: ``safetensors`` is not installed.
    """
    from safetensors.torch import load_file  # type: ignore[import-not-found,unused-ignore]

    raw = load_file(str(Path(path) / "model.safetensors"))
    fp8 = set(fp8_linears(config))
    block = block_size(config)
    out: dict[str, torch.Tensor] = {}
    for name, shape in param_shapes(config).items():
        t = raw.get(name)
        if t is None or tuple(t.shape) != shape:
            got = None if t is None else tuple(t.shape)
            raise CheckpointError(f"{name}: expected shape {shape} in the checkpoint, found {got}")
        if name in fp8:
            scale = raw.get(name[: -len("weight")] + "weight_scale_inv")
            if t.dtype != torch.float8_e4m3fn or scale is None:
                raise CheckpointError(
                    f"{name}: expected float8_e4m3fn with a weight_scale_inv, got {t.dtype}"
                )
            out[name] = dequantize_block_fp8(t, scale, block)
        else:
            out[name] = t.float()
    return out
