"""The FP8 KV cache in the kernels: float32 -> e4m3fn encoding with integer ops (the KV store writes it), and
the pool and scale checks every attention wrapper shares.

A pool of float8 e4m3fn holds x / scale[kv head]; the attention kernels load it natively (fp8 -> q's dtype is
exact) and fold the scales into their math: k's into the q.k scale, v's into the output, so no pass and no
per-element multiply is added.

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

__all__ = ["FP8_KV", "e4m3_bits", "kv_pool_args", "quantize_e4m3"]

FP8_KV = torch.float8_e4m3fn


def kv_pool_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
                 v_scale: torch.Tensor | None) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """Checks a pool against q: q's dtype, or float8 e4m3fn with float32 scales [kv_heads] on q's device.
    Returns (fp8, k_scale, v_scale), the scales replaced by k_cache itself (never read) when not fp8."""
    fp8 = k_cache.dtype == FP8_KV
    if not (k_cache.dtype in (q.dtype, FP8_KV) and v_cache.dtype == k_cache.dtype):
        raise ValueError(f"pool dtype {k_cache.dtype}/{v_cache.dtype} differs from q dtype {q.dtype} (and is not "
                         f"float8_e4m3fn)")
    if not fp8:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"k_scale and v_scale are for float8 pools, the pool is {k_cache.dtype}")
        return False, k_cache, k_cache
    heads = k_cache.shape[2]
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is None or s.shape != (heads,) or s.dtype != torch.float32 or s.device != q.device:
            raise ValueError(f"a float8 pool needs {name} float32 [{heads}] on {q.device}, got "
                             f"{None if s is None else (tuple(s.shape), s.dtype, s.device)}")
    return True, k_scale, v_scale


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
