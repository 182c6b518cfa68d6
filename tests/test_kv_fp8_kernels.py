"""The FP8 KV cache in the Triton kernels (run by the interpreter here): e4m3 encoding with integer ops against
torch's cast and the format's float64 definition; the rotary/KV store writing the bytes the torch path writes;
prefill, paged decode and cascade decode over float8 pools against float64 references over the dequantized
(FP8-rounded) keys and values; and the engine on the kernels with an FP8 pool against the torch path.

Pools start as NaN (e4m3fn's NaN) wherever no sequence wrote, and wrapper outputs are NaN-poisoned."""
from __future__ import annotations

import pytest
import torch

from selfrag_engine import Engine, SamplingParams
from selfrag_engine.kernels.decode_attention import cascade_decode_attention, paged_decode_attention
from selfrag_engine.kernels.kv_fp8 import quantize_e4m3
from selfrag_engine.kernels.prefill_attention import prefill_attention
from selfrag_engine.kernels.rotary_kv import rotary_and_store_kv
from selfrag_engine.layers.attention import FP8_KV_DTYPE, KVCache, dequantize_kv, quantize_kv, store_kv
from selfrag_engine.models.llama import apply_rotary
from tests.helpers import rel_err, tiny_checkpoint
from tests.test_kernels_attention import DEVICE, make_cascade_pool, make_pool, ref_attention, rope_tables
from tests.test_kv_fp8 import e4m3_round


def test_e4m3_encoding_equals_torch_cast_and_the_format_definition():
    g = torch.Generator().manual_seed(11)
    n = 4096
    x = torch.cat([torch.randn(n, generator=g) * s for s in (1e-3, 1e-2, 1.0, 100.0, 1000.0)])
    # Ties to even at both ends of the normal range, the largest subnormal, saturation, signed zeros.
    x[:10] = torch.tensor([1.0625, 1.1875, 3 * 2.0 ** -10, 2.0 ** -10, 464.0, -464.0, 0.0, -0.0, 7.5 * 2.0 ** -9,
                           -1e30])
    for scale in (1.0, 2.0 ** -3, 2.0 ** 4):
        got = quantize_e4m3(x, scale)
        assert torch.equal(got.view(torch.uint8), (x / scale).to(torch.float8_e4m3fn).view(torch.uint8))
        assert torch.equal(got.double(), e4m3_round(x.double() / scale))
    half = x.clamp(-60000, 60000).half()
    assert torch.equal(quantize_e4m3(half).view(torch.uint8), half.float().to(torch.float8_e4m3fn).view(torch.uint8))


def _scales(kv_heads: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Powers of two per head, different for K and V."""
    return (torch.exp2(torch.randint(-6, -1, (kv_heads,), generator=gen).float()).to(DEVICE),
            torch.exp2(torch.randint(-6, -1, (kv_heads,), generator=gen).float()).to(DEVICE))


def _fp8_pool(pool, gen):
    """The pool's K/V (NaN where unused) quantized with per-head scales; returns (k8, v8, ks, vs)."""
    ks, vs = _scales(pool.k_cache.shape[2], gen)
    # Values spread over the scales' range, so that rounding, not saturation, is what is tested.
    k = pool.k_cache.float() * ks[:, None] * 40
    v = pool.v_cache.float() * vs[:, None] * 40
    flat = lambda x: x.view(-1, *x.shape[2:])  # noqa: E731
    k8 = quantize_kv(flat(k), ks).view(k.shape)
    v8 = quantize_kv(flat(v), vs).view(v.shape)
    return k8, v8, ks, vs


def _dequant(x8, scale):
    return dequantize_kv(x8.view(-1, *x8.shape[2:]), scale).view(x8.shape).double()


@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 64), (torch.float16, 48)])
def test_rotary_store_writes_the_torch_paths_bytes(dtype, head_dim):
    g = torch.Generator().manual_seed(21)
    tokens, heads, kv_heads, block_size, num_blocks = 11, 4, 2, 4, 6
    cos, sin = rope_tables(64, head_dim)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=g).mul(3).to(dtype=dtype, device=DEVICE)
    q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
    positions = torch.randint(0, 64, (tokens,), generator=g).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens].to(DEVICE)
    slots[3] = -1  # skipped
    ks, vs = _scales(kv_heads, g)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    pools = [KVCache(torch.full(shape, float("nan"), device=DEVICE).to(FP8_KV_DTYPE),
                     torch.full(shape, float("nan"), device=DEVICE).to(FP8_KV_DTYPE), ks, vs) for _ in range(2)]
    q_kernel = q.clone()
    rotary_and_store_kv(q_kernel, k, v, positions, cos, sin, pools[0].k, pools[0].v, slots, ks, vs)
    c, s = cos[positions], sin[positions]
    store_kv(apply_rotary(k, c, s), v, pools[1], slots)
    for a, b in ((pools[0].k, pools[1].k), (pools[0].v, pools[1].v)):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert int((pools[0].k.float().isnan()).sum()) == (num_blocks * block_size - tokens + 1) * kv_heads * head_dim
    assert torch.allclose(q_kernel.float(), apply_rotary(q, c, s).float(), atol=1e-3)


def test_rotary_store_rejects_missing_scales():
    q = torch.randn(2, 2, 16, device=DEVICE)
    k = torch.randn(2, 2, 16, device=DEVICE)
    cos, sin = rope_tables(8, 16)
    pool = torch.zeros(2, 4, 2, 16, device=DEVICE).to(FP8_KV_DTYPE)
    with pytest.raises(ValueError, match="k_scale"):
        rotary_and_store_kv(q, k, k, torch.zeros(2, dtype=torch.long, device=DEVICE), cos, sin, pool, pool,
                            torch.zeros(2, dtype=torch.long, device=DEVICE))


@pytest.mark.parametrize("dtype,heads,kv_heads,head_dim,num_splits",
                         [(torch.float32, 4, 2, 32, 1), (torch.float32, 4, 4, 48, 3), (torch.float16, 8, 2, 64, 2)])
def test_paged_decode_over_fp8(dtype, heads, kv_heads, head_dim, num_splits, poisoned_alloc):
    g = torch.Generator().manual_seed(22)
    ctx = [37, 5, 64]
    pool = make_pool(ctx, 16, kv_heads, head_dim, torch.float32, g)
    k8, v8, ks, vs = _fp8_pool(pool, g)
    q = torch.randn(len(ctx), heads, head_dim, generator=g).to(dtype=dtype, device=DEVICE)
    out = paged_decode_attention(q, k8, v8, pool.block_tables, pool.context_lens, head_dim ** -0.5,
                                 num_splits=num_splits, k_scale=ks, v_scale=vs)
    want = ref_attention(q, _dequant(k8, ks), _dequant(v8, vs), pool.block_tables, [1] * len(ctx), ctx,
                         head_dim ** -0.5, compute=torch.float64)
    assert out.dtype == dtype and not out.isnan().any()
    assert rel_err(out, want) < (2e-5 if dtype == torch.float32 else 3e-3)


@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 32), (torch.float16, 48)])
def test_cascade_decode_over_fp8(dtype, head_dim, poisoned_alloc):
    g = torch.Generator().manual_seed(23)
    heads, kv_heads = 4, 2
    pool, group_start, prefix_blocks = make_cascade_pool([(2, [3, 9, 17]), (0, [21]), (1, [1, 4])], 16, kv_heads,
                                                         head_dim, torch.float32, g)
    k8, v8, ks, vs = _fp8_pool(pool, g)
    b = len(pool.ctx_lens)
    q = torch.randn(b, heads, head_dim, generator=g).to(dtype=dtype, device=DEVICE)
    out = cascade_decode_attention(q, k8, v8, pool.block_tables, pool.context_lens, group_start, prefix_blocks,
                                   head_dim ** -0.5, k_scale=ks, v_scale=vs)
    want = ref_attention(q, _dequant(k8, ks), _dequant(v8, vs), pool.block_tables, [1] * b, pool.ctx_lens,
                         head_dim ** -0.5, compute=torch.float64)
    assert not out.isnan().any()
    assert rel_err(out, want) < (2e-5 if dtype == torch.float32 else 3e-3)


@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 32), (torch.float16, 48)])
def test_prefill_over_fp8(dtype, head_dim, poisoned_alloc):
    g = torch.Generator().manual_seed(24)
    heads, kv_heads = 4, 2
    ctx, q_lens = [23, 40, 9], [23, 7, 9]  # a fresh prompt, a chunk over a cached prefix, another prompt
    pool = make_pool(ctx, 8, kv_heads, head_dim, torch.float32, g)
    k8, v8, ks, vs = _fp8_pool(pool, g)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=g).to(dtype=dtype, device=DEVICE)
    cu = torch.tensor([0, 23, 30, 39], dtype=torch.int32, device=DEVICE)
    out = prefill_attention(q, k8, v8, pool.block_tables, cu, pool.context_lens, head_dim ** -0.5, max(q_lens),
                            k_scale=ks, v_scale=vs)
    want = ref_attention(q, _dequant(k8, ks), _dequant(v8, vs), pool.block_tables, q_lens, ctx, head_dim ** -0.5,
                         compute=torch.float64)
    assert not out.isnan().any()
    assert rel_err(out, want) < (2e-5 if dtype == torch.float32 else 3e-3)


def test_engine_on_the_kernels_with_fp8_equals_the_torch_path():
    """Prefill, forked branches decoded with cascade attention, and the prefix cache, on the kernels with an
    FP8 pool: the same tokens as the torch path's FP8 pool, and close log-probabilities."""
    path = tiny_checkpoint(seed=27, num_key_value_heads=2)
    engines = [Engine.from_pretrained(path, progress=False, kv_cache_dtype="fp8", use_kernels=k, num_blocks=64)
               for k in (False, True)]
    assert engines[1].backend.kernels
    outs = []
    for engine in engines:
        prompt = engine.tokenizer.encode("### Instruction:\nWho was born in Veloria?\n\n### Response:\n")
        parent = engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0), keep_cache=True)
        engine.run([parent])
        kids = engine.fork(parent, [[5, 9], [6, 11, 13], [7]],
                           SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=1),
                           prefix_len=len(prompt))
        engine.release(parent)
        outs.append(engine.run(kids))
    for a, b in zip(*outs):
        assert a.token_ids == b.token_ids
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-3)
