"""FP8 KV cache (`kv_cache_dtype="fp8"`): e4m3 rounding checked against a float64 formula, attention over an FP8
pool against a float64 reference over the rounded keys and values, the weight-bound scales never clipped, the
pool's bytes, and every engine feature (fork, copy-on-write, prefix cache, preemption, speculation, chunked
prefill) giving with an FP8 pool exactly what the same FP8 engine gives run plainly."""
from __future__ import annotations

import pytest
import torch

from selfrag_engine import Engine, SamplingParams
from selfrag_engine.engine.kv_cache import allocate_kv_caches, copy_blocks
from selfrag_engine.errors import EngineConfigError
from selfrag_engine.layers.attention import (
    FP8_KV_DTYPE,
    AttentionMetadata,
    KVCache,
    paged_attention_torch,
    quantize_kv,
    store_kv,
)
from selfrag_engine.models.kv_scales import kv_bounds
from tests.helpers import record_preemptions, rel_err, tiny_checkpoint


def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest-even e4m3 (3 mantissa bits, normals from 2^-6, subnormal step 2^-9, saturated at 448),
    in float64 by the format's definition."""
    x = x.double().clamp(-448.0, 448.0)
    exponent = torch.floor(torch.log2(x.abs().clamp(min=2.0 ** -6)))
    ulp = torch.exp2(exponent - 3)
    return torch.round(x / ulp) * ulp  # torch.round rounds half to even


@pytest.fixture(scope="module")
def path():
    return tiny_checkpoint(seed=27, num_key_value_heads=2)


def make_engine(path, **kw) -> Engine:
    """An FP8 engine whose pool starts as NaN bytes, so a read of a slot nobody wrote cannot go unnoticed."""
    engine = Engine.from_pretrained(path, progress=False, kv_cache_dtype="fp8", **kw)
    for cache in engine.kv_caches:
        cache.k.view(torch.uint8).fill_(0x7F)  # e4m3fn NaN
        cache.v.view(torch.uint8).fill_(0x7F)
    return engine


def _greedy(n=16, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def test_quantize_rounds_as_e4m3_and_saturates():
    g = torch.Generator().manual_seed(1)
    scale = torch.tensor([2.0 ** -3, 2.0 ** 2])
    x = torch.randn(64, 2, 16, generator=g) * torch.tensor([3.0, 300.0])[:, None]
    x[0, 1, :4] = torch.tensor([5000.0, -5000.0, 1e-6, -1e-6])  # saturates; underflows to zero
    got = quantize_kv(x, scale).double()
    want = e4m3_round(x.double() / scale.double()[:, None])
    assert torch.equal(got, want)
    assert not got.isnan().any() and got.abs().max() == 448.0


def _reference(q, keys, values, q_lens, ctx_lens, scale):
    """float64 causal attention of each sequence's new queries over its keys/values [ctx, Hkv, D]."""
    outs, start = [], 0
    heads, kv_heads = q.shape[1], keys[0].shape[1]
    for k, v, ql, cl in zip(keys, values, q_lens, ctx_lens):
        qs = q[start:start + ql].double()
        k = k.double().repeat_interleave(heads // kv_heads, 1)
        v = v.double().repeat_interleave(heads // kv_heads, 1)
        s = torch.einsum("qhd,khd->hqk", qs, k) * scale
        pos = torch.arange(cl - ql, cl)[:, None]
        s = s.masked_fill(torch.arange(cl)[None, :] > pos, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v))
        start += ql
    return torch.cat(outs)


def test_attention_over_an_fp8_pool_matches_float64_over_rounded_values():
    g = torch.Generator().manual_seed(2)
    heads, kv_heads, dim, block_size, num_blocks = 4, 2, 16, 4, 24
    q_lens, ctx_lens = [1, 5, 3], [9, 5, 14]
    k_scale, v_scale = torch.tensor([2.0 ** -4, 2.0 ** -2]), torch.tensor([2.0 ** -5, 2.0 ** -3])
    cache = KVCache(torch.full((num_blocks, block_size, kv_heads, dim), float("nan")).to(FP8_KV_DTYPE),
                    torch.full((num_blocks, block_size, kv_heads, dim), float("nan")).to(FP8_KV_DTYPE),
                    k_scale, v_scale)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, keys, values, slots = [], [], [], []
    for cl in ctx_lens:
        blocks = [perm.pop() for _ in range(-(-cl // block_size))]
        tables.append(blocks + [-1] * (4 - len(blocks)))
        keys.append(torch.randn(cl, kv_heads, dim, generator=g) * torch.tensor([5.0, 60.0])[:, None])
        values.append(torch.randn(cl, kv_heads, dim, generator=g) * 2)
        slots.append(torch.tensor([blocks[i // block_size] * block_size + i % block_size for i in range(cl)]))
    for k, v, s in zip(keys, values, slots):
        store_kv(k, v, cache, s)
    q = torch.randn(sum(q_lens), heads, dim, generator=g)
    meta = AttentionMetadata(
        cu_seqlens_q=torch.tensor([0, 1, 6, 9], dtype=torch.int32),
        context_lens=torch.tensor(ctx_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        slot_mapping=torch.zeros(sum(q_lens), dtype=torch.int64), max_q_len=5, max_context_len=14,
        q_lens_host=q_lens, context_lens_host=ctx_lens)
    out = paged_attention_torch(q, cache, meta, dim ** -0.5)
    rk = [e4m3_round(k.double() / k_scale.double()[:, None]) * k_scale.double()[:, None] for k in keys]
    rv = [e4m3_round(v.double() / v_scale.double()[:, None]) * v_scale.double()[:, None] for v in values]
    want = _reference(q, rk, rv, q_lens, ctx_lens, dim ** -0.5)
    assert out.dtype == q.dtype and not out.isnan().any()
    assert rel_err(out, want) < 1e-5
    # The rounding is real: unrounded keys and values give a visibly different answer.
    exact = _reference(q, keys, values, q_lens, ctx_lens, dim ** -0.5)
    assert rel_err(out, exact) > 1e-3


def test_copy_blocks_copies_fp8_bytes():
    from selfrag_engine.config import LlamaConfig

    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    scales = [(torch.full((2,), 0.5), torch.full((2,), 0.25))] * 2
    caches = allocate_kv_caches(config, 6, 4, FP8_KV_DTYPE, torch.device("cpu"), scales)
    g = torch.Generator().manual_seed(3)
    for c in caches:
        c.k.copy_(torch.randn(c.k.shape, generator=g).to(FP8_KV_DTYPE))
        c.v.copy_(torch.randn(c.v.shape, generator=g).to(FP8_KV_DTYPE))
    before = [(c.k.view(torch.uint8).clone(), c.v.view(torch.uint8).clone()) for c in caches]
    copy_blocks(caches, [(1, 4), (2, 0)])
    for c, (k, v) in zip(caches, before):
        for pool, old in ((c.k.view(torch.uint8), k), (c.v.view(torch.uint8), v)):
            assert torch.equal(pool[4], old[1]) and torch.equal(pool[0], old[2])
            assert torch.equal(pool[[1, 2, 3, 5]], old[[1, 2, 3, 5]])


def test_scales_bound_every_key_and_value_and_the_bound_is_reached(path):
    """An input aligned with a weight row reaches the bound; no input exceeds it, so nothing is clipped."""
    engine = Engine.from_pretrained(path, progress=False, kv_cache_dtype="fp8", num_blocks=8)
    model, config = engine.model, engine.config
    bounds = kv_bounds(model)
    for layer, cache, (kb, vb) in zip(model.model.layers, engine.kv_caches, bounds):
        for s, b in ((cache.k_scale, kb), (cache.v_scale, vb)):
            assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two
            assert (b / s <= 448).all() and (b / s > 224).all()  # the smallest such power
        attn, g = layer.self_attn, layer.input_layernorm.weight
        q_rows, kv_rows, _ = attn.qkv_sizes
        w = attn.qkv_proj.weight.float()[q_rows + kv_rows:]  # W_v
        row = int((w * g).norm(dim=1).argmax())
        x = (w[row] * g).detach()[None]  # a hidden state aligned with that row, after the norm's weight
        x = torch.cat([x, torch.randn(31, config.hidden_size) * 50])
        v = attn.qkv_proj(layer.input_layernorm(x))[:, q_rows + kv_rows:].view(32, -1, config.head_dim)
        assert (v.abs().amax((0, 2)) <= vb).all()
        head = row // config.head_dim
        assert v[0].abs().max() > 0.9 * vb[head]


def test_pool_holds_more_tokens_for_the_same_bytes(path):
    budget = 1 << 20
    for dtype, ratio in ((torch.float32, 4), (torch.float16, 2)):
        plain = Engine.from_pretrained(path, progress=False, dtype=dtype, kv_cache_bytes=budget)
        fp8 = Engine.from_pretrained(path, progress=False, dtype=dtype, kv_cache_bytes=budget, kv_cache_dtype="fp8")
        a, b = plain.cache_stats(), fp8.cache_stats()
        assert b["num_blocks"] == ratio * a["num_blocks"]
        assert b["kv_capacity_tokens"] == ratio * a["kv_capacity_tokens"]
        assert b["kv_bytes_per_token"] * ratio == a["kv_bytes_per_token"]
        assert a["kv_cache_bytes"] <= budget and b["kv_cache_bytes"] <= budget + 1024
        assert fp8.kv_caches[0].k.dtype == FP8_KV_DTYPE and fp8.kv_caches[0].k.element_size() == 1


@pytest.mark.parametrize("bad", ["fp8_e5m2", "int8", "FP16", None])
def test_bad_kv_cache_dtype_is_named(path, bad):
    with pytest.raises(EngineConfigError, match="kv_cache_dtype"):
        Engine.from_pretrained(path, progress=False, kv_cache_dtype=bad, num_blocks=8)


def test_fp8_generates_close_to_full_precision(path):
    """Not equal (e4m3 keeps 3 mantissa bits) but close: the logits of a prompt through the pool."""
    full = Engine.from_pretrained(path, progress=False)
    fp8 = make_engine(path)
    prompt = full.tokenizer.encode("### Instruction:\nWho was born in Veloria in 1854?\n\n### Response:\n")
    a, b = full.score(prompt), fp8.score(prompt)
    err = float((a - b).abs().max() / a.abs().max())
    assert 0 < err < 0.1, err
    assert not b.isnan().any()


def test_fork_and_prefix_cache_share_blocks_exactly(path):
    """Branches forked off one prompt read the same blocks as the prompt re-prefilled with each suffix (the
    bytes of a block do not depend on who wrote it), and a second request over the same prompt, served by the
    prefix cache, gets the same tokens."""
    engine = make_engine(path)
    prompt = engine.tokenizer.encode("### Instruction:\nWho was born in Veloria?\n\n### Response:\n")
    suffixes = [engine.tokenizer.encode(f"[Retrieval]<paragraph>Passage {i}\nSome text {i * 7}.</paragraph>",
                                        add_bos=False) for i in range(4)]
    parent = engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0), keep_cache=True)
    engine.run([parent])
    shared_before = engine.cache_stats()["used"]
    children = engine.fork(parent, suffixes, _greedy(12, logprobs=2), prefix_len=len(prompt))
    engine.release(parent)
    forked = engine.run(children)
    assert shared_before > 0
    alone = make_engine(path, enable_prefix_caching=False)
    for suffix, out in zip(suffixes, forked):
        ref = alone.generate([prompt + suffix], _greedy(12, logprobs=2))[0]
        assert out.token_ids == ref.token_ids
        assert out.token_logprobs == pytest.approx(ref.token_logprobs, abs=1e-5)
    # The prefix cache serves a repeated prompt from the blocks the first one wrote.
    first = engine.generate([prompt + suffixes[0]], _greedy(12))[0]
    cached = engine.cache_stats()["cached"]
    second = engine.generate([prompt + suffixes[0]], _greedy(12))[0]
    assert cached > 0 and first.token_ids == second.token_ids == forked[0].token_ids
    assert engine.cache_stats()["used"] == 0


def test_copy_on_write_of_a_partly_filled_block(path):
    """A fork at a prefix that ends inside a block copies that block (bytes) before a branch writes to it."""
    engine = make_engine(path, block_size=8)
    prompt = engine.tokenizer.encode("### Instruction:\nName a river in Veloria.\n\n### Response:\n")
    assert len(prompt) % 8 != 0
    parent = engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0), keep_cache=True)
    engine.run([parent])
    suffixes = [[5 + i, 9 + i] for i in range(3)]
    kids = engine.fork(parent, suffixes, _greedy(10), prefix_len=len(prompt))
    engine.release(parent)
    outs = engine.run(kids)
    alone = make_engine(path, block_size=8, enable_prefix_caching=False)
    for s, out in zip(suffixes, outs):
        assert out.token_ids == alone.generate([prompt + s], _greedy(10))[0].token_ids
    assert engine.cache_stats()["used"] == 0


def test_chunked_prefill_and_preemption(path):
    prompts = [f"prompt number {i} " * (i + 1) for i in range(6)]
    roomy = make_engine(path)
    longest = max(len(roomy.tokenizer.encode(p)) for p in prompts) + 30
    tight = make_engine(path, num_blocks=-(-longest // 8) + 2, block_size=8, max_num_batched_tokens=7)
    preempted = record_preemptions(tight)
    a = roomy.generate(prompts, _greedy(30, logprobs=1))
    b = tight.generate(prompts, _greedy(30, logprobs=1))
    assert preempted, "the pool was meant to be too small to hold every request at once"
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert x.token_logprobs == pytest.approx(y.token_logprobs, abs=1e-5)
    assert tight.cache_stats()["used"] == 0


def test_speculation_equals_plain_decoding(path):
    plain = make_engine(path, num_draft_tokens=0)
    spec = make_engine(path, num_draft_tokens=4)
    g = torch.Generator().manual_seed(5)
    vocab = plain.config.vocab_size
    prompts = []
    for _ in range(4):
        span = torch.randint(3, vocab, (8,), generator=g).tolist()
        prompts.append([1] + span + torch.randint(3, vocab, (3,), generator=g).tolist() + span[:3])
    a = plain.generate(prompts, _greedy(20, logprobs=1))
    b = spec.generate(prompts, _greedy(20, logprobs=1))
    assert spec.speculation_stats()["drafted"] > 0
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert x.token_logprobs == pytest.approx(y.token_logprobs, abs=1e-4)
    assert spec.cache_stats()["used"] == 0
