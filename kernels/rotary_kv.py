"""Rotary embedding of q and k fused with the store of k and v into the paged KV pool, in one launch.

Shapes and dtypes
  q             [T, Hq, D]   fp16 / bf16 / fp32, rotated in place (any strides, e.g. a view of a fused qkv output)
  k, v          [T, Hkv, D]  same dtype as q, any strides; k itself is left unrotated, only the pool gets it
  positions     int32 / int64 [T], index into the tables
  cos, sin      float32 [P, D/2], HF Llama rotate-half convention (rope scaling folded in by the caller)
  k_cache, v_cache [num_blocks, block_size, Hkv, D], same dtype as q, or float8 e4m3fn with
                k_scale, v_scale float32 [Hkv]
  slot_mapping  int32 / int64 [T], flat slot block * block_size + offset; a negative slot skips the write

With half = D/2, x1 = x[:half], x2 = x[half:]: out[:half] = x1*cos - x2*sin, out[half:] = x2*cos + x1*sin,
computed in float32 and rounded once to the tensor's dtype, as the torch path does. A float8 pool gets that
rounded k (and v) divided by its head's scale, rounded to e4m3 and saturated (kv_fp8.e4m3_bits): the bytes the
torch path's `quantize_kv` writes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from selfrag_engine.kernels.kv_fp8 import e4m3_bits, kv_pool_args

__all__ = ["rotary_and_store_kv"]


@triton.jit
def _rotary_store_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr, ks_ptr, vs_ptr,
    sq_t, sq_h, sq_d, sk_t, sk_h, sk_d, sv_t, sv_h, sv_d, s_cos, s_sin,
    skc_b, skc_s, skc_h, svc_b, svc_s, svc_h,
    num_q_heads, num_kv_heads,
    BLOCK_SIZE: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    col_ok = i < HALF

    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cos_ptr + pos * s_cos + i, mask=col_ok, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * s_sin + i, mask=col_ok, other=0.0)[None, :]

    q_mask = (heads < num_q_heads)[:, None] & col_ok[None, :]
    q1_ptrs = q_ptr + t * sq_t + heads[:, None] * sq_h + i[None, :] * sq_d
    q2_ptrs = q1_ptrs + HALF * sq_d
    q1 = tl.load(q1_ptrs, mask=q_mask, other=0.0).to(tl.float32)
    q2 = tl.load(q2_ptrs, mask=q_mask, other=0.0).to(tl.float32)
    tl.store(q1_ptrs, (q1 * cos - q2 * sin).to(q_ptr.dtype.element_ty), mask=q_mask)
    tl.store(q2_ptrs, (q2 * cos + q1 * sin).to(q_ptr.dtype.element_ty), mask=q_mask)

    slot = tl.load(slot_ptr + t).to(tl.int64)
    # Broadcast through a tensor first: the interpreter rejects a mask built from a scalar bool.
    write = (heads < num_kv_heads) & ((heads * 0 + slot) >= 0)
    kv_mask = write[:, None] & col_ok[None, :]
    # Clamped so that skipped tokens (slot < 0) never form an out-of-range address, even masked.
    safe_slot = tl.maximum(slot, 0)
    blk = safe_slot // BLOCK_SIZE
    off = safe_slot % BLOCK_SIZE

    k1_ptrs = k_ptr + t * sk_t + heads[:, None] * sk_h + i[None, :] * sk_d
    k1 = tl.load(k1_ptrs, mask=kv_mask, other=0.0).to(tl.float32)
    k2 = tl.load(k1_ptrs + HALF * sk_d, mask=kv_mask, other=0.0).to(tl.float32)
    kc1_ptrs = kc_ptr + blk * skc_b + off * skc_s + heads[:, None] * skc_h + i[None, :]
    v1_ptrs = v_ptr + t * sv_t + heads[:, None] * sv_h + i[None, :] * sv_d
    v1 = tl.load(v1_ptrs, mask=kv_mask, other=0.0)
    v2 = tl.load(v1_ptrs + HALF * sv_d, mask=kv_mask, other=0.0)
    vc1_ptrs = vc_ptr + blk * svc_b + off * svc_s + heads[:, None] * svc_h + i[None, :]
    if KV_FP8:
        # k rounded to the activations' dtype first, as the torch path stores it; then x / scale (exact for a
        # power of two, and correctly rounded otherwise) encoded as e4m3 bytes.
        dtype = k_ptr.dtype.element_ty
        kv_ok = heads < num_kv_heads
        ks = tl.load(ks_ptr + heads, mask=kv_ok, other=1.0)[:, None]
        vs = tl.load(vs_ptr + heads, mask=kv_ok, other=1.0)[:, None]
        r1 = (k1 * cos - k2 * sin).to(dtype).to(tl.float32)
        r2 = (k2 * cos + k1 * sin).to(dtype).to(tl.float32)
        tl.store(kc1_ptrs, e4m3_bits(tl.math.div_rn(r1, ks)).to(tl.uint8), mask=kv_mask)
        tl.store(kc1_ptrs + HALF, e4m3_bits(tl.math.div_rn(r2, ks)).to(tl.uint8), mask=kv_mask)
        tl.store(vc1_ptrs, e4m3_bits(tl.math.div_rn(v1.to(tl.float32), vs)).to(tl.uint8), mask=kv_mask)
        tl.store(vc1_ptrs + HALF, e4m3_bits(tl.math.div_rn(v2.to(tl.float32), vs)).to(tl.uint8), mask=kv_mask)
    else:
        tl.store(kc1_ptrs, (k1 * cos - k2 * sin).to(kc_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(kc1_ptrs + HALF, (k2 * cos + k1 * sin).to(kc_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(vc1_ptrs, v1, mask=kv_mask)
        tl.store(vc1_ptrs + HALF, v2, mask=kv_mask)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def rotary_and_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None) -> None:
    """Rotates q in place and writes rotated k and v into the pool at slot_mapping (negative slots skipped);
    a float8 pool takes its scales (x / scale is stored)."""
    _check(q.dim() == 3 and k.dim() == 3 and v.dim() == 3, "q, k, v must be [T, heads, head_dim]")
    num_tokens, num_q_heads, head_dim = q.shape
    _check(k.shape == v.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    _check(k.shape[0] == num_tokens and k.shape[2] == head_dim,
           f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in tokens or head_dim")
    num_kv_heads = k.shape[1]
    _check(head_dim % 2 == 0, f"head_dim must be even, got {head_dim}")
    half = head_dim // 2
    _check(k_cache.dim() == 4 and k_cache.shape == v_cache.shape,
           "k_cache and v_cache must both be [num_blocks, block_size, kv_heads, head_dim]")
    _check(k_cache.shape[2] == num_kv_heads and k_cache.shape[3] == head_dim,
           f"pool {tuple(k_cache.shape)} does not match k {tuple(k.shape)}")
    _check(k_cache.is_contiguous() and v_cache.is_contiguous(), "k_cache and v_cache must be contiguous")
    block_size = k_cache.shape[1]
    _check(block_size & (block_size - 1) == 0, f"block_size must be a power of two, got {block_size}")
    _check(q.dtype == k.dtype == v.dtype, f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    fp8, k_scale, v_scale = kv_pool_args(q, k_cache, v_cache, k_scale, v_scale)
    _check(cos.dtype == torch.float32 and sin.dtype == torch.float32, "cos and sin must be float32")
    _check(cos.dim() == 2 and cos.shape == sin.shape and cos.shape[1] == half,
           f"cos and sin must be [max_positions, {half}], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    _check(cos.stride(1) == 1 and sin.stride(1) == 1, "cos and sin must be contiguous along the last dim")
    _check(positions.shape == (num_tokens,) and not positions.is_floating_point(),
           f"positions must be an integer tensor [{num_tokens}]")
    _check(slot_mapping.shape == (num_tokens,) and not slot_mapping.is_floating_point(),
           f"slot_mapping must be an integer tensor [{num_tokens}]")
    device = q.device
    for name, t in (("k", k), ("v", v), ("positions", positions), ("cos", cos), ("sin", sin),
                    ("k_cache", k_cache), ("v_cache", v_cache), ("slot_mapping", slot_mapping)):
        _check(t.device == device, f"{name} is on {t.device}, q on {device}")
    if num_tokens == 0:
        return
    block_half = triton.next_power_of_2(half)
    max_heads = max(num_q_heads, num_kv_heads)
    # About 4k elements per half-tile per program keeps registers modest at head_dim 128.
    block_h = min(triton.next_power_of_2(max_heads), max(1, 4096 // block_half))
    grid = (num_tokens, triton.cdiv(max_heads, block_h))
    if fp8:
        # Written as bytes: the kernel encodes e4m3 itself (a float8 store would round in the interpreter).
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    _rotary_store_kernel[grid](
        q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, k_scale, v_scale,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        num_q_heads, num_kv_heads,
        BLOCK_SIZE=block_size, HALF=half, BLOCK_HALF=block_half, BLOCK_H=block_h, KV_FP8=fp8,
        num_warps=4,
    )
