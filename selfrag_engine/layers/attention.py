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


def gather_kv(cache: KVCache, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `length` keys and values of one sequence, [length, kv_heads, head_dim] each."""
    block_size = cache.k.shape[1]
    blocks = block_table[: (length + block_size - 1) // block_size].long()
    k = cache.k[blocks].flatten(0, 1)[:length]
    v = cache.v[blocks].flatten(0, 1)[:length]
    return k, v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            mask: torch.Tensor | None) -> torch.Tensor:
    """q [..., Hq, Lq, D], k/v [..., Hkv, Lk, D]; softmax in float32 as Hugging Face's eager attention."""
    group = q.shape[-3] // k.shape[-3]
    if group > 1:
        k = k.repeat_interleave(group, dim=-3)
        v = v.repeat_interleave(group, dim=-3)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def paged_attention_torch(q: torch.Tensor, cache: KVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of the new tokens q [T, Hq, D] over each sequence's cached prefix plus themselves.

    Query j of sequence b sits at position context_len - q_len + j and sees keys 0..that position.
    Returns [T, Hq, D] in q's dtype.
    """
    if meta.is_decode:
        return _decode_torch(q, cache, meta, scale)
    out = torch.empty_like(q)
    start = 0
    for b, (q_len, ctx_len) in enumerate(zip(meta.q_lens_host, meta.context_lens_host)):
        k, v = gather_kv(cache, meta.block_tables[b], ctx_len)
        qb = q[start:start + q_len].transpose(0, 1)  # [Hq, q_len, D]
        q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
        mask = q_pos[:, None] >= torch.arange(ctx_len, device=q.device)[None, :]
        out[start:start + q_len] = _attend(qb, k.transpose(0, 1), v.transpose(0, 1), scale, mask).transpose(0, 1)
        start += q_len
    return out


def _decode_torch(q: torch.Tensor, cache: KVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One query per sequence: gather every sequence's K/V padded to the longest context, mask the rest."""
    block_size = cache.k.shape[1]
    max_blocks = (meta.max_context_len + block_size - 1) // block_size
    tables = meta.block_tables[:, :max_blocks].long().clamp(min=0)
    k = cache.k[tables].flatten(1, 2)  # [B, max_blocks * block_size, Hkv, D]
    v = cache.v[tables].flatten(1, 2)
    positions = torch.arange(k.shape[1], device=q.device)
    mask = positions[None, :] < meta.context_lens[:, None].long()  # [B, L]
    # Slots past a context hold whatever an earlier owner left (possibly NaN); 0 * NaN would leak through.
    v = v.masked_fill(~mask[:, :, None, None], 0)
    o = _attend(q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2), scale, mask[:, None, None, :])
    return o[:, :, 0, :]


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
