"""Causal flash attention of a ragged batch of new tokens over the paged KV pool (prefill and chunked prefill).

Shapes and dtypes
  q                [T, Hq, D]  fp16 / bf16 / fp32; the new tokens of sequence b are rows
                   cu_seqlens_q[b]:cu_seqlens_q[b+1] (any strides)
  k_cache, v_cache [num_blocks, block_size, Hkv, D], q's dtype, contiguous; the new tokens' K/V already stored;
                   or float8 e4m3fn with k_scale, v_scale float32 [Hkv] (value = stored * scale; see kv_fp8.py:
                   converted exactly to q's dtype as loaded, the scales folded into q.k's scale and the output)
  block_tables     int32 [B, max_blocks]; entries past a sequence's length are never read
  cu_seqlens_q     int32 [B+1]
  context_lens     int32 [B], tokens of each sequence including its new ones
  returns          [T, Hq, D] in q's dtype

Query j of sequence b sits at position context_lens[b] - q_len_b + j and sees keys 0..that position, so a
sequence with a cached prefix (q_len < context_len) and a fresh prompt go through the same code. Head h reads
kv head h // (Hq // Hkv). One launch; grid = (query tiles of the longest sequence, Hq, B). Scores and the
online softmax run in float32 (base 2, with log2(e) folded into the scale); P is cast to the value dtype for
the second product, as flash attention does.

Any head_dim up to 256: the tiles span BLOCK_D = the next power of two (>= 16, what `tl.dot` takes), the lanes
past head_dim are loaded as zeros (they add nothing to q.k nor to p.v) and never stored. A power-of-two
head_dim compiles without the extra mask.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from selfrag_engine.kernels import Target, as_target, target_of
from selfrag_engine.kernels.head_dim import MAX_HEAD_DIM, head_block, with_d_mask
from selfrag_engine.kernels.kv_fp8 import kv_pool_args

__all__ = ["prefill_attention"]

_LOG2E = 1.4426950408889634


@triton.jit
def _prefill_tile(acc, m_i, l_i, q, start, hi, q_pos, k_base, v_base, table_row,
                  stride_ks, stride_kb, stride_vs, stride_vb, qk_scale,
                  CAUSAL_MASK: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    if CAUSAL_MASK:
        key_ok = offs_n < hi
        blk = tl.load(table_row + offs_n // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
    else:
        blk = tl.load(table_row + offs_n // BLOCK_SIZE).to(tl.int64)
    slot_in_blk = offs_n % BLOCK_SIZE
    k_ptrs = k_base + blk[None, :] * stride_kb + slot_in_blk[None, :] * stride_ks + offs_d[:, None]
    v_ptrs = v_base + blk[:, None] * stride_vb + slot_in_blk[:, None] * stride_vs + offs_d[None, :]
    if CAUSAL_MASK:
        # Masked loads: slots past the context may hold stale data (even NaN) that 0 * x would let through.
        # The lane masks inline, not through with_d_mask: a nested call per tile is slow in the interpreter.
        if HEAD_DIM != BLOCK_D:
            k = tl.load(k_ptrs, mask=key_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
        else:
            k = tl.load(k_ptrs, mask=key_ok[None, :], other=0.0)
    elif HEAD_DIM != BLOCK_D:
        k = tl.load(k_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
    else:
        k = tl.load(k_ptrs)
    s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PREC) * qk_scale
    if CAUSAL_MASK:
        visible = (offs_n[None, :] <= q_pos[:, None]) & key_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if CAUSAL_MASK:
        if HEAD_DIM != BLOCK_D:
            v = tl.load(v_ptrs, mask=key_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        else:
            v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
    elif HEAD_DIM != BLOCK_D:
        v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, bt_ptr, cu_ptr, ctx_ptr, ks_ptr, vs_ptr, qk_scale,
    stride_qt, stride_qh, stride_qd, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    num_m_tiles,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, KV_FP8: tl.constexpr,
):
    # Reversed so that the last query tiles, which see the most keys, are scheduled first.
    m_tile = num_m_tiles - 1 - tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(cu_ptr + seq)
    q_len = tl.load(cu_ptr + seq + 1) - q_start
    m0 = m_tile * BLOCK_M
    if m0 < q_len:
        ctx = tl.load(ctx_ptr + seq)
        kv_head = head // GROUP
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < q_len
        rows = (q_start + offs_m).to(tl.int64)
        io_mask = with_d_mask(row_ok[:, None], offs_d[None, :], HEAD_DIM, BLOCK_D)
        q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :] * stride_qd,
                    mask=io_mask, other=0.0)
        first_pos = ctx - q_len + m0
        q_pos = first_pos + tl.arange(0, BLOCK_M)
        # Keys before the tile's first query are visible to every row: no mask needed there.
        full_end = (first_pos // BLOCK_N) * BLOCK_N
        hi = tl.minimum(ctx, first_pos + BLOCK_M)

        if KV_FP8:
            qk_scale = qk_scale * tl.load(ks_ptr + kv_head)
        k_base = k_ptr + kv_head * stride_kh
        v_base = v_ptr + kv_head * stride_vh
        table_row = bt_ptr + seq.to(tl.int64) * stride_bt
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = _prefill_tile(acc, m_i, l_i, q, start, hi, q_pos, k_base, v_base, table_row,
                                          stride_ks, stride_kb, stride_vs, stride_vb, qk_scale,
                                          False, BLOCK_SIZE, BLOCK_N, HEAD_DIM, BLOCK_D, DOT_PREC)
        for start in range(full_end, hi, BLOCK_N):
            acc, m_i, l_i = _prefill_tile(acc, m_i, l_i, q, start, hi, q_pos, k_base, v_base, table_row,
                                          stride_ks, stride_kb, stride_vs, stride_vb, qk_scale,
                                          True, BLOCK_SIZE, BLOCK_N, HEAD_DIM, BLOCK_D, DOT_PREC)
        if KV_FP8:
            acc = acc * tl.load(vs_ptr + kv_head)
        # Every real row sees key first_pos at least, so l_i > 0 there; padded rows are never stored.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=io_mask)


def launch_config(max_q_len: int, head_dim: int, block_size: int, dtype: torch.dtype,
                  where: Target | torch.device | str) -> dict:
    """Tiles, warps and stages of the prefill kernel for sequences of at most max_q_len new tokens."""
    if as_target(where).interpreter:
        # The interpreter's cost is per program instruction, not per element: small tiles, few wasted rows.
        block_m = 16
        block_n = max(16, block_size)
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=1)
    if max_q_len <= 16:
        block_m = 16
    elif max_q_len <= 32:
        block_m = 32
    elif max_q_len <= 64:
        block_m = 64
    else:
        block_m = 128
    block_d = head_block(head_dim)
    block_n = max(64 if block_d <= 128 else 32, block_size)
    if dtype == torch.float32:
        block_m, block_n = min(block_m, 64), max(32, block_size)
    num_warps = 8 if block_m * block_d >= 128 * 128 else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=3 if block_d <= 128 else 2)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, scale: float,
                      max_q_len: int, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of q [T, Hq, D] over the paged pool; returns [T, Hq, D] in q's dtype. A float8 pool
    takes its scales k_scale, v_scale float32 [Hkv].

    max_q_len bounds the number of new tokens of any sequence (sizes the grid; no device sync here).
    """
    _check(q.dim() == 3, f"q must be [T, Hq, D], got shape {tuple(q.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    _check(k_cache.dim() == 4 and k_cache.shape == v_cache.shape,
           "k_cache and v_cache must both be [num_blocks, block_size, kv_heads, head_dim]")
    _, block_size, num_kv_heads, pool_dim = k_cache.shape
    _check(pool_dim == head_dim, f"pool head_dim {pool_dim} differs from q head_dim {head_dim}")
    _check(1 <= head_dim <= MAX_HEAD_DIM, f"head_dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    _check(block_size & (block_size - 1) == 0, f"block_size must be a power of two, got {block_size}")
    _check(num_heads % num_kv_heads == 0, f"num_heads {num_heads} is not a multiple of kv heads {num_kv_heads}")
    _check(q.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {q.dtype}")
    fp8, k_scale, v_scale = kv_pool_args(q, k_cache, v_cache, k_scale, v_scale)
    _check(k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "the pool's last dim must be contiguous")
    _check(block_tables.dim() == 2 and block_tables.dtype == torch.int32, "block_tables must be int32 [B, max_blocks]")
    batch = block_tables.shape[0]
    _check(cu_seqlens_q.shape == (batch + 1,) and cu_seqlens_q.dtype == torch.int32,
           f"cu_seqlens_q must be int32 [{batch + 1}]")
    _check(context_lens.shape == (batch,) and context_lens.dtype == torch.int32,
           f"context_lens must be int32 [{batch}]")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                    ("cu_seqlens_q", cu_seqlens_q), ("context_lens", context_lens)):
        _check(t.device == q.device, f"{name} is on {t.device}, q on {q.device}")
    _check(max_q_len >= 0, f"max_q_len must be >= 0, got {max_q_len}")
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0 or batch == 0 or max_q_len == 0:
        return out
    cfg = launch_config(max_q_len, head_dim, block_size, q.dtype, target_of(q.device))
    num_m_tiles = triton.cdiv(max_q_len, cfg["BLOCK_M"])
    grid = (num_m_tiles, num_heads, batch)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, cu_seqlens_q, context_lens, k_scale, v_scale, float(scale) * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        num_m_tiles,
        GROUP=num_heads // num_kv_heads, BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim),
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", KV_FP8=fp8,
        **cfg,
    )
    return out
