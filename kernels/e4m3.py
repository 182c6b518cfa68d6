"""float32 -> float8 e4m3fn encoding with integer ops, for kernels that store FP8 (the KV store).

A cast (`x.to(tl.float8e4nv)`) would do on a GPU, but Triton's interpreter rounds it wrongly and does not
saturate, so the tests could not check it; these integer ops give the same bytes as torch's cast (round to
nearest even, saturated at +-448, subnormals down to 2^-9) on both, and cost a few ALU ops per element of a
store that is bound by memory.

Shapes and dtypes
  quantize_e4m3(x, scale): x float32 / float16 / bfloat16 [N], scale float (a power of two keeps the division
  exact) -> torch.float8_e4m3fn [N] holding x / scale
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["e4m3_bits", "quantize_e4m3"]


@triton.jit
def e4m3_bits(x):
    """float32 x -> the e4m3fn bit pattern of x (int32 in 0..255): round to nearest even, saturated at +-448."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    sign = (x.to(tl.int32, bitcast=True) >> 24) & 0x80
    a = tl.abs(x)
    bits = a.to(tl.int32, bitcast=True)
    # Normal (|x| >= 2^-6): keep 3 of float32's 23 mantissa bits, rounding half to even, then rebias the
    # exponent from 127 to 7 (a carry out of the mantissa lands in the exponent, as it should).
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - (120 << 3)
    # Subnormal: a multiple of 2^-9; adding and removing 2^23 rounds a * 2^9 to an integer, half to even.
    sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
    return sign | tl.where(a < 0.015625, sub, normal)


@triton.jit
def _quantize_kernel(x_ptr, out_ptr, n, inv_scale, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    x = tl.load(x_ptr + i, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, e4m3_bits(x * inv_scale).to(tl.uint8), mask=ok)


def quantize_e4m3(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """x / scale as float8 e4m3fn, encoded by `e4m3_bits` (x contiguous, 1-D)."""
    if x.dim() != 1 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous 1-D tensor, got shape {tuple(x.shape)}")
    out = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    if x.numel():
        block = 1024
        _quantize_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), 1.0 / scale, BLOCK=block)
    return out.view(torch.float8_e4m3fn)
