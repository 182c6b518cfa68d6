"""Decode attention over the paged KV pool: split-K paged decode, and cascade decode for shared prefixes.

Shapes and dtypes
  q                [B, Hq, D]  fp16 / bf16 / fp32, one query per sequence (any strides)
  k_cache, v_cache [num_blocks, block_size, Hkv, D], q's dtype, last dim contiguous; or float8 e4m3fn with
                   k_scale, v_scale float32 [Hkv] (value = stored * scale; see kv_fp8.py)
  block_tables     int32 [B, max_blocks]; entries past a sequence's length are never read
  context_lens     int32 [B], tokens of each sequence including the new one (a row with 0 gets zeros)
  group_start      int32 [G+1] (cascade): rows group_start[g]:group_start[g+1] form group g; the groups cover
                   rows 0..B-1 in order (a row with nothing shared is a group of its own with prefix_blocks 0)
  prefix_blocks    int32 [G] (cascade): the first prefix_blocks[g] blocks of every row of group g are the
                   same physical blocks, all full
  returns          [B, Hq, D] in q's dtype

Each program handles all Hq/Hkv query heads of one kv head as the rows of a tl.dot (padded to >= 16 rows), so a
K/V tile is read once per kv head. Split-K: split s of a sequence covers an equal, BLOCK_N-aligned share of its
keys and writes a float32 partial output and its log-sum-exp (base 2) to [B, Hq, S(, D)]; a merge kernel
combines the splits. An empty split writes lse = -inf and a zero partial, which the merge weighs by 0.

Cascade: one launch runs two kinds of programs side by side: prefix programs, whose rows are all branches of a
group times the query heads of one kv head and which read the group's shared prefix once, and suffix programs,
which run the paged decode over each row's own keys from the prefix end to its context length. The merge
kernel then combines the prefix and suffix partials by log-sum-exp.

Any head_dim up to 256: tiles span BLOCK_D = the next power of two, lanes past head_dim load as zeros and are
never stored (see `head_dim.py`); the partials are stored head_dim wide.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from selfrag_engine.kernels import Target, as_target, target_of
from selfrag_engine.kernels.head_dim import MAX_HEAD_DIM, head_block, with_d_mask
from selfrag_engine.kernels.kv_fp8 import kv_pool_args

__all__ = ["paged_decode_attention", "cascade_decode_attention", "default_num_splits"]

_LOG2E = 1.4426950408889634
_MIN_KEYS_PER_SPLIT = 256


@triton.jit
def _attend_range(q, k_base, v_base, table_row, lo, hi, qk_scale,
                  stride_kb, stride_ks, stride_vb, stride_vs, ks_ptr, vs_ptr, kv_head,
                  ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, KV_FP8: tl.constexpr):
    """Unnormalized attention of q [ROWS, BLOCK_D] over keys lo..hi-1 of one table row: (acc, running max, sum).
    A float8 pool is read as such, converted exactly to q's dtype, its kv head's k scale folded into qk_scale
    and its v scale into acc."""
    if KV_FP8:
        qk_scale = qk_scale * tl.load(ks_ptr + kv_head)
    offs_d = tl.arange(0, BLOCK_D)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        key_ok = offs_n < hi
        blk = tl.load(table_row + offs_n // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        slot_in_blk = offs_n % BLOCK_SIZE
        # Masked loads: slots past the context may hold stale data (even NaN) that 0 * x would let through.
        # The lane masks inline, not through with_d_mask: a nested call per tile is slow in the interpreter.
        if HEAD_DIM != BLOCK_D:
            k_mask = key_ok[None, :] & (offs_d[:, None] < HEAD_DIM)
            v_mask = key_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        else:
            k_mask = key_ok[None, :]
            v_mask = key_ok[:, None]
        k = tl.load(k_base + blk[None, :] * stride_kb + slot_in_blk[None, :] * stride_ks + offs_d[:, None],
                    mask=k_mask, other=0.0)
        s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PREC) * qk_scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        # Each tile holds at least one real key, so m_new is finite and exp2(-inf - m_new) is a clean 0.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + blk[:, None] * stride_vb + slot_in_blk[:, None] * stride_vs + offs_d[None, :],
                    mask=v_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC)
        m_i = m_new
    if KV_FP8:
        acc = acc * tl.load(vs_ptr + kv_head)
    return acc, m_i, l_i


@triton.jit
def _store_partial(acc, m_i, l_i, part_o_ptr, part_lse_ptr, part_index, row_ok, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """Writes acc / l and its base-2 lse at flat partial index part_index [ROWS] (index of (b, h, split))."""
    offs_d = tl.arange(0, BLOCK_D)
    empty = l_i == 0.0
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    idx = part_index.to(tl.int64)
    tl.store(part_lse_ptr + idx, lse, mask=row_ok)
    tl.store(part_o_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :], o,
             mask=with_d_mask(row_ok[:, None], offs_d[None, :], HEAD_DIM, BLOCK_D))


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_o_ptr, part_lse_ptr, bt_ptr, ctx_ptr, ks_ptr, vs_ptr, qk_scale,
    stride_qb, stride_qh, stride_qd, stride_ob, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    num_heads, num_splits,
    GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DIRECT: tl.constexpr, DOT_PREC: tl.constexpr, KV_FP8: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, ROWS)
    row_ok = rows < GROUP
    heads = kv_head * GROUP + rows
    io_mask = with_d_mask(row_ok[:, None], offs_d[None, :], HEAD_DIM, BLOCK_D)
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=io_mask, other=0.0)
    ctx = tl.load(ctx_ptr + seq)
    per_split = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, ctx)
    acc, m_i, l_i = _attend_range(q, k_ptr + kv_head * stride_kh, v_ptr + kv_head * stride_vh,
                                  bt_ptr + seq.to(tl.int64) * stride_bt, lo, hi, qk_scale,
                                  stride_kb, stride_ks, stride_vb, stride_vs, ks_ptr, vs_ptr, kv_head,
                                  ROWS, BLOCK_SIZE, BLOCK_N, HEAD_DIM, BLOCK_D, DOT_PREC, KV_FP8)
    if DIRECT:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        part_index = (seq * num_heads + heads) * num_splits + split
        _store_partial(acc, m_i, l_i, part_o_ptr, part_lse_ptr, part_index, row_ok, HEAD_DIM, BLOCK_D)


@triton.jit
def _merge_kernel(part_o_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh, num_heads, num_splits,
                  BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    split_ok = offs_s < num_splits
    base = ((seq * num_heads + head) * num_splits).to(tl.int64)
    lse = tl.load(part_lse_ptr + base + offs_s, mask=split_ok, other=float("-inf"))
    # Empty splits get weight exp2(-inf) = 0. A row with no keys at all (context 0, e.g. batch padding) has
    # a max of -inf; it is replaced so that the row comes out as zeros rather than NaN.
    mx = tl.max(lse, axis=0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp2(lse - mx)
    o = tl.load(part_o_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=with_d_mask(split_ok[:, None], offs_d[None, :], HEAD_DIM, BLOCK_D), other=0.0)
    total = tl.sum(w, axis=0)
    merged = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0, total, 1.0)
    if HEAD_DIM != BLOCK_D:
        tl.store(out_ptr + seq.to(tl.int64) * stride_ob + head * stride_oh + offs_d,
                 merged.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)
    else:
        tl.store(out_ptr + seq.to(tl.int64) * stride_ob + head * stride_oh + offs_d,
                 merged.to(out_ptr.dtype.element_ty))


@triton.jit
def _cascade_prefix_program(
    pid, q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr, bt_ptr, gs_ptr, pb_ptr, ks_ptr, vs_ptr, qk_scale,
    stride_qb, stride_qh, stride_qd, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    num_heads, num_kv_heads, row_tiles, prefix_splits, total_splits,
    GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, KV_FP8: tl.constexpr,
):
    """Rows = every branch of one group x the query heads of one kv head, over one split of the shared prefix."""
    split = pid % prefix_splits
    rest = pid // prefix_splits
    row_tile = rest % row_tiles
    rest = rest // row_tiles
    kv_head = rest % num_kv_heads
    group = rest // num_kv_heads
    g_lo = tl.load(gs_ptr + group)
    branches = tl.load(gs_ptr + group + 1) - g_lo
    if row_tile * ROWS < branches * GROUP:
        offs_d = tl.arange(0, BLOCK_D)
        r = row_tile * ROWS + tl.arange(0, ROWS)
        row_ok = (r // GROUP) < branches
        seq = g_lo + r // GROUP
        heads = kv_head * GROUP + r % GROUP
        q = tl.load(q_ptr + seq.to(tl.int64)[:, None] * stride_qb + heads[:, None] * stride_qh
                    + offs_d[None, :] * stride_qd,
                    mask=with_d_mask(row_ok[:, None], offs_d[None, :], HEAD_DIM, BLOCK_D), other=0.0)
        prefix_len = tl.load(pb_ptr + group) * BLOCK_SIZE
        per_split = tl.cdiv(tl.cdiv(prefix_len, prefix_splits), BLOCK_N) * BLOCK_N
        lo = split * per_split
        hi = tl.minimum(lo + per_split, prefix_len)
        # The group's first row's table stands for all: its prefix blocks are the shared ones.
        acc, m_i, l_i = _attend_range(q, k_ptr + kv_head * stride_kh, v_ptr + kv_head * stride_vh,
                                      bt_ptr + g_lo.to(tl.int64) * stride_bt, lo, hi, qk_scale,
                                      stride_kb, stride_ks, stride_vb, stride_vs, ks_ptr, vs_ptr, kv_head,
                                      ROWS, BLOCK_SIZE, BLOCK_N, HEAD_DIM, BLOCK_D, DOT_PREC, KV_FP8)
        part_index = (seq * num_heads + heads) * total_splits + split
        _store_partial(acc, m_i, l_i, part_o_ptr, part_lse_ptr, part_index, row_ok, HEAD_DIM, BLOCK_D)


@triton.jit
def _cascade_suffix_program(
    pid, q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr, bt_ptr, ctx_ptr, gs_ptr, pb_ptr, ks_ptr, vs_ptr, qk_scale,
    stride_qb, stride_qh, stride_qd, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    num_heads, num_kv_heads, num_groups, prefix_splits, suffix_splits, total_splits,
    GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, KV_FP8: tl.constexpr,
):
    """Paged decode of one row's own keys (prefix end to context end) for the query heads of one kv head."""
    split = pid % suffix_splits
    rest = pid // suffix_splits
    kv_head = rest % num_kv_heads
    seq = rest // num_kv_heads
    # The row's group: how many groups end at or before this row.
    offs_g = tl.arange(0, BLOCK_G)
    g_end = tl.load(gs_ptr + 1 + offs_g, mask=offs_g < num_groups, other=2147483647)
    group = tl.sum((g_end <= seq).to(tl.int32), axis=0)
    prefix_len = tl.load(pb_ptr + group) * BLOCK_SIZE
    ctx = tl.load(ctx_ptr + seq)
    suffix_len = tl.maximum(ctx - prefix_len, 0)
    per_split = tl.cdiv(tl.cdiv(suffix_len, suffix_splits), BLOCK_N) * BLOCK_N
    lo = prefix_len + split * per_split
    hi = tl.minimum(lo + per_split, ctx)
    offs_d = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, ROWS)
    row_ok = rows < GROUP
    heads = kv_head * GROUP + rows
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=with_d_mask(row_ok[:, None], offs_d[None, :], HEAD_DIM, BLOCK_D), other=0.0)
    acc, m_i, l_i = _attend_range(q, k_ptr + kv_head * stride_kh, v_ptr + kv_head * stride_vh,
                                  bt_ptr + seq.to(tl.int64) * stride_bt, lo, hi, qk_scale,
                                  stride_kb, stride_ks, stride_vb, stride_vs, ks_ptr, vs_ptr, kv_head,
                                  ROWS, BLOCK_SIZE, BLOCK_N, HEAD_DIM, BLOCK_D, DOT_PREC, KV_FP8)
    part_index = (seq * num_heads + heads) * total_splits + prefix_splits + split
    _store_partial(acc, m_i, l_i, part_o_ptr, part_lse_ptr, part_index, row_ok, HEAD_DIM, BLOCK_D)


@triton.jit
def _cascade_kernel(
    q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr, bt_ptr, ctx_ptr, gs_ptr, pb_ptr, ks_ptr, vs_ptr, qk_scale,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    num_heads, num_kv_heads, num_groups, row_tiles, prefix_splits, suffix_splits, num_prefix_programs,
    GROUP: tl.constexpr, ROWS_P: tl.constexpr, ROWS_S: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, KV_FP8: tl.constexpr,
):
    # One launch for both kinds of programs, prefix ones first: they carry the most keys each. The two kinds
    # live in separate functions because the branches of a runtime `if` may not bind names of different types.
    pid = tl.program_id(0)
    total_splits = prefix_splits + suffix_splits
    if pid < num_prefix_programs:
        _cascade_prefix_program(
            pid, q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr, bt_ptr, gs_ptr, pb_ptr, ks_ptr, vs_ptr, qk_scale,
            stride_qb, stride_qh, stride_qd, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            stride_bt, num_heads, num_kv_heads, row_tiles, prefix_splits, total_splits,
            GROUP, ROWS_P, BLOCK_SIZE, BLOCK_N, HEAD_DIM, BLOCK_D, DOT_PREC, KV_FP8)
    else:
        _cascade_suffix_program(
            pid - num_prefix_programs, q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr, bt_ptr, ctx_ptr, gs_ptr,
            pb_ptr, ks_ptr, vs_ptr, qk_scale, stride_qb, stride_qh, stride_qd, stride_kb, stride_ks, stride_kh,
            stride_vb, stride_vs, stride_vh, stride_bt, num_heads, num_kv_heads, num_groups, prefix_splits,
            suffix_splits, total_splits, GROUP, ROWS_S, BLOCK_G, BLOCK_SIZE, BLOCK_N, HEAD_DIM, BLOCK_D, DOT_PREC,
            KV_FP8)


def _target_programs(target: Target) -> int:
    if target.interpreter:
        # The interpreter runs programs one by one: splitting only adds work there.
        return 1
    # Two waves' worth of programs hides the tail of the slowest split.
    return 2 * target.num_sms


def default_num_splits(batch: int, num_kv_heads: int, max_context_len: int,
                       where: Target | torch.device | str) -> int:
    """Splits per sequence so that batch * kv_heads * splits fills the device (a Target, or a device), each
    split >= 256 keys."""
    programs = max(1, batch * num_kv_heads)
    wanted = triton.cdiv(_target_programs(as_target(where)), programs)
    by_length = max(1, max_context_len // _MIN_KEYS_PER_SPLIT)
    return max(1, min(wanted, by_length, 64))


def _block_n(head_dim: int, block_size: int, target: Target, narrow: bool = False) -> int:
    """Keys per tile. `narrow`: half the tile, where the wide one spills (bench/aot_compile.py)."""
    if target.interpreter:
        return max(16, block_size)
    return max(64 if head_block(head_dim) <= 128 and not narrow else 32, block_size)


def _rows(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _check_common(q, k_cache, v_cache, block_tables, context_lens) -> tuple[int, int, int, int, int]:
    _check(q.dim() == 3, f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    batch, num_heads, head_dim = q.shape
    _check(k_cache.dim() == 4 and k_cache.shape == v_cache.shape,
           "k_cache and v_cache must both be [num_blocks, block_size, kv_heads, head_dim]")
    _, block_size, num_kv_heads, pool_dim = k_cache.shape
    _check(pool_dim == head_dim, f"pool head_dim {pool_dim} differs from q head_dim {head_dim}")
    _check(1 <= head_dim <= MAX_HEAD_DIM, f"head_dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    _check(block_size & (block_size - 1) == 0, f"block_size must be a power of two, got {block_size}")
    _check(num_heads % num_kv_heads == 0, f"num_heads {num_heads} is not a multiple of kv heads {num_kv_heads}")
    _check(q.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {q.dtype}")
    _check(k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "the pool's last dim must be contiguous")
    _check(block_tables.dim() == 2 and block_tables.shape[0] == batch and block_tables.dtype == torch.int32,
           f"block_tables must be int32 [{batch}, max_blocks]")
    _check(context_lens.shape == (batch,) and context_lens.dtype == torch.int32,
           f"context_lens must be int32 [{batch}]")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                    ("context_lens", context_lens)):
        _check(t.device == q.device, f"{name} is on {t.device}, q on {q.device}")
    return batch, num_heads, head_dim, block_size, num_kv_heads


def _merge(part_o, part_lse, out, num_splits: int) -> None:
    batch, num_heads, head_dim = out.shape
    _merge_kernel[(batch, num_heads)](
        part_o, part_lse, out, out.stride(0), out.stride(1), num_heads, num_splits,
        BLOCK_S=max(2, triton.next_power_of_2(num_splits)), HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim),
        num_warps=4,
    )


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           num_splits: int | None = None, max_context_len: int | None = None,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query per sequence over its paged keys; returns [B, Hq, D] in q's dtype. A float8
    pool takes its scales k_scale, v_scale float32 [Hkv].

    num_splits: splits per sequence (None: default_num_splits). max_context_len only feeds that heuristic;
    when both are None it is read from context_lens, which synchronizes with the device.
    """
    batch, num_heads, head_dim, block_size, num_kv_heads = _check_common(q, k_cache, v_cache, block_tables,
                                                                          context_lens)
    fp8, k_scale, v_scale = kv_pool_args(q, k_cache, v_cache, k_scale, v_scale)
    out = torch.empty((batch, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    target = target_of(q.device)
    if num_splits is None:
        if max_context_len is None:
            max_context_len = int(context_lens.max())
        num_splits = default_num_splits(batch, num_kv_heads, max_context_len, target)
    _check(num_splits >= 1, f"num_splits must be >= 1, got {num_splits}")
    group = num_heads // num_kv_heads
    direct = num_splits == 1
    if direct:
        part_o = part_lse = out
    else:
        part_o = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, part_o, part_lse, block_tables, context_lens, k_scale, v_scale,
        float(scale) * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        num_heads, num_splits,
        GROUP=group, ROWS=_rows(group), BLOCK_SIZE=block_size,
        # e4m3 -> bf16 goes through float32 on sm_90: at 64 keys a tile the split kernel spills (as does the
        # cascade under triton 3.6).
        BLOCK_N=_block_n(head_dim, block_size, target, narrow=fp8 and q.dtype == torch.bfloat16),
        HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim), DIRECT=direct, DOT_PREC=_dot_prec(q.dtype), KV_FP8=fp8,
        num_warps=4, num_stages=2,
    )
    if not direct:
        _merge(part_o, part_lse, out, num_splits)
    return out


def cascade_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             block_tables: torch.Tensor, context_lens: torch.Tensor, group_start: torch.Tensor,
                             prefix_blocks: torch.Tensor, scale: float, *, max_group_size: int | None = None,
                             max_context_len: int | None = None, prefix_splits: int | None = None,
                             suffix_splits: int = 1, k_scale: torch.Tensor | None = None,
                             v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention with each group's shared prefix read once for all its rows; returns [B, Hq, D]. A float8
    pool takes its scales k_scale, v_scale float32 [Hkv].

    max_group_size (rows in the largest group) sizes the prefix programs and max_context_len feeds the split
    heuristic; either one left None is read from the device tensors, which synchronizes.
    """
    batch, num_heads, head_dim, block_size, num_kv_heads = _check_common(q, k_cache, v_cache, block_tables,
                                                                          context_lens)
    fp8, k_scale, v_scale = kv_pool_args(q, k_cache, v_cache, k_scale, v_scale)
    _check(group_start.dim() == 1 and group_start.dtype == torch.int32 and group_start.numel() >= 1,
           "group_start must be int32 [G+1]")
    num_groups = group_start.numel() - 1
    _check(prefix_blocks.shape == (num_groups,) and prefix_blocks.dtype == torch.int32,
           f"prefix_blocks must be int32 [{num_groups}]")
    _check(group_start.device == q.device and prefix_blocks.device == q.device,
           "group_start and prefix_blocks must be on q's device")
    _check(suffix_splits >= 1, f"suffix_splits must be >= 1, got {suffix_splits}")
    out = torch.empty((batch, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    _check(num_groups >= 1, "a non-empty batch needs at least one group")
    if max_group_size is None:
        max_group_size = int((group_start[1:] - group_start[:-1]).max())
    _check(max_group_size >= 1, f"max_group_size must be >= 1, got {max_group_size}")
    target = target_of(q.device)
    group = num_heads // num_kv_heads
    prefix_rows = max_group_size * group
    rows_p = min(_rows(prefix_rows), 64)
    row_tiles = triton.cdiv(prefix_rows, rows_p)
    if prefix_splits is None:
        if max_context_len is None:
            max_context_len = int(context_lens.max())
        prefix_splits = default_num_splits(num_groups * row_tiles, num_kv_heads, max_context_len, target)
    _check(prefix_splits >= 1, f"prefix_splits must be >= 1, got {prefix_splits}")
    total_splits = prefix_splits + suffix_splits
    part_o = torch.empty((batch, num_heads, total_splits, head_dim), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((batch, num_heads, total_splits), dtype=torch.float32, device=q.device)
    num_prefix_programs = num_groups * num_kv_heads * row_tiles * prefix_splits
    num_suffix_programs = batch * num_kv_heads * suffix_splits
    _cascade_kernel[(num_prefix_programs + num_suffix_programs,)](
        q, k_cache, v_cache, part_o, part_lse, block_tables, context_lens, group_start, prefix_blocks,
        k_scale, v_scale, float(scale) * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        num_heads, num_kv_heads, num_groups, row_tiles, prefix_splits, suffix_splits, num_prefix_programs,
        GROUP=group, ROWS_P=rows_p, ROWS_S=_rows(group), BLOCK_G=max(2, triton.next_power_of_2(num_groups)),
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        BLOCK_N=_block_n(head_dim, block_size, target, narrow=fp8 and q.dtype == torch.bfloat16),
        BLOCK_D=head_block(head_dim), DOT_PREC=_dot_prec(q.dtype), KV_FP8=fp8, num_warps=4, num_stages=2,
    )
    _merge(part_o, part_lse, out, total_splits)
    return out
