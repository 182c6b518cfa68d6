"""Attention over the paged KV cache: the metadata of a batch, K/V writes, and the torch reference.

Pool layout per layer: keys and values [num_blocks, block_size, kv_heads, head_dim]. Token i of a sequence
lives in block `block_tables[b, i // block_size]` at offset `i % block_size` (flat slot
block * block_size + offset). The torch code here is the CPU path and the oracle of the Triton kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from selfrag_engine.backend import Backend

# Called through their modules, so a test can wrap a kernel where attention dispatches to it.
from selfrag_engine.kernels import decode_attention, prefill_attention


@dataclass
class KVCache:
    """One layer's pool: k, v [num_blocks, block_size, kv_heads, head_dim]."""
    k: torch.Tensor
    v: torch.Tensor


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

    @property
    def is_decode(self) -> bool:
        return self.max_q_len == 1


def store_kv(k: torch.Tensor, v: torch.Tensor, cache: KVCache, slot_mapping: torch.Tensor) -> None:
    """Writes k, v [T, kv_heads, head_dim] into the pool at slot_mapping [T] (negative slots skipped)."""
    num_blocks, block_size, kv_heads, head_dim = cache.k.shape
    flat_k = cache.k.view(num_blocks * block_size, kv_heads, head_dim)
    flat_v = cache.v.view(num_blocks * block_size, kv_heads, head_dim)
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    flat_k.index_copy_(0, slot_mapping, k.to(cache.k.dtype))
    flat_v.index_copy_(0, slot_mapping, v.to(cache.v.dtype))


def paged_attention_torch(q: torch.Tensor, cache: KVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of the new tokens q [T, Hq, D] over each sequence's cached prefix plus themselves.

    Query j of sequence b sits at position context_len - q_len + j and sees keys 0..that position.
    Returns [T, Hq, D] in q's dtype.

    Sequences of similar query length are padded into groups and attended with two batched matmuls per group,
    keys and values gathered head-major once. A padded key position reads the sequence's own last key (written,
    hence finite) and gets weight 0, so neither padding nor what an earlier owner left in a block can leak in.
    """
    out = torch.empty_like(q)
    starts = [0]
    for q_len in meta.q_lens_host[:-1]:
        starts.append(starts[-1] + q_len)
    order = sorted(range(len(meta.q_lens_host)), key=meta.q_lens_host.__getitem__)
    for group in _groups(order, meta.q_lens_host, meta.context_lens_host, q.shape[1], cache.k.shape[2],
                         q.shape[2]):
        _attend_group(q, cache, meta, scale, group, starts, out)
    return out


# Elements of the largest padded score or gathered key tensor of one group (2 MiB of float32: a group stays in cache).
_GROUP_ELEMENTS = 1 << 19


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


def _attend_group(q: torch.Tensor, cache: KVCache, meta: AttentionMetadata, scale: float, group: list[int],
                  starts: list[int], out: torch.Tensor) -> None:
    device = q.device
    num_blocks, block_size, kv_heads, head_dim = cache.k.shape
    heads = q.shape[1]
    rep = heads // kv_heads
    q_lens = torch.tensor([meta.q_lens_host[b] for b in group], device=device)
    ctx = torch.tensor([meta.context_lens_host[b] for b in group], device=device)
    max_q, max_ctx = int(q_lens.max()), int(ctx.max())
    n = len(group)
    index = torch.tensor(group, device=device)
    # Token rows of the group's queries [n, max_q]; padding repeats a sequence's last query (dropped below).
    j = torch.arange(max_q, device=device)
    first = torch.tensor([starts[b] for b in group], device=device)
    rows = first[:, None] + torch.minimum(j[None, :], q_lens[:, None] - 1)
    # Pool slots of every key position [n, max_ctx], clamped to the sequence's last written one.
    pos = torch.minimum(torch.arange(max_ctx, device=device)[None, :], ctx[:, None] - 1).clamp(min=0)
    tables = meta.block_tables.index_select(0, index).long().clamp(min=0)
    slots = tables.gather(1, pos // block_size) * block_size + pos % block_size
    # Gathered token-major (whole rows of the pool, the fast copy), then made head-major for the matmuls.
    flat = slots.flatten()
    k = cache.k.view(-1, kv_heads, head_dim).index_select(0, flat).view(n, max_ctx, kv_heads, head_dim)
    v = cache.v.view(-1, kv_heads, head_dim).index_select(0, flat).view(n, max_ctx, kv_heads, head_dim)
    k = k.permute(2, 0, 1, 3).contiguous()  # [Hkv, n, max_ctx, D]
    v = v.permute(2, 0, 1, 3).contiguous()
    # Queries [Hkv, n, rep * max_q, D], a kv head's `rep` query heads stacked along the rows.
    qg = q[rows.flatten()].view(n, max_q, kv_heads, rep, head_dim).permute(2, 0, 3, 1, 4)
    qg = qg.reshape(kv_heads, n, rep * max_q, head_dim)
    # Query j of a sequence sees keys up to ctx - q_len + j; an empty context sees none (its output is 0).
    last = (ctx - q_lens)[:, None] + torch.minimum(j[None, :], q_lens[:, None] - 1)
    mask = torch.arange(max_ctx, device=device)[None, None, :] <= last[:, :, None]  # [n, max_q, max_ctx]
    mask = mask & (ctx > 0)[:, None, None]
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask.repeat(1, rep, 1)[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = probs.nan_to_num(0.0) if bool((ctx == 0).any()) else probs
    o = torch.matmul(probs, v)  # [Hkv, n, rep * max_q, D]
    o = o.view(kv_heads, n, rep, max_q, head_dim).permute(1, 3, 0, 2, 4).reshape(n, max_q, heads, head_dim)
    keep = j[None, :] < q_lens[:, None]
    out[rows[keep]] = o[keep]


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
            max_group_size=c.max_group_size, max_context_len=meta.max_context_len, suffix_splits=suffix_splits)
    if meta.is_decode:
        return decode_attention.paged_decode_attention(q, cache.k, cache.v, meta.block_tables, meta.context_lens,
                                                       scale, max_context_len=meta.max_context_len)
    return prefill_attention.prefill_attention(q, cache.k, cache.v, meta.block_tables, meta.cu_seqlens_q,
                                               meta.context_lens, scale, meta.max_q_len)
