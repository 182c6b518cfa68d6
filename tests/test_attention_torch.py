"""The torch attention path (the CPU engine's attention) against the float64 oracle and the float32 reference.

Pools are NaN wherever no sequence's context lies, and block tables are padded with a NaN block or -1, so a
read past a context or of padding shows up as NaN.
"""
from __future__ import annotations

import pytest
import torch

import selfrag_engine.layers.attention as attention
from selfrag_engine.layers.attention import AttentionMetadata, KVCache, paged_attention_torch
from tests.test_kernels_attention import _gen, make_pool, naive_attention_f64, ref_attention


def _meta(pool, q_lens: list[int], ctx_lens: list[int]) -> AttentionMetadata:
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    return AttentionMetadata(
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32), context_lens=torch.tensor(ctx_lens, dtype=torch.int32),
        block_tables=pool.block_tables.cpu(), slot_mapping=torch.zeros(cu[-1], dtype=torch.long),
        max_q_len=max(q_lens), max_context_len=max(ctx_lens), q_lens_host=q_lens, context_lens_host=ctx_lens)


def _case(q_lens, ctx_lens, block_size, heads, kv_heads, head_dim, seed, pad="poison"):
    gen = _gen(seed)
    pool = make_pool(ctx_lens, block_size, kv_heads, head_dim, torch.float32, gen, pad=pad)
    pool.k_cache, pool.v_cache = pool.k_cache.cpu(), pool.v_cache.cpu()
    q = torch.randn((sum(q_lens), heads, head_dim), generator=gen)
    return pool, q


@pytest.mark.parametrize("q_lens,ctx_lens,heads,kv_heads", [
    ([3, 1, 5, 1], [7, 17, 5, 9], 4, 4),      # prefill chunks mixed with decode rows
    ([1, 1, 1], [1, 12, 30], 4, 2),           # decode, grouped queries
    ([6, 2], [6, 19], 6, 2),                  # a whole prompt and a chunk after a cached prefix
])
@pytest.mark.parametrize("pad", ["poison", "minus_one"])
def test_matches_float64_oracle(q_lens, ctx_lens, heads, kv_heads, pad):
    pool, q = _case(q_lens, ctx_lens, 4, heads, kv_heads, 8, seed=len(q_lens) * 7 + heads, pad=pad)
    out = paged_attention_torch(q, KVCache(pool.k_cache, pool.v_cache), _meta(pool, q_lens, ctx_lens), 0.3)
    assert not torch.isnan(out).any()
    oracle = naive_attention_f64(q, pool.k_cache, pool.v_cache, pool.block_tables, q_lens, ctx_lens, 0.3)
    torch.testing.assert_close(out.double(), oracle, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("group_elements", [1, 3000, 1 << 24])
def test_groups_of_any_size_give_the_same_attention(group_elements, monkeypatch):
    # Small budgets split the batch into groups of one or a few sequences; large ones pad everything together.
    gen = _gen(5)
    q_lens = torch.randint(1, 40, (23,), generator=gen).tolist()
    ctx_lens = [n + int(torch.randint(0, 70, (), generator=gen)) for n in q_lens]
    pool, q = _case(q_lens, ctx_lens, 16, 4, 4, 16, seed=6)
    monkeypatch.setattr(attention, "_GROUP_ELEMENTS", group_elements)
    out = paged_attention_torch(q, KVCache(pool.k_cache, pool.v_cache), _meta(pool, q_lens, ctx_lens), 0.25)
    assert not torch.isnan(out).any()
    ref = ref_attention(q, pool.k_cache, pool.v_cache, pool.block_tables, q_lens, ctx_lens, 0.25)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_decode_of_64_rows_with_bf16_pool():
    gen = _gen(9)
    ctx_lens = torch.randint(1, 90, (64,), generator=gen).tolist()
    pool, q = _case([1] * 64, ctx_lens, 16, 4, 4, 32, seed=10)
    pool.k_cache, pool.v_cache = pool.k_cache.bfloat16(), pool.v_cache.bfloat16()
    q = q.bfloat16()
    out = paged_attention_torch(q, KVCache(pool.k_cache, pool.v_cache), _meta(pool, [1] * 64, ctx_lens), 32 ** -0.5)
    assert out.dtype == torch.bfloat16 and not torch.isnan(out).any()
    ref = ref_attention(q, pool.k_cache, pool.v_cache, pool.block_tables, [1] * 64, ctx_lens, 32 ** -0.5)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=5e-2)


def test_empty_context_row_gives_zeros():
    # A padding row of a decode batch (context 0) comes out as zeros, not NaN.
    pool, q = _case([1, 1, 1], [5, 1, 17], 8, 2, 1, 16, seed=11)
    meta = _meta(pool, [1, 1, 1], [5, 0, 17])
    out = paged_attention_torch(q, KVCache(pool.k_cache, pool.v_cache), meta, 0.25)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    ref = ref_attention(q[[0, 2]], pool.k_cache, pool.v_cache, pool.block_tables[[0, 2]], [1, 1], [5, 17], 0.25)
    torch.testing.assert_close(out[[0, 2]], ref, atol=2e-5, rtol=1e-4)
