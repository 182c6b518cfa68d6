"""SwiGLU activation of the fused gate/up projection: silu(gate) * up.

Shapes and dtypes
  x        [T, 2*I]  fp16 / bf16 / fp32; columns [0, I) are the gate, [I, 2I) the up projection
           (rows may be strided, the last dim must be contiguous)
  returns  [T, I] in x's dtype, computed in float32 and rounded once
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["silu_and_mul"]


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, sx, so, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * sx + inter + cols, mask=mask, other=0.0).to(tl.float32)
    # sigmoid from exp(-|gate|), which never overflows: very negative gates give a clean -0, not -x / inf.
    e = tl.exp(-tl.abs(gate))
    sig = tl.where(gate >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    y = gate * sig * up
    tl.store(out_ptr + row * so + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :I]) * x[:, I:] for x [T, 2*I]; returns [T, I] in x's dtype."""
    if x.dim() != 2:
        raise ValueError(f"x must be [T, 2*I], got shape {tuple(x.shape)}")
    if x.shape[1] % 2 != 0:
        raise ValueError(f"the last dim of x must be even (gate then up), got {x.shape[1]}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if x.stride(1) != 1:
        x = x.contiguous()
    num_rows, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_rows, inter), dtype=x.dtype, device=x.device)
    if num_rows > 0 and inter > 0:
        block = min(1024, triton.next_power_of_2(inter))
        grid = (num_rows, triton.cdiv(inter, block))
        _silu_and_mul_kernel[grid](x, out, x.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4)
    return out
