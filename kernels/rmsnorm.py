"""RMSNorm, optionally fused with the residual add, one row per program.

Shapes and dtypes
  x         [T, H]  fp16 / bf16 / fp32 (rows may be strided, the last dim must be contiguous)
  weight    [H]     any float dtype
  residual  [T, H]  same dtype as x, optional
  returns   out [T, H] in x's dtype, or (out, x + residual) when a residual is given

As Hugging Face Llama: the sum x + residual is rounded to x's dtype, the variance and the normalization run
in float32, the normalized row is cast back to x's dtype and only then multiplied by the weight.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rms_norm"]


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr,
                     sx, sr, so, sro, hidden, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < hidden
    x = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * sr + cols, mask=mask, other=0.0)
        # Rounded to the input dtype before the variance, because that rounded sum is what the next layer adds to.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * sro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / hidden
    normed = (xf * tl.math.rsqrt(var + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * so + cols, (normed.to(tl.float32) * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """rmsnorm(x) * weight, or (rmsnorm(x + residual) * weight, x + residual) when a residual is given."""
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    num_rows, hidden = x.shape
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be [{hidden}], got {tuple(weight.shape)}")
    if not x.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"x and weight must be floating point, got {x.dtype} and {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")
    if x.stride(1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise ValueError(f"residual dtype {residual.dtype} differs from x dtype {x.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device}, x on {x.device}")
        if residual.stride(1) != 1:
            residual = residual.contiguous()
    out = torch.empty((num_rows, hidden), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    if num_rows > 0:
        block_h = triton.next_power_of_2(hidden)
        num_warps = min(16, max(1, block_h // 512))
        _rms_norm_kernel[(num_rows,)](
            x, residual if residual is not None else x, weight, out, res_out,
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), res_out.stride(0),
            hidden, float(eps),
            HAS_RESIDUAL=residual is not None, BLOCK_H=block_h, num_warps=num_warps,
        )
    return out if residual is None else (out, res_out)
