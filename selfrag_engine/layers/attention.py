"""Attention over the paged KV cache: the metadata of a batch, K/V writes, and the torch reference.

Pool layout per layer: keys and values [num_blocks, block_size, kv_heads, head_dim]. Token i of a sequence
lives in block `block_tables[b, i // block_size]` at offset `i % block_size` (flat slot
block * block_size + offset). The torch code here is the CPU path and the oracle of the Triton kernels.

An FP8 pool (`kv_cache_dtype="fp8"`) holds float8 e4m3 keys and values with one static scale per layer and
kv head (`KVCache.k_scale`, `v_scale`; engine/kv_cache.py chooses them before any write): a stored byte is
x / scale rounded to e4m3, so a block's bytes depend on its tokens only, never on which branch wrote it, and
forked branches and the prefix cache share blocks exactly as with fp16. The scales are powers of two, so
dividing and multiplying by them is exact and the only rounding is the one to e4m3. The torch path's reads
dequantize to float32 (value = stored * scale) and attend in float32; the kernels convert the bytes exactly to
q's dtype as they load them and fold the scales into their math (kernels/kv_fp8.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from selfrag_engine.backend import Backend

# Called through their modules, so a test can wrap a kernel where attention dispatches to it.
from selfrag_engine.kernels import decode_attention, prefill_attention


FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_KV_MAX = 448.0  # the largest finite e4m3 value


@dataclass
class KVCache:
    """One layer's pool: k, v [num_blocks, block_size, kv_heads, head_dim] in the model's dtype, or float8 e4m3
    with k_scale, v_scale float32 [kv_heads] (powers of two; a stored value times its head's scale)."""
    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    @property
    def fp8(self) -> bool:
        return self.k_scale is not None


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [T, kv_heads, D] -> float8 e4m3 of x / scale[head], saturated at +-448 (what cannot be represented is
    clamped, never turned into NaN or inf)."""
    return (x.float() / scale[:, None]).clamp_(-FP8_KV_MAX, FP8_KV_MAX).to(FP8_KV_DTYPE)


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8 x [..., kv_heads, D] -> float32 x * scale[head]."""
    return x.float() * scale[:, None]


def _bytes(pool: torch.Tensor) -> torch.Tensor:
    """The pool as its index ops accept it: torch's CPU index_copy/index_select take no float8, but bytes."""
    return pool.view(torch.uint8) if pool.dtype == FP8_KV_DTYPE else pool


@dataclass
class CascadeMetadata:
    """A decode batch laid out in groups of rows that share leading KV blocks (see engine/prefix_groups.py).

    group_start: int32 [G+1], rows group_start[g]:group_start[g+1] form group g (every row is in one group)
    prefix_blocks: int32 [G], the first prefix_blocks[g] blocks of the rows of group g are the same physical,
        fully written blocks (0 for a row that shares nothing)
    Host values, so that the kernel's launch needs no read back from the device.
    """
    group_start: torch.Tensor
    prefix_blocks: torch.Tensor
    max_group_size: int
    max_suffix_len: int  # the most tokens of a row past its group's prefix


@dataclass
class AttentionMetadata:
    """Where the T flattened tokens of a batch of B sequences come from and go to.

    cu_seqlens_q: int32 [B+1], new tokens of sequence b are rows cu[b]:cu[b+1]
    context_lens: int32 [B], tokens of sequence b including the new ones
    block_tables: int32 [B, max_blocks], padded with -1
    slot_mapping: int64 [T], pool slot of each new token's K/V
    """
    cu_seqlens_q: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    max_q_len: int
    max_context_len: int
    # Host copies: the reference path loops over sequences and must not synchronize per step.
    q_lens_host: list[int]
    context_lens_host: list[int]
    # Decode only: read each group's shared prefix once (cascade decode). The kernels' choice; the torch
    # reference ignores it, since the result is the same attention.
    cascade: CascadeMetadata | None = None
    # The torch path's group index tensors, built by the first layer of a step (see paged_attention_torch).
    torch_plans: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_decode(self) -> bool:
        return self.max_q_len == 1


def store_kv(k: torch.Tensor, v: torch.Tensor, cache: KVCache, slot_mapping: torch.Tensor) -> None:
    """Writes k, v [T, kv_heads, head_dim] into the pool at slot_mapping [T] (negative slots skipped)."""
    num_blocks, block_size, kv_heads, head_dim = cache.k.shape
    flat_k = _bytes(cache.k).view(num_blocks * block_size, kv_heads, head_dim)
    flat_v = _bytes(cache.v).view(num_blocks * block_size, kv_heads, head_dim)
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    if cache.fp8:
        k, v = _bytes(quantize_kv(k, cache.k_scale)), _bytes(quantize_kv(v, cache.v_scale))
    flat_k.index_copy_(0, slot_mapping, k.to(flat_k.dtype))
    flat_v.index_copy_(0, slot_mapping, v.to(flat_v.dtype))


def paged_attention_torch(q: torch.Tensor, cache: KVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of the new tokens q [T, Hq, D] over each sequence's cached prefix plus themselves.

    Query j of sequence b sits at position context_len - q_len + j and sees keys 0..that position.
    Returns [T, Hq, D] in q's dtype. An FP8 pool is dequantized as it is gathered and attended in float32.

    Sequences of similar query length are padded into groups and attended with two batched matmuls per group,
    keys and values gathered head-major in one copy. A padded key position reads the sequence's own last key (written,
    hence finite) and gets weight 0, so neither padding nor what an earlier owner left in a block can leak in.
    The groups' index tensors depend on the batch only, so they are built by the first layer of a step and
    kept on `meta` for the others.
    """
    key = (cache.k.shape[1], q.shape[1], cache.k.shape[2], q.shape[2], q.device)
    plans = meta.torch_plans.get(key)
    if plans is None:
        plans = meta.torch_plans[key] = _plan(meta, *key)
    out = torch.empty_like(q)
    for plan in plans:
        _attend_group(q, cache, plan, scale, out)
    return out


# Elements of the largest padded score or gathered key tensor of one group (2 MiB of float32: a group stays in cache).
_GROUP_ELEMENTS = 1 << 19


@dataclass
class _GroupPlan:
    """Index tensors of one padded group of n sequences, shared by every layer of a step."""
    n: int
    max_q: int
    max_ctx: int
    kv_rows: torch.Tensor  # int64 [Hkv * n * max_ctx]: row of the pool viewed as [slots * Hkv, D] of every
    # (kv head, sequence, key position), head-major; positions past a context repeat its last written slot
    rows: torch.Tensor  # int64 [n * max_q]: token row of every query position (padding repeats the last)
    masked: torch.Tensor  # bool [1, n, rep * max_q, max_ctx]: key positions a query must not see
    out_rows: torch.Tensor  # int64 [T_group]: token rows of the real queries
    keep: torch.Tensor  # bool [n, max_q]: which query positions are real
    any_empty: bool  # some sequence has no context at all (its softmax row is all -inf)


def _groups(order: list[int], q_lens: list[int], ctx_lens: list[int], heads: int, kv_heads: int,
            head_dim: int) -> list[list[int]]:
    groups: list[list[int]] = []
    current: list[int] = []
    max_q = max_ctx = 0
    for b in order:
        mq, mc = max(max_q, q_lens[b]), max(max_ctx, ctx_lens[b])
        n = len(current) + 1
        if current and n * mc * max(heads * mq, kv_heads * head_dim) > _GROUP_ELEMENTS:
            groups.append(current)
            current, mq, mc = [], q_lens[b], ctx_lens[b]
        current.append(b)
        max_q, max_ctx = mq, mc
    if current:
        groups.append(current)
    return groups


def _plan(meta: AttentionMetadata, block_size: int, heads: int, kv_heads: int, head_dim: int,
          device: torch.device) -> list[_GroupPlan]:
    starts = [0]
    for q_len in meta.q_lens_host[:-1]:
        starts.append(starts[-1] + q_len)
    order = sorted(range(len(meta.q_lens_host)), key=meta.q_lens_host.__getitem__)
    rep = heads // kv_heads
    plans = []
    for group in _groups(order, meta.q_lens_host, meta.context_lens_host, heads, kv_heads, head_dim):
        q_lens = torch.tensor([meta.q_lens_host[b] for b in group], device=device)
        ctx = torch.tensor([meta.context_lens_host[b] for b in group], device=device)
        max_q = max(meta.q_lens_host[b] for b in group)
        max_ctx = max(meta.context_lens_host[b] for b in group)
        j = torch.arange(max_q, device=device)
        first = torch.tensor([starts[b] for b in group], device=device)
        rows = first[:, None] + torch.minimum(j[None, :], q_lens[:, None] - 1)
        pos = torch.minimum(torch.arange(max_ctx, device=device)[None, :], ctx[:, None] - 1).clamp(min=0)
        tables = meta.block_tables.index_select(0, torch.tensor(group, device=device)).long().clamp(min=0)
        slots = tables.gather(1, pos // block_size) * block_size + pos % block_size
        # Query j of a sequence sees keys up to ctx - q_len + j; an empty context sees none (its output is 0).
        last = (ctx - q_lens)[:, None] + torch.minimum(j[None, :], q_lens[:, None] - 1)
        mask = torch.arange(max_ctx, device=device)[None, None, :] <= last[:, :, None]  # [n, max_q, max_ctx]
        mask = mask & (ctx > 0)[:, None, None]
        keep = j[None, :] < q_lens[:, None]
        kv_rows = (slots[None] * kv_heads + torch.arange(kv_heads, device=device)[:, None, None]).flatten()
        plans.append(_GroupPlan(len(group), max_q, max_ctx, kv_rows, rows.flatten(),
                                ~mask.repeat(1, rep, 1)[None], rows[keep], keep,
                                any(meta.context_lens_host[b] == 0 for b in group)))
    return plans


def _attend_group(q: torch.Tensor, cache: KVCache, plan: _GroupPlan, scale: float, out: torch.Tensor) -> None:
    _, _, kv_heads, head_dim = cache.k.shape
    heads = q.shape[1]
    rep = heads // kv_heads
    n, max_q, max_ctx = plan.n, plan.max_q, plan.max_ctx
    # Gathered head-major in one copy, as the matmuls read them: [Hkv, n, max_ctx, D].
    k = _bytes(cache.k).view(-1, head_dim).index_select(0, plan.kv_rows).view(kv_heads, n, max_ctx, head_dim)
    v = _bytes(cache.v).view(-1, head_dim).index_select(0, plan.kv_rows).view(kv_heads, n, max_ctx, head_dim)
    dtype = q.dtype
    if cache.fp8:
        dtype = torch.float32
        k = k.view(FP8_KV_DTYPE).float() * cache.k_scale[:, None, None, None]
        v = v.view(FP8_KV_DTYPE).float() * cache.v_scale[:, None, None, None]
    # Queries [Hkv, n, rep * max_q, D], a kv head's `rep` query heads stacked along the rows.
    qg = q.index_select(0, plan.rows).view(n, max_q, kv_heads, rep, head_dim).permute(2, 0, 3, 1, 4)
    qg = qg.reshape(kv_heads, n, rep * max_q, head_dim).to(dtype)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(plan.masked, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    probs = probs.nan_to_num(0.0) if plan.any_empty else probs
    o = torch.matmul(probs, v)  # [Hkv, n, rep * max_q, D]
    o = o.view(kv_heads, n, rep, max_q, head_dim).permute(1, 3, 0, 2, 4).reshape(n, max_q, heads, head_dim)
    out[plan.out_rows] = o[plan.keep].to(q.dtype)


def paged_attention(q: torch.Tensor, cache: KVCache, meta: AttentionMetadata, scale: float,
                    backend: Backend) -> torch.Tensor:
    if not backend.kernels:
        return paged_attention_torch(q, cache, meta, scale)
    if meta.is_decode and meta.cascade is not None:
        c = meta.cascade
        # The suffix programs cover each row's own keys; split them only when some row has many.
        suffix_splits = decode_attention.default_num_splits(q.shape[0], cache.k.shape[2], c.max_suffix_len, q.device)
        return decode_attention.cascade_decode_attention(
            q, cache.k, cache.v, meta.block_tables, meta.context_lens, c.group_start, c.prefix_blocks, scale,
            max_group_size=c.max_group_size, max_context_len=meta.max_context_len, suffix_splits=suffix_splits,
            k_scale=cache.k_scale, v_scale=cache.v_scale)
    if meta.is_decode:
        return decode_attention.paged_decode_attention(q, cache.k, cache.v, meta.block_tables, meta.context_lens,
                                                       scale, max_context_len=meta.max_context_len,
                                                       k_scale=cache.k_scale, v_scale=cache.v_scale)
    return prefill_attention.prefill_attention(q, cache.k, cache.v, meta.block_tables, meta.cu_seqlens_q,
                                               meta.context_lens, scale, meta.max_q_len,
                                               k_scale=cache.k_scale, v_scale=cache.v_scale)
