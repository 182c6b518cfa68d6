"""FP8 (e4m3) weight-only linear layers: y = x @ (w_fp8 * scale[:, None]).T with fp32 accumulation.

Two Triton kernels, picked by the number of rows M of x:

- `_fp8_gemv_kernel` (M <= GEMV_MAX_M, decode): each program owns BLOCK_N rows of W and walks K once, for all
  M rows of x, so every weight byte is read exactly once per call. At batch 1 decode is bound by how fast
  the weights stream from memory, which is why FP8 halves its time against fp16.
- `_fp8_gemm_kernel` (M > GEMV_MAX_M, prefill): a tiled `tl.dot` GEMM whose weight tiles are upcast from fp8
  to the activation dtype in registers, so no dequantized copy of W ever exists in memory.

Per-channel scales multiply the fp32 accumulator once per output column, after the K loop.

Triton only has a native e4m3 type on sm_89+ (Ada, Hopper). On older GPUs (A100) the weights are read as
bytes and decoded with integer ops (`_e4m3_bits_to_f16`), which is exact.

`fp8_linear_w8a8` is an optional prefill path for Hopper/Ada: per-token dynamic FP8 activations and
`torch._scaled_mm` (FP8 tensor cores). It trades accuracy (activations rounded to 3 mantissa bits) for speed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from selfrag_engine.kernels import INTERPRET, Target, as_target, target_of

__all__ = ["FP8_DTYPE", "FP8_MAX", "GEMV_MAX_M", "fp8_linear", "fp8_linear_w8a8", "gemv_config",
           "quantize_activations_per_token", "w8a8_supported"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# Up to this many rows of x, W is streamed once by the GEMV kernel; above it, the tiled GEMM wins.
GEMV_MAX_M = 16

_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _e4m3_bits_to_f16(bits):
    """uint8 e4m3fn bit patterns -> fp16 holding value / 256, exactly.

    Shifting the 7 exponent+mantissa bits left by 7 lands them in fp16's fields with an exponent bias that is
    8 too large (15 vs 7); normals and subnormals alike come out scaled by 2^-8, and every such value is an
    fp16 number, so the caller multiplies the 256 into the per-channel scale.
    """
    b = bits.to(tl.uint16)
    h = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
    return h.to(tl.float16, bitcast=True)


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     USE_DOT: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                     W_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Skinny y[M, N] = x[M, K] @ (w[N, K] * s[N, None]).T for small M (decode).

    x: fp16 / bf16 / fp32 [M, K], unit stride along K. w: float8_e4m3fn [N, K] row-major, or uint8 holding
    its bits when W_BITS (pre-sm_89 GPUs). s: float32 [N]. y: x's dtype [M, N].
    Grid: (cdiv(N, BLOCK_N),); each program reads its BLOCK_N rows of w once.

    USE_DOT=False (M == 1): fp32 FMAs into a [BLOCK_N, BLOCK_K] accumulator, reduced over K once at the end
    so the loop body has no cross-thread shuffles. USE_DOT=True (M <= BLOCK_M, BLOCK_M >= 16): tl.dot with x
    padded to BLOCK_M rows; tensor cores make the padding free, and num_stages lets Triton pipeline the loads.
    """
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    if USE_DOT:
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
        # [BLOCK_K, BLOCK_N] view of w, K contiguous along dim 0.
        w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
                if EVEN_N:
                    w = tl.load(w_ptrs)
                else:
                    w = tl.load(w_ptrs, mask=mask_n[None, :], other=0.0)
            else:
                mask_k = (k + offs_k) < K
                x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if W_BITS:
                w = _e4m3_bits_to_f16(w)
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
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
                x = tl.load(x_ptr + k + offs_k)
                if EVEN_N:
                    w = tl.load(w_ptrs)
                else:
                    w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
            else:
                mask_k = (k + offs_k) < K
                x = tl.load(x_ptr + k + offs_k, mask=mask_k, other=0.0)
                w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if W_BITS:
                w = _e4m3_bits_to_f16(w)
            acc2 += w.to(tl.float32) * x.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K
        s = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
        if W_BITS:
            s = s * 256.0
        out = tl.sum(acc2, axis=1) * s
        tl.store(y_ptr + offs_n, out.to(y_ptr.dtype.element_ty), mask=mask_n)


def _gemm_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "SWAP_AB": False},
                              num_warps=4, num_stages=1)]
    # fp16 GEMM tiles that do well on A100/H100. BLOCK_K stays at 64 because the fp8 -> fp16 conversion
    # sits between the shared-memory load and the MMA. SWAP_AB computes y.T = W @ x.T so the converted
    # weights are the MMA's A operand, which Hopper's wgmma can take from registers (B must be in shared
    # memory); the autotuner keeps whichever is faster on the device at hand.
    cfgs = [(128, 128, 64, 8, 3, False), (128, 256, 64, 8, 3, False), (256, 128, 64, 8, 3, False),
            (64, 128, 64, 4, 4, False), (128, 64, 64, 4, 4, False),
            (128, 128, 64, 8, 3, True), (64, 256, 64, 8, 3, True), (128, 128, 64, 4, 4, True)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SWAP_AB": swap},
                          num_warps=w, num_stages=st) for bm, bn, bk, w, st, swap in cfgs]


@triton.jit
def _fp8_gemm_kernel_impl(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym, M_BUCKET,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr, W_BITS: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    """Tiled y[M, N] = x[M, K] @ (w[N, K] * s[N, None]).T for large M (prefill).

    x: fp16 / bf16 / fp32 [M, K], unit stride along K. w: float8_e4m3fn [N, K] row-major, or uint8 bits when
    W_BITS. s: float32 [N]. y: x's dtype [M, N]. Grid: (cdiv(M, BLOCK_M) *
    cdiv(N, BLOCK_N),). M_BUCKET (next power of two of M) is only an autotuning key, so prefills of every
    length do not each trigger a new tuning run. SWAP_AB accumulates the [BLOCK_N, BLOCK_M] transpose.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row-tiles sweep the same column tiles together, so W tiles are reused from L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapping edge rows/columns back into range keeps the M/N loads unmasked; the store masks them instead.
    offs_xm = (offs_m % M).to(tl.int64)
    offs_wn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    s = tl.load(s_ptr + offs_wn)
    if W_BITS:
        s = s * 256.0
    if SWAP_AB:
        x_ptrs = x_ptr + offs_xm[None, :] * stride_xm + offs_k[:, None]  # [BLOCK_K, BLOCK_M]
        w_ptrs = w_ptr + offs_wn[:, None] * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
        acc_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            mask_k = (k + offs_k) < K
            x = tl.load(x_ptrs, mask=mask_k[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=mask_k[None, :], other=0.0)
            if W_BITS:
                w = _e4m3_bits_to_f16(w)
            acc_t = tl.dot(w.to(x.dtype), x, acc_t, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        acc_t = acc_t * s[:, None]
        y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
        tl.store(y_ptrs, acc_t.to(y_ptr.dtype.element_ty), mask=(offs_m[None, :] < M) & (offs_n[:, None] < N))
    else:
        x_ptrs = x_ptr + offs_xm[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
        w_ptrs = w_ptr + offs_wn[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            mask_k = (k + offs_k) < K
            x = tl.load(x_ptrs, mask=mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_k[:, None], other=0.0)
            if W_BITS:
                w = _e4m3_bits_to_f16(w)
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        acc = acc * s[None, :]
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


_fp8_gemm_kernel = triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K"])(_fp8_gemm_kernel_impl)


def needs_w_bits(target: Target) -> bool:
    """Whether the weights are read as bytes and decoded in the kernel: GPUs before sm_89 have no e4m3 type."""
    return not target.interpreter and target.capability < (8, 9)


def gemv_config(m: int, n: int, k: int, where: Target | torch.device | str) -> dict:
    """Launch parameters of the GEMV kernel for m rows of x and an [n, k] weight on `where` (a Target or a
    device): a heuristic, not autotuned, so the first call inside a CUDA graph capture does not benchmark."""
    target = as_target(where)
    if target.interpreter:
        use_dot = m > 1
        return {"BLOCK_M": 16 if use_dot else 1, "BLOCK_N": 16 if use_dot else 8, "BLOCK_K": 64,
                "USE_DOT": use_dot, "num_warps": 4, "num_stages": 1}
    if m == 1:
        # Small row tiles keep >= 3-4 CTAs per SM on 4096-row weights without split-K (whose atomics would
        # make the output run-to-run nondeterministic); 16 rows x 512 bytes is 64 bytes in flight per thread.
        block_n = 16 if triton.cdiv(n, 16) >= 4 * target.num_sms else 8
        # A BLOCK_K that divides K drops the K mask from the loop (11008 = 43 * 256).
        block_k = next((b for b in (512, 256, 128) if k % b == 0), 512)
        return {"BLOCK_M": 1, "BLOCK_N": block_n, "BLOCK_K": block_k, "USE_DOT": False, "num_warps": 4,
                "num_stages": 1}
    block_k = next((b for b in (256, 128) if k % b == 0), 256)
    return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": block_k, "USE_DOT": True, "num_warps": 4, "num_stages": 4}


def _dot_precision(dtype: torch.dtype) -> str:
    # tf32 would lose 13 mantissa bits of fp32 activations; fp16/bf16 inputs ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(x: torch.Tensor, w_fp8: torch.Tensor, scale: torch.Tensor) -> None:
    if w_fp8.dtype != FP8_DTYPE or w_fp8.dim() != 2:
        raise ValueError(f"w_fp8 must be a 2-D {FP8_DTYPE} tensor [N, K], got {w_fp8.dtype} {tuple(w_fp8.shape)}")
    n, k = w_fp8.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim, the weight expects K={k}")
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != (n,):
        raise ValueError(f"scale must be float32 [{n}], got {scale.dtype} {tuple(scale.shape)}")
    if not (x.device == w_fp8.device == scale.device):
        raise ValueError(f"x, w_fp8 and scale must be on one device, got {x.device}, {w_fp8.device}, {scale.device}")


def _prepare_weight(w_fp8: torch.Tensor, device: torch.device, w_bits: bool | None) -> tuple[torch.Tensor, bool]:
    """The weight as the kernels read it (contiguous; its bytes where the target has no e4m3 type) and the
    W_BITS flag, decided from the device when None."""
    w = w_fp8 if w_fp8.is_contiguous() else w_fp8.contiguous()
    if w_bits is None:
        w_bits = needs_w_bits(target_of(device))
    return (w.view(torch.uint8) if w_bits else w), w_bits


def _gemv_launch(config: dict, m: int) -> tuple[dict, int, int]:
    """(the kernel's constexprs, num_warps, num_stages) of a GEMV config, checked against the m rows."""
    cfg = dict(config)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    if cfg["USE_DOT"] and m > cfg["BLOCK_M"]:
        raise ValueError(f"GEMV dot path handles at most BLOCK_M={cfg['BLOCK_M']} rows, got {m}")
    if not cfg["USE_DOT"] and m != 1:
        raise ValueError("GEMV FMA path handles exactly one row")
    return cfg, num_warps, num_stages


def _prepare(x, w_fp8, scale, w_bits):
    _check(x, w_fp8, scale)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w, w_bits = _prepare_weight(w_fp8, x.device, w_bits)
    return x2, w, scale.contiguous(), w_bits


def _launch_gemv(x2, w, scale, y, w_bits, config):
    m, k = x2.shape
    n = w.shape[0]
    cfg, num_warps, num_stages = _gemv_launch(config, m)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    _fp8_gemv_kernel[grid](x2, w, scale, y, m, n, k, x2.stride(0), w.stride(0), y.stride(0),
                           EVEN_N=n % cfg["BLOCK_N"] == 0, EVEN_K=k % cfg["BLOCK_K"] == 0, W_BITS=w_bits,
                           DOT_PRECISION=_dot_precision(x2.dtype), num_warps=num_warps, num_stages=num_stages,
                           **cfg)


def _launch_gemm(x2, w, scale, y, w_bits, config=None):
    m, k = x2.shape
    n = w.shape[0]

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    args = (x2, w, scale, y, m, n, k, x2.stride(0), w.stride(0), y.stride(0), min(triton.next_power_of_2(m), 8192))
    if config is None:
        _fp8_gemm_kernel[grid](*args, W_BITS=w_bits, DOT_PRECISION=_dot_precision(x2.dtype))
    else:
        _fp8_gemm_kernel_impl[grid](*args, W_BITS=w_bits, DOT_PRECISION=_dot_precision(x2.dtype), **config)


def fp8_linear(x: torch.Tensor, w_fp8: torch.Tensor, scale: torch.Tensor, *, out: torch.Tensor | None = None,
               path: str | None = None, w_bits: bool | None = None, gemv_cfg: dict | None = None,
               gemm_cfg: dict | None = None) -> torch.Tensor:
    """y[..., N] = x[..., K] @ (w_fp8[N, K] * scale[N, None]).T, fp32 accumulation, returned in x's dtype.

    x: float16 / bfloat16 / float32 (fp32 is for tests) [..., K]; w_fp8: torch.float8_e4m3fn [N, K] (the
    nn.Linear layout); scale: float32 [N], one per output channel. `out` ([..., N], x's dtype, contiguous)
    receives the result if given. `path` ("gemv" | "gemm") overrides the choice by row count, `w_bits`
    the native-fp8 vs byte-decoding choice, and `gemv_cfg` / `gemm_cfg` the launch parameters (BLOCK_*,
    num_warps, num_stages; the GEMM is autotuned otherwise), for tests and benchmarks.
    """
    x2, w, s, w_bits = _prepare(x, w_fp8, scale, w_bits)
    m, n = x2.shape[0], w.shape[0]
    if out is None:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        if out.dtype != x.dtype or tuple(out.shape) != (*x.shape[:-1], n) or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {(*x.shape[:-1], n)}, "
                             f"got {out.dtype} {tuple(out.shape)}")
        y = out.view(m, n)
    if m == 0:
        return y.view(*x.shape[:-1], n)
    if path is None:
        path = "gemv" if m <= GEMV_MAX_M else "gemm"
    if path == "gemv":
        _launch_gemv(x2, w, s, y, w_bits, gemv_cfg or gemv_config(m, n, x2.shape[1], target_of(x.device)))
    elif path == "gemm":
        _launch_gemm(x2, w, s, y, w_bits, gemm_cfg)
    else:
        raise ValueError(f"unknown path '{path}' (use 'gemv' or 'gemm')")
    return y.view(*x.shape[:-1], n)


_SCALED_MM_OUT_OK: dict[torch.dtype, bool] = {}


def quantize_activations_per_token(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [M, K] -> (e4m3 [M, K], float32 scales [M, 1]) with each row's amax mapped to 448 (torch, not
    Triton: in-kernel fp32 -> fp8 casts do not saturate)."""
    amax = x2.abs().amax(dim=1, keepdim=True).float()
    x_scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    x_fp8 = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x_fp8, x_scale


def w8a8_supported(device: torch.device, n: int, k: int) -> bool:
    """Whether `fp8_linear_w8a8` can run: FP8 tensor cores (sm_89+) and K, N multiples of 16."""
    return (device.type == "cuda" and not INTERPRET and k % 16 == 0 and n % 16 == 0
            and torch.cuda.get_device_capability(device) >= (8, 9))


def fp8_linear_w8a8(x: torch.Tensor, w_fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8A8 prefill: per-token dynamic e4m3 activations x FP8 weights on FP8 tensor cores (`torch._scaled_mm`,
    row-wise scales). Same shapes/dtypes as `fp8_linear`; K and N must be multiples of 16. Needs sm_89+ on
    CUDA. Less accurate than `fp8_linear` (activations also lose all but 3 mantissa bits)."""
    _check(x, w_fp8, scale)
    n, k = w_fp8.shape
    if k % 16 or n % 16:
        raise ValueError(f"_scaled_mm needs K and N divisible by 16, got K={k}, N={n}")
    x2 = x.reshape(-1, k)
    x_fp8, x_scale = quantize_activations_per_token(x2)
    w = w_fp8 if w_fp8.is_contiguous() else w_fp8.contiguous()
    scale_b = scale.view(1, n)
    out_dtype = x.dtype
    # Some torch builds only produce bf16 with row-wise scales; fall back to it and cast.
    if _SCALED_MM_OUT_OK.get(out_dtype, True):
        try:
            y = torch._scaled_mm(x_fp8, w.t(), scale_a=x_scale, scale_b=scale_b, out_dtype=out_dtype)
            _SCALED_MM_OUT_OK[out_dtype] = True
            return y.view(*x.shape[:-1], n)
        except RuntimeError:
            _SCALED_MM_OUT_OK[out_dtype] = False
    y = torch._scaled_mm(x_fp8, w.t(), scale_a=x_scale, scale_b=scale_b, out_dtype=torch.bfloat16)
    return y.to(out_dtype).view(*x.shape[:-1], n)
