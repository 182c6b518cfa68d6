"""FP8 GEMV with an RMSNorm prologue: y = RMSNorm(x [+ residual]) @ (w_fp8 * scale[:, None]).T in one launch.

A decode step runs the norm right before the q|k|v and gate|up projections; fusing it saves one launch each.
RMSNorm's rsqrt factor is one number per row, so it commutes with the dot product: each program accumulates
sum(h^2) over its K loop next to the dot of (h * g) with its weight rows, and scales its fp32 accumulator by
rsqrt(mean(h^2) + eps) after the loop. No program needs the whole row's statistic before it starts.

Shapes and dtypes
  x         [M, K]  fp16 / bf16 / fp32, M <= GEMV_MAX_M, unit stride along K (the pre-norm hidden state)
  residual  [M, K]  x's dtype, optional: added to x first
  norm_w    [K]     any float dtype (the RMSNorm weight g)
  w_fp8     [N, K]  float8_e4m3fn; scale [N] float32
  returns   y [M, N] in x's dtype, or (y, h) with h = x + residual [M, K] in x's dtype when a residual is given

Rounding against Hugging Face's LlamaRMSNorm (and `kernels/rmsnorm.py`, which follows it): h = x + residual is
rounded to x's dtype as there, and its sum of squares is taken in float32 as there. HF then rounds the
normalized row to x's dtype and rounds its product with g again before the projection reads it; here the
operand of the dot is h * g, rounded to x's dtype once when it feeds `tl.dot` (M > 1) and not rounded at all
on the FMA path (M == 1), and the rsqrt factor multiplies the fp32 accumulator. So the fused result is at least
as close to an exact (float64) norm-then-project as the unfused pair, and the two differ by about one rounding
of the activation. One bound differs: on the fp16 dot path h * g itself must be below fp16's 65504 (HF's
operand is the normalized row times g, which is smaller), which Llama's residual stream and norm weights keep.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from selfrag_engine.kernels import Target, as_target, target_of
from selfrag_engine.kernels.fp8_linear import (
    GEMV_MAX_M,
    _check,
    _dot_precision,
    _e4m3_bits_to_f16,
    _gemv_launch,
    _prepare_weight,
    gemv_config,
)

__all__ = ["fp8_rms_norm_linear", "norm_gemv_config"]


@triton.jit
def _fp8_norm_gemv_kernel(x_ptr, r_ptr, g_ptr, w_ptr, s_ptr, y_ptr, h_ptr, M, N, K,
                          stride_xm, stride_rm, stride_hm, stride_wn, stride_ym, eps,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          USE_DOT: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                          HAS_RESIDUAL: tl.constexpr, W_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """y[M, N] = RMSNorm(x[M, K] (+ r[M, K])) * g[K] @ (w[N, K] * s[N, None]).T for small M (decode).

    x, r: fp16 / bf16 / fp32 [M, K], unit stride along K. g: any float [K]. w: float8_e4m3fn [N, K] row-major,
    or uint8 holding its bits when W_BITS. s: float32 [N]. y: x's dtype [M, N]. h: x's dtype [M, K], receives
    x + r when HAS_RESIDUAL; program 0 alone writes it, and h must not alias x or r (the other programs are
    still reading them). Grid: (cdiv(N, BLOCK_N),); each program reads its BLOCK_N rows of w once.

    USE_DOT=False (M == 1) and USE_DOT=True (M <= BLOCK_M) as in `_fp8_gemv_kernel`. The sum of squares is
    reduced per K block into a [BLOCK_M] vector: a [BLOCK_M, BLOCK_K] accumulator would hold BLOCK_K / 8 more
    fp32 registers per thread through the loop, which spills at BLOCK_K=256 on sm_90a.
    """
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    # Columns of h program 0 writes: all K of them; none for the others (a bound, not a bool scalar, which the
    # interpreter cannot combine with a block mask).
    h_cols = tl.where(pid_n == 0, K, 0)
    if USE_DOT:
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
        r_ptrs = r_ptr + offs_m[:, None] * stride_rm + offs_k[None, :]
        h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_k[None, :]
        w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            if EVEN_K:
                mask_x = mask_m[:, None] & (offs_k[None, :] < BLOCK_K)
                g = tl.load(g_ptr + k + offs_k).to(tl.float32)
                if EVEN_N:
                    w = tl.load(w_ptrs)
                else:
                    w = tl.load(w_ptrs, mask=mask_n[None, :], other=0.0)
            else:
                mask_k = (k + offs_k) < K
                mask_x = mask_m[:, None] & mask_k[None, :]
                g = tl.load(g_ptr + k + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=mask_x, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(r_ptrs, mask=mask_x, other=0.0)
                # Rounded to x's dtype, as the unfused norm: that rounded sum is what the next layer adds to.
                x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
                tl.store(h_ptrs, x, mask=mask_x & ((k + offs_k)[None, :] < h_cols))
            xf = x.to(tl.float32)
            sumsq += tl.sum(xf * xf, axis=1)
            if W_BITS:
                w = _e4m3_bits_to_f16(w)
            a = (xf * g[None, :]).to(x_ptr.dtype.element_ty)
            acc = tl.dot(a, w.to(a.dtype), acc, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K
            r_ptrs += BLOCK_K
            h_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        s = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
        if W_BITS:
            s = s * 256.0
        rstd = tl.math.rsqrt(sumsq / K + eps)
        acc = acc * rstd[:, None] * s[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    else:
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        # One lane per column: summed once after the loop, like acc2, so the loop has no shuffles.
        sumsq2 = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptr + k + offs_k)
                g = tl.load(g_ptr + k + offs_k).to(tl.float32)
                if HAS_RESIDUAL:
                    r = tl.load(r_ptr + k + offs_k)
                if EVEN_N:
                    w = tl.load(w_ptrs)
                else:
                    w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
            else:
                mask_k = (k + offs_k) < K
                x = tl.load(x_ptr + k + offs_k, mask=mask_k, other=0.0)
                g = tl.load(g_ptr + k + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                if HAS_RESIDUAL:
                    r = tl.load(r_ptr + k + offs_k, mask=mask_k, other=0.0)
                w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if HAS_RESIDUAL:
                x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
                tl.store(h_ptr + k + offs_k, x, mask=(k + offs_k) < h_cols)
            xf = x.to(tl.float32)
            sumsq2 += xf * xf
            if W_BITS:
                w = _e4m3_bits_to_f16(w)
            acc2 += w.to(tl.float32) * (xf * g)[None, :]
            w_ptrs += BLOCK_K
        s = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
        if W_BITS:
            s = s * 256.0
        rstd = tl.math.rsqrt(tl.sum(sumsq2, axis=0) / K + eps)
        out = tl.sum(acc2, axis=1) * rstd * s
        tl.store(y_ptr + offs_n, out.to(y_ptr.dtype.element_ty), mask=mask_n)


def norm_gemv_config(m: int, n: int, k: int, where: Target | torch.device | str) -> dict:
    """Launch parameters of the RMSNorm-prologue GEMV: those of the plain GEMV (`gemv_config`) for the same
    shapes, the prologue's loads riding along in the same loop."""
    return gemv_config(m, n, k, as_target(where))


def fp8_rms_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, w_fp8: torch.Tensor,
                        scale: torch.Tensor, residual: torch.Tensor | None = None, *, w_bits: bool | None = None,
                        gemv_cfg: dict | None = None):
    """RMSNorm(x [+ residual]) * norm_weight @ (w_fp8 * scale[:, None]).T, and x + residual when given.

    x: float16 / bfloat16 / float32 [M, K] with M <= GEMV_MAX_M; residual: x's dtype [M, K] or None;
    norm_weight: [K] any float dtype; w_fp8: float8_e4m3fn [N, K]; scale: float32 [N]. Returns y [M, N] in
    x's dtype, or (y, x + residual) when a residual is given (a new tensor). `w_bits` and `gemv_cfg` override
    the byte-decoding choice and the launch parameters, for tests and benchmarks.
    """
    _check(x, w_fp8, scale)
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got shape {tuple(x.shape)}")
    m, k = x.shape
    n = w_fp8.shape[0]
    if m > GEMV_MAX_M:
        raise ValueError(f"the RMSNorm-prologue GEMV takes at most GEMV_MAX_M={GEMV_MAX_M} rows, got {m}")
    if norm_weight.shape != (k,) or not norm_weight.is_floating_point():
        raise ValueError(f"norm_weight must be a float [{k}] tensor, got {norm_weight.dtype} "
                         f"{tuple(norm_weight.shape)}")
    if norm_weight.device != x.device:
        raise ValueError(f"norm_weight is on {norm_weight.device}, x on {x.device}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"residual must match x ({x.dtype} {tuple(x.shape)} on {x.device}), got "
                             f"{residual.dtype} {tuple(residual.shape)} on {residual.device}")
        if residual.stride(1) != 1:
            residual = residual.contiguous()
    w, w_bits = _prepare_weight(w_fp8, x.device, w_bits)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    h = torch.empty_like(x) if residual is not None else y
    if m > 0:
        cfg, num_warps, num_stages = _gemv_launch(gemv_cfg or norm_gemv_config(m, n, k, target_of(x.device)), m)
        r = residual if residual is not None else x
        grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
        _fp8_norm_gemv_kernel[grid](
            x, r, norm_weight.contiguous(), w, scale.contiguous(), y, h, m, n, k,
            x.stride(0), r.stride(0), h.stride(0), w.stride(0), y.stride(0), float(eps),
            EVEN_N=n % cfg["BLOCK_N"] == 0, EVEN_K=k % cfg["BLOCK_K"] == 0, HAS_RESIDUAL=residual is not None,
            W_BITS=w_bits, DOT_PRECISION=_dot_precision(x.dtype), num_warps=num_warps, num_stages=num_stages,
            **cfg)
    return y if residual is None else (y, h)
