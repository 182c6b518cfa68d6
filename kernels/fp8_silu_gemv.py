"""FP8 GEMV with a SiLU-and-mul prologue: y = (silu(gate) * up) @ (w_fp8 * scale[:, None]).T in one launch.

The down projection of a decode step reads the gate|up projection's output; computing silu(gate) * up per K
block inside the GEMV saves the activation's own launch and its [M, I] round trip through memory.

Shapes and dtypes
  gate_up   [M, 2*K]  fp16 / bf16 / fp32, M <= GEMV_MAX_M; columns [0, K) the gate, [K, 2K) the up projection
            (rows may be strided, the last dim must be contiguous)
  w_fp8     [N, K]    float8_e4m3fn; scale [N] float32
  returns   y [M, N] in gate_up's dtype

Rounding: silu(gate) * up is computed in float32 and rounded to gate_up's dtype once, as `kernels/activation.py`
does, before the dot reads it; the K loop is the plain GEMV's. So the result equals `silu_and_mul` followed by
`fp8_linear` with the same launch parameters, bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from selfrag_engine.kernels import target_of
from selfrag_engine.kernels.fp8_linear import (
    FP8_DTYPE,
    GEMV_MAX_M,
    _dot_precision,
    _e4m3_bits_to_f16,
    _gemv_launch,
    _prepare_weight,
    gemv_config,
)

__all__ = ["fp8_silu_mul_linear"]


@triton.jit
def _silu_mul(gate, up):
    """silu(gate) * up in float32 from fp32 inputs; sigmoid from exp(-|gate|), which never overflows."""
    e = tl.exp(-tl.abs(gate))
    sig = tl.where(gate >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return gate * sig * up


@triton.jit
def _fp8_silu_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          USE_DOT: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                          W_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """y[M, N] = (silu(x[:, :K]) * x[:, K:]) @ (w[N, K] * s[N, None]).T for small M (decode).

    x: fp16 / bf16 / fp32 [M, 2K], unit stride along its columns. w: float8_e4m3fn [N, K] row-major, or uint8
    holding its bits when W_BITS. s: float32 [N]. y: x's dtype [M, N]. Grid: (cdiv(N, BLOCK_N),).
    USE_DOT=False (M == 1) and USE_DOT=True (M <= BLOCK_M) as in `_fp8_gemv_kernel`.
    """
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    if USE_DOT:
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            if EVEN_K:
                mask_x = mask_m[:, None] & (offs_k[None, :] < BLOCK_K)
                if EVEN_N:
                    w = tl.load(w_ptrs)
                else:
                    w = tl.load(w_ptrs, mask=mask_n[None, :], other=0.0)
            else:
                mask_k = (k + offs_k) < K
                mask_x = mask_m[:, None] & mask_k[None, :]
                w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            gate = tl.load(x_ptrs, mask=mask_x, other=0.0).to(tl.float32)
            up = tl.load(x_ptrs + K, mask=mask_x, other=0.0).to(tl.float32)
            # Rounded once, as the separate activation kernel stores it.
            a = _silu_mul(gate, up).to(x_ptr.dtype.element_ty)
            if W_BITS:
                w = _e4m3_bits_to_f16(w)
            acc = tl.dot(a, w.to(a.dtype), acc, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        s = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
        if W_BITS:
            s = s * 256.0
        acc = acc * s[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    else:
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            if EVEN_K:
                gate = tl.load(x_ptr + k + offs_k)
                up = tl.load(x_ptr + K + k + offs_k)
                if EVEN_N:
                    w = tl.load(w_ptrs)
                else:
                    w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
            else:
                mask_k = (k + offs_k) < K
                gate = tl.load(x_ptr + k + offs_k, mask=mask_k, other=0.0)
                up = tl.load(x_ptr + K + k + offs_k, mask=mask_k, other=0.0)
                w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            a = _silu_mul(gate.to(tl.float32), up.to(tl.float32)).to(x_ptr.dtype.element_ty)
            if W_BITS:
                w = _e4m3_bits_to_f16(w)
            acc2 += w.to(tl.float32) * a.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K
        s = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
        if W_BITS:
            s = s * 256.0
        out = tl.sum(acc2, axis=1) * s
        tl.store(y_ptr + offs_n, out.to(y_ptr.dtype.element_ty), mask=mask_n)


def fp8_silu_mul_linear(gate_up: torch.Tensor, w_fp8: torch.Tensor, scale: torch.Tensor, *,
                        w_bits: bool | None = None, gemv_cfg: dict | None = None) -> torch.Tensor:
    """(silu(gate_up[:, :K]) * gate_up[:, K:]) @ (w_fp8 * scale[:, None]).T.

    gate_up: float16 / bfloat16 / float32 [M, 2K] with M <= GEMV_MAX_M; w_fp8: float8_e4m3fn [N, K]; scale:
    float32 [N]. Returns y [M, N] in gate_up's dtype. `w_bits` and `gemv_cfg` override the byte-decoding
    choice and the launch parameters (those of `gemv_config` for [N, K] otherwise), for tests and benchmarks.
    """
    if w_fp8.dtype != FP8_DTYPE or w_fp8.dim() != 2:
        raise ValueError(f"w_fp8 must be a 2-D {FP8_DTYPE} tensor [N, K], got {w_fp8.dtype} {tuple(w_fp8.shape)}")
    n, k = w_fp8.shape
    if gate_up.dim() != 2 or gate_up.shape[1] != 2 * k:
        raise ValueError(f"gate_up must be [M, 2*K] = [M, {2 * k}], got shape {tuple(gate_up.shape)}")
    if gate_up.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"gate_up must be float16, bfloat16 or float32, got {gate_up.dtype}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != (n,):
        raise ValueError(f"scale must be float32 [{n}], got {scale.dtype} {tuple(scale.shape)}")
    if not (gate_up.device == w_fp8.device == scale.device):
        raise ValueError(f"gate_up, w_fp8 and scale must be on one device, got {gate_up.device}, "
                         f"{w_fp8.device}, {scale.device}")
    m = gate_up.shape[0]
    if m > GEMV_MAX_M:
        raise ValueError(f"the SiLU-prologue GEMV takes at most GEMV_MAX_M={GEMV_MAX_M} rows, got {m}")
    if gate_up.stride(1) != 1:
        gate_up = gate_up.contiguous()
    w, w_bits = _prepare_weight(w_fp8, gate_up.device, w_bits)
    y = torch.empty((m, n), dtype=gate_up.dtype, device=gate_up.device)
    if m > 0:
        cfg, num_warps, num_stages = _gemv_launch(gemv_cfg or gemv_config(m, n, k, target_of(gate_up.device)), m)
        grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
        _fp8_silu_gemv_kernel[grid](
            gate_up, w, scale.contiguous(), y, m, n, k, gate_up.stride(0), w.stride(0), y.stride(0),
            EVEN_N=n % cfg["BLOCK_N"] == 0, EVEN_K=k % cfg["BLOCK_K"] == 0, W_BITS=w_bits,
            DOT_PRECISION=_dot_precision(gate_up.dtype), num_warps=num_warps, num_stages=num_stages, **cfg)
    return y
