"""Block FP8 (DeepSeek-V3 style) weight quantization, shared by the canary and the random-weight smoke model.

A weight ``W`` of shape ``[N, K]`` (out, in) is cut into ``block x block`` tiles (the last row/column of tiles
may be partial). Each tile gets one float32 scale ``s = amax(|tile|) / 448`` (448 is the largest finite
``float8_e4m3fn``), and is stored as ``round_e4m3(tile / s)``. The checkpoint tensor ``weight_scale_inv``
(``[ceil(N / block), ceil(K / block)]``, float32) holds ``s`` itself: the loader multiplies by it. This is how
SGLang's ``Fp8LinearMethod`` reads a checkpoint whose ``quantization_config`` has ``weight_block_size``
(``python/sglang/srt/layers/quantization/fp8.py``, ``block_quant_dequant`` in ``fp8_utils.py``).

Round-trip error: e4m3 keeps 3 mantissa bits, so an element in the normal range comes back within a
relative error of 2**-4 (6.25 %) of itself; elements below ``2**-6 * s`` (e4m3's smallest normal) lose at most
``2**-10 * s`` absolutely. Hence for every element ``|dq(q(W)) - W| <= 2**-4 * |W| + 2**-10 * s_tile``.

Activations are quantized as SGLang's block-FP8 GEMM does it: per token, per group of ``block`` input
channels, ``s = amax / 448`` (``per_token_group_quant_fp8``).

Importing this module imports torch.
"""

from __future__ import annotations

import torch  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "E4M3_MAX",
    "E5M2",
    "dequantize_block_fp8",
    "fake_quant_act",
    "fake_quant_e5m2",
    "fake_quant_weight",
    "quantize_block_fp8",
    "round_trip_bound",
]

#: Largest finite float8_e4m3fn value.
E4M3_MAX = 448.0
#: Relative rounding bound of e4m3 in its normal range (3 mantissa bits: half an ulp is 2**-4).
E4M3_REL = 2.0**-4
#: Absolute bound below e4m3's smallest normal (2**-6), in units of the scale: half the subnormal step 2**-9.
E4M3_ABS = 2.0**-10
E5M2 = torch.float8_e5m2


def _tiles(w: torch.Tensor, block: int) -> tuple[torch.Tensor, int, int]:
    """``w`` ([N, K]) zero-padded to whole tiles, viewed as [N/b, b, K/b, b]."""
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    padded = torch.zeros(nb * block, kb * block, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()
    return padded.view(nb, block, kb, block), n, k


def quantize_block_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight to e4m3 with one scale per ``block x block`` tile.

    Args:
        w: [N, K] float tensor (any float dtype, any device).
        block: tile edge (SGLang's ``weight_block_size``).

    Returns:
        ``(q, scale)``: ``q`` [N, K] ``torch.float8_e4m3fn``; ``scale`` [ceil(N/block), ceil(K/block)]
        float32, the checkpoint's ``weight_scale_inv`` (dequantize by multiplying). An all-zero tile gets
        scale 1.

    Raises:
        ValueError: ``w`` is not 2-D or ``block`` < 1.
    """
    if w.dim() != 2 or block < 1:
        raise ValueError(f"quantize_block_fp8 needs a 2-D weight and block >= 1, got shape {tuple(w.shape)}")
    tiles, n, k = _tiles(w, block)
    amax = tiles.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (tiles / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(tiles.shape[0] * block, tiles.shape[2] * block)[:n, :k].contiguous(), scale.contiguous()


def dequantize_block_fp8(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Inverse of :func:`quantize_block_fp8`: [N, K] float32 ``q * scale`` tile by tile.

    Raises:
        ValueError: ``scale``'s shape is not [ceil(N/block), ceil(K/block)].
    """
    n, k = q.shape
    nb, kb = -(-n // block), -(-k // block)
    if tuple(scale.shape) != (nb, kb):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not fit weight {(n, k)} with block {block}")
    full = scale.float().repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    return q.float() * full


def round_trip_bound(w: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The per-element bound of the module docstring, ``2**-4 |w| + 2**-10 s_tile``, [N, K] float32."""
    _, scale = quantize_block_fp8(w, block)
    n, k = w.shape
    full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    return E4M3_REL * w.float().abs() + E4M3_ABS * full


def fake_quant_weight(w: torch.Tensor, block: int = 128) -> torch.Tensor:
    """``dequantize(quantize(w))`` in ``w``'s dtype with a straight-through gradient (quantization-aware
    training: the forward sees exactly the weights that will be saved)."""
    q, s = quantize_block_fp8(w.detach(), block)
    dq = dequantize_block_fp8(q, s, block).to(w.dtype)
    return w + (dq - w).detach()


def fake_quant_act(x: torch.Tensor, group: int = 128) -> torch.Tensor:
    """Per-token, per-``group``-channel dynamic e4m3 quantization of ``x`` ([..., K], K a multiple of
    ``group``), dequantized, straight-through gradient: SGLang's ``per_token_group_quant_fp8`` numerics.

    Raises:
        ValueError: the last dimension is not a multiple of ``group``.
    """
    k = x.shape[-1]
    if k % group:
        raise ValueError(f"activation width {k} is not a multiple of the group size {group}")
    g = x.detach().float().reshape(*x.shape[:-1], k // group, group)
    s = (g.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp(min=1e-10)
    dq = ((g / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * s).reshape(x.shape)
    return x + (dq.to(x.dtype) - x).detach()


def fake_quant_e5m2(x: torch.Tensor) -> torch.Tensor:
    """``x`` stored in an ``fp8_e5m2`` KV cache (scale 1, as SGLang stores it without ``k_scale``) and read
    back; straight-through gradient."""
    dq = x.detach().to(E5M2).to(x.dtype)
    return x + (dq - x).detach()
