"""A plain-torch DeepseekV2 (MLA + MoE) forward, the math SGLang's ``DeepseekV2ForCausalLM`` serves.

Per layer: ``x + MLA(RMSNorm(x))``, then ``+ MLP(RMSNorm(.))`` (SwiGLU; MoE after the first
``first_k_dense_replace`` layers: softmax router, greedy top-k, no renormalisation unless
``norm_topk_prob``, times ``routed_scaling_factor``, plus the shared experts). MLA without ``q_lora_rank``:
``q = q_proj(x)`` split into a no-rope part (``qk_nope_head_dim``) and a rope part (``qk_rope_head_dim``);
``kv_a_proj_with_mqa(x)`` gives the latent (``kv_lora_rank``, RMS-normed by ``kv_a_layernorm``) and one
shared rope key; ``kv_b_proj(latent)`` gives per-head no-rope keys and values. Rope is DeepSeek's yarn
(``DeepseekScalingRotaryEmbedding``, interleaved pairs, ``is_neox_style=False``); the softmax scale is
``qk_head_dim**-0.5 * yarn_mscale(factor, mscale_all_dim)**2`` (SGLang ``DeepseekV2AttentionMLA``).

:class:`Numerics` switches on the serving numerics (FP8 weights, per-token-group FP8 activations, an
``fp8_e5m2`` latent KV cache) so training sees what the server computes. Importing this module imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch  # type: ignore[import-not-found,unused-ignore]
import torch.nn.functional as F  # type: ignore[import-not-found,unused-ignore]
from torch import nn  # type: ignore[import-not-found,unused-ignore]

from mlaprop.canary.checkpoint import block_size, fp8_linears, param_shapes
from mlaprop.canary.fp8 import fake_quant_act, fake_quant_e5m2, fake_quant_weight

__all__ = ["CanaryLM", "Numerics", "rope_cos_sin", "softmax_scale"]


@dataclass(frozen=True)
class Numerics:
    """Which serving numerics the forward simulates.

    Attributes:
        fp8_weights: FP8 linears see ``dequantize(quantize(w))`` (straight-through); other weights bf16.
        fp8_activations: inputs of FP8 linears are quantized per token and 128-channel group.
        kv_e5m2: the latent and the rope key pass through e5m2 (an ``fp8_e5m2`` KV cache): ``True`` for
            every sequence, a per-sequence mask [B] (bool), or ``False``/``None`` for none.
    """

    fp8_weights: bool = False
    fp8_activations: bool = False
    kv_e5m2: torch.Tensor | bool | None = None


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(config: Mapping[str, Any]) -> float:
    """The attention softmax scale SGLang uses (``DeepseekV2AttentionMLA.__init__``)."""
    scale = (int(config["qk_nope_head_dim"]) + int(config["qk_rope_head_dim"])) ** -0.5
    rs = config.get("rope_scaling") or {}
    if rs and rs.get("mscale_all_dim"):
        m = _yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
        scale *= m * m
    return scale


def rope_cos_sin(config: Mapping[str, Any], positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, rope_dim/2] (float32) of DeepSeek's yarn rope (SGLang ``DeepseekScalingRotaryEmbedding``;
    plain rope when ``rope_scaling`` is absent)."""
    dim = int(config["qk_rope_head_dim"])
    base = float(config.get("rope_theta", 10000))
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)
    inv_freq = 1.0 / pos_freqs
    mscale = 1.0
    rs = config.get("rope_scaling") or {}
    if rs:
        factor = float(rs["factor"])
        fast, slow = float(rs.get("beta_fast", 32)), float(rs.get("beta_slow", 1))
        orig = float(rs["original_max_position_embeddings"])

        def corr(rot: float) -> float:
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

        low = float(max(math.floor(corr(fast)), 0))
        high = float(min(math.ceil(corr(slow)), dim - 1))
        if low == high:
            high += 0.001
        ramp = (
            (torch.arange(dim // 2, dtype=torch.float32, device=positions.device) - low) / (high - low)
        ).clamp(0, 1)
        mask = 1 - ramp  # extrapolation_factor 1
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - mask) + inv_freq * mask
        mscale = _yarn_mscale(factor, float(rs.get("mscale", 1))) / _yarn_mscale(
            factor, float(rs.get("mscale_all_dim", 0) or 0)
        )
        mscale *= float(rs.get("attn_factor", 1))
    freqs = torch.outer(positions.float(), inv_freq)
    return freqs.cos() * mscale, freqs.sin() * mscale


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-J (interleaved) rotation of ``x`` [..., T, (H,) D] by cos/sin [T, D/2] (``is_neox_style=False``)."""
    x1, x2 = x[..., ::2].float(), x[..., 1::2].float()
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    return torch.stack((o1, o2), dim=-1).flatten(-2).to(x.dtype)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


class CanaryLM(nn.Module):
    """DeepseekV2ForCausalLM in plain torch; parameter names are the checkpoint's (see
    :func:`mlaprop.canary.checkpoint.param_shapes`), float32 masters.

    Args:
        config: the model's ``config.json`` as a dict.
        weights: initial values (name -> tensor); ``None``: random init (std ``initializer_range``, norms 1).
        seed: random init seed.
    """

    def __init__(
        self, config: Mapping[str, Any], weights: Mapping[str, torch.Tensor] | None = None, seed: int = 0
    ) -> None:
        super().__init__()
        self.config = dict(config)
        self.shapes = param_shapes(config)
        self.fp8 = frozenset(fp8_linears(config))
        self.block = block_size(config)
        self.keys = list(self.shapes)
        gen = torch.Generator().manual_seed(seed)
        std = float(config.get("initializer_range", 0.02))
        self.params = nn.ParameterList()
        for name, shape in self.shapes.items():
            if weights is not None:
                t = weights[name].detach().float().clone()
            elif len(shape) == 1:
                t = torch.ones(shape)
            else:
                t = torch.randn(shape, generator=gen) * std
            self.params.append(nn.Parameter(t))
        self.index = {n: i for i, n in enumerate(self.keys)}

    def named_weights(self) -> dict[str, torch.Tensor]:
        """name -> parameter (the checkpoint's names)."""
        return {n: self.params[i] for n, i in self.index.items()}

    def _w(self, name: str, num: Numerics) -> torch.Tensor:
        w = self.params[self.index[name]]
        if not num.fp8_weights:
            return w
        if name in self.fp8:
            return fake_quant_weight(w, self.block)
        return w + (w.detach().to(torch.bfloat16).float() - w.detach())

    def _lin(self, x: torch.Tensor, name: str, num: Numerics) -> torch.Tensor:
        if num.fp8_activations and name in self.fp8:
            x = fake_quant_act(x, self.block)
        return x @ self._w(name, num).to(x.dtype).t()

    def _mlp(self, x: torch.Tensor, prefix: str, num: Numerics) -> torch.Tensor:
        g = self._lin(x, prefix + "gate_proj.weight", num)
        u = self._lin(x, prefix + "up_proj.weight", num)
        return self._lin(F.silu(g.float()).to(x.dtype) * u, prefix + "down_proj.weight", num)

    def _moe(self, x: torch.Tensor, prefix: str, num: Numerics) -> torch.Tensor:
        c = self.config
        logits = x.float() @ self._w(prefix + "gate.weight", num).to(x.dtype).float().t()
        probs = logits.softmax(-1)
        top_w, top_i = probs.topk(int(c["num_experts_per_tok"]), dim=-1)
        if c.get("norm_topk_prob"):
            top_w = top_w / top_w.sum(-1, keepdim=True)
        dense = torch.zeros_like(probs).scatter(-1, top_i, top_w)  # [..., E]
        out = torch.zeros_like(x, dtype=torch.float32)
        for e in range(int(c["n_routed_experts"])):
            w = dense[..., e : e + 1]
            if bool((w > 0).any()):
                out = out + w * self._mlp(x, f"{prefix}experts.{e}.", num).float()
        out = out * float(c.get("routed_scaling_factor", 1.0))
        if int(c.get("n_shared_experts") or 0):
            out = out + self._mlp(x, prefix + "shared_experts.", num).float()
        return out.to(x.dtype)

    def _attn(
        self, x: torch.Tensor, p: str, num: Numerics, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        c = self.config
        b, t, _ = x.shape
        heads, nope = int(c["num_attention_heads"]), int(c["qk_nope_head_dim"])
        rope, vdim, rank = int(c["qk_rope_head_dim"]), int(c["v_head_dim"]), int(c["kv_lora_rank"])
        eps = float(c["rms_norm_eps"])
        q = self._lin(x, p + "q_proj.weight", num).view(b, t, heads, nope + rope)
        q_nope, q_pe = q[..., :nope], q[..., nope:]
        latent = self._lin(x, p + "kv_a_proj_with_mqa.weight", num)
        ckv = _rms(latent[..., :rank], self._w(p + "kv_a_layernorm.weight", num), eps)
        k_pe = _rotate(latent[..., rank:], cos, sin)  # [B, T, rope], one key shared by all heads
        q_pe = _rotate(q_pe, cos[:, None, :], sin[:, None, :])
        if num.kv_e5m2 is True:
            ckv, k_pe = fake_quant_e5m2(ckv), fake_quant_e5m2(k_pe)
        elif isinstance(num.kv_e5m2, torch.Tensor):
            m = num.kv_e5m2.view(b, 1, 1)
            ckv = torch.where(m, fake_quant_e5m2(ckv), ckv)
            k_pe = torch.where(m, fake_quant_e5m2(k_pe), k_pe)
        kv = self._lin(ckv, p + "kv_b_proj.weight", num).view(b, t, heads, nope + vdim)
        k_nope, v = kv[..., :nope], kv[..., nope:]
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(b, t, heads, rope)], dim=-1)
        qh = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            qh, k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=softmax_scale(c)
        )
        return self._lin(o.transpose(1, 2).reshape(b, t, heads * vdim), p + "o_proj.weight", num)

    def forward(
        self, ids: torch.Tensor, num: Numerics | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Logits [B, T, vocab] (float32) for token ids [B, T] at positions 0..T-1 (causal; right padding is
        harmless), computing in ``dtype`` (bf16 as the server does, or float32 for a reference)."""
        num = num or Numerics()
        c = self.config
        eps = float(c["rms_norm_eps"])
        x = F.embedding(ids, self._w("model.embed_tokens.weight", num)).to(dtype)
        cos, sin = rope_cos_sin(c, torch.arange(ids.shape[1], device=ids.device))
        for i in range(int(c["num_hidden_layers"])):
            p = f"model.layers.{i}."
            x = x + self._attn(
                _rms(x, self._w(p + "input_layernorm.weight", num), eps), p + "self_attn.", num, cos, sin
            )
            h = _rms(x, self._w(p + "post_attention_layernorm.weight", num), eps)
            if i < int(c["first_k_dense_replace"]):
                x = x + self._mlp(h, p + "mlp.", num)
            else:
                x = x + self._moe(h, p + "mlp.", num)
        x = _rms(x, self._w("model.norm.weight", num), eps)
        return (x @ self._w("lm_head.weight", num).to(x.dtype).t()).float()
