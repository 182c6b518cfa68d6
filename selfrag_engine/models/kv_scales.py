"""The static scales of an FP8 KV cache: one per layer and kv head, for keys and for values, from the weights.

A scale must be fixed before the first write, or a block's bytes would depend on which branch (or which
earlier request of the prefix cache) wrote it first. A rule from the weights alone needs no calibration data
and bounds every value the model can produce, so nothing is ever clipped:

    v_i = sum_j W_v[i, j] * g_j * x_j / rms(x),  and  ||x / rms(x)||_2 <= sqrt(hidden)
    =>  |v_i| <= sqrt(hidden) * ||W_v[i, :] * g||_2             (Cauchy-Schwarz; g: the input RMSNorm's weight)

Keys are rotated after the projection: rotary turns the pair (i, i + D/2) by an angle, so |k_i| after it is at
most the norm of the pair's bounds. A head's bound is the largest of its dimensions' bounds, times 1 + 2^-4 for
the rounding of FP8 activations (W8A8 prefill) and of half precision. The scale is the smallest power of two
with bound / scale <= 448 (e4m3's largest value): a power of two keeps quantization a single rounding.

The bound is loose (it assumes a hidden state aligned with a weight row): real values sit some way below it
(bench/kv_fp8.py measures how far). e4m3 keeps 3 mantissa bits over 2^15 of range, so headroom costs precision
only for values 2^9 times smaller than the largest the scale allows, which add little to a dot product.
"""
from __future__ import annotations

import math

import torch

from selfrag_engine.layers.attention import FP8_KV_MAX
from selfrag_engine.layers.fp8_linear import Fp8Linear, dequantize_fp8

# Rounding of FP8 activations (half an e4m3 ulp: 2^-4 relative) and of half-precision sums.
_MARGIN = 1.0 + 2.0 ** -4


def kv_bounds(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, float32 [kv_heads] bounds on |k| (after rotary) and |v| over every input the model can see."""
    config = model.config
    heads, dim = config.num_key_value_heads, config.head_dim
    bounds = []
    for layer in model.model.layers:
        attn = layer.self_attn
        proj = attn.qkv_proj
        w = dequantize_fp8(proj.weight, proj.weight_scale) if isinstance(proj, Fp8Linear) else proj.weight.float()
        q_rows, kv_rows, _ = attn.qkv_sizes
        g = layer.input_layernorm.weight.float()
        rows = (w[q_rows:] * g).norm(dim=1) * math.sqrt(config.hidden_size)
        k_rows, v_rows = rows[:kv_rows].view(heads, dim), rows[kv_rows:].view(heads, dim)
        half = dim // 2
        k_pairs = torch.hypot(k_rows[:, :half], k_rows[:, half:])
        bounds.append((k_pairs.amax(-1) * _MARGIN, v_rows.amax(-1) * _MARGIN))
    return bounds


def scale_for_bound(bound: torch.Tensor) -> torch.Tensor:
    """The smallest power of two s with bound / s <= 448, float32 (a zero bound gets 2^-20: any scale works)."""
    exponent = torch.ceil(torch.log2(bound.double().clamp(min=2.0 ** -20) / FP8_KV_MAX))
    return torch.exp2(exponent).float()


def fp8_kv_scales(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (k_scale, v_scale) float32 [kv_heads] on the model's device."""
    return [(scale_for_bound(k), scale_for_bound(v)) for k, v in kv_bounds(model)]
