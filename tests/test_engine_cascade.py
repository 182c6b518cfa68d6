"""The engine decodes forked branches with cascade attention (shared prefix read once) when they share blocks,
and its outputs equal those of the torch reference; unrelated sequences keep the plain split-K decode.

On the CPU the kernels run in the Triton interpreter (tests/conftest.py), so the models here are tiny."""
from __future__ import annotations

import os

import pytest
import torch

import selfrag_engine.kernels.decode_attention as decode_kernels
from selfrag_engine import Engine, SamplingParams
from tests.helpers import GPU_KV_CACHE_BYTES, tiny_checkpoint

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK = 8


def make_engine(path, **kw) -> Engine:
    """An engine whose KV pool starts as NaN, so a read of a slot nobody wrote cannot go unnoticed."""
    if "num_blocks" not in kw:
        kw.setdefault("kv_cache_bytes", GPU_KV_CACHE_BYTES)
    engine = Engine.from_pretrained(path, progress=False, **kw)
    for cache in engine.kv_caches:
        cache.k.fill_(float("nan"))
        cache.v.fill_(float("nan"))
    return engine


class KernelSpy:
    """Records every call of the decode kernels that attention dispatches to, and runs them."""

    def __init__(self, monkeypatch):
        self.cascade: list[dict] = []
        self.plain = 0
        cascade, plain = decode_kernels.cascade_decode_attention, decode_kernels.paged_decode_attention

        def spy_cascade(q, k_cache, v_cache, block_tables, context_lens, group_start, prefix_blocks, *a, **kw):
            self.cascade.append(dict(tables=block_tables.cpu().tolist(), ctx=context_lens.cpu().tolist(),
                                     group_start=group_start.cpu().tolist(),
                                     prefix_blocks=prefix_blocks.cpu().tolist()))
            return cascade(q, k_cache, v_cache, block_tables, context_lens, group_start, prefix_blocks, *a, **kw)

        def spy_plain(*a, **kw):
            self.plain += 1
            return plain(*a, **kw)

        monkeypatch.setattr(decode_kernels, "cascade_decode_attention", spy_cascade)
        monkeypatch.setattr(decode_kernels, "paged_decode_attention", spy_plain)


def _greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def _random_ids(gen: torch.Generator, vocab: int, n: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=gen).tolist()


def two_families(gen: torch.Generator, vocab: int) -> tuple[list[list[int]], list[list[list[int]]], list[int]]:
    """Two prompts of 2 to 4 full blocks (and a partial one), so both families of branches reach the cascade
    threshold, with 3 and 2 suffixes; and an unrelated prompt that stays within its first block."""
    prompts = [[1] + _random_ids(gen, vocab, int(torch.randint(2 * BLOCK, 4 * BLOCK, (), generator=gen)))
               for _ in range(2)]
    suffixes = [[_random_ids(gen, vocab, int(torch.randint(1, 12, (), generator=gen))) for _ in range(k)]
                for k in (3, 2)]
    return prompts, suffixes, [1] + _random_ids(gen, vocab, 2)


def run_forks(engine: Engine, prompts: list[list[int]], suffixes: list[list[list[int]]], lone: list[int],
              new_tokens: int):
    """Prefills each prompt once, forks its suffixes off it and decodes them all in one batch together with an
    unrelated request `lone`. Returns the outputs (branches in order, then lone) and each parent's block table."""
    parents = [engine.add_request(p, _greedy(1), keep_cache=True) for p in prompts]
    engine.run(parents)
    parent_tables = [list(engine.scheduler.block_manager.block_table(p)) for p in parents]
    kids = []
    for parent, prompt, sfx in zip(parents, prompts, suffixes):
        kids += engine.fork(parent, sfx, _greedy(new_tokens, logprobs=2), prefix_len=len(prompt))
        engine.release(parent)
    lone_id = engine.add_request(lone, _greedy(new_tokens, logprobs=2))
    outs = engine.run(kids + [lone_id])
    assert engine.cache_stats()["used"] == 0
    return outs, parent_tables


def assert_same_outputs(fast, ref, atol: float):
    for x, y in zip(fast, ref):
        assert x.token_ids == y.token_ids
        assert x.token_logprobs == pytest.approx(y.token_logprobs, abs=atol)
        for a, b in zip(x.logprobs, y.logprobs):
            assert a.keys() == b.keys() and list(a.values()) == pytest.approx(list(b.values()), abs=atol)


@pytest.fixture(scope="module")
def path():
    return tiny_checkpoint(seed=21, num_key_value_heads=2)


@pytest.mark.skipif(not INTERPRETED, reason="runs the kernels in the Triton interpreter")
def test_forked_branches_take_cascade_and_match_reference(path, monkeypatch):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    fast = make_engine(path, block_size=BLOCK, use_kernels=True)
    ref = make_engine(path, block_size=BLOCK, use_kernels=False)
    prompts, suffixes, lone = two_families(gen, fast.config.vocab_size)
    spy = KernelSpy(monkeypatch)
    outs, parent_tables = run_forks(fast, prompts, suffixes, lone, new_tokens=5)
    monkeypatch.undo()
    ref_outs, _ = run_forks(ref, prompts, suffixes, lone, new_tokens=5)
    assert_same_outputs(outs, ref_outs, atol=1e-4)

    layers = fast.config.num_hidden_layers
    # Every decode step of the branches (the first token of each comes from the suffix prefill) ran cascade in
    # every layer, and nothing fell back to the plain kernel.
    assert len(spy.cascade) == 4 * layers and spy.plain == 0
    shared = [len(p) // BLOCK for p in prompts]
    for call in spy.cascade:
        gs, prefix = call["group_start"], call["prefix_blocks"]
        groups = {gs[g + 1] - gs[g]: (list(range(gs[g], gs[g + 1])), prefix[g]) for g in range(len(prefix))}
        assert sorted(groups) == [1, 2, 3]
        for size, table, p in ((3, parent_tables[0], shared[0]), (2, parent_tables[1], shared[1])):
            rows, got = groups[size]
            assert got == p
            assert all(call["tables"][r][:p] == table[:p] for r in rows)
        (lone_row,), lone_prefix = groups[1]
        assert lone_prefix == 0 and call["tables"][lone_row][0] not in parent_tables[0] + parent_tables[1]
        # The unrelated request, last in the scheduler's order, sorts first: the batch was reordered and the
        # outputs above were put back in order.
        assert lone_row == 0


@pytest.mark.skipif(not INTERPRETED, reason="runs the kernels in the Triton interpreter")
def test_unrelated_sequences_and_short_shared_prefixes_keep_plain_decode(path, monkeypatch):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    fast = make_engine(path, block_size=BLOCK, use_kernels=True)
    vocab = fast.config.vocab_size
    spy = KernelSpy(monkeypatch)
    prompts = [[1] + _random_ids(gen, vocab, int(torch.randint(2 * BLOCK, 4 * BLOCK, (), generator=gen)))
               for _ in range(3)]
    fast.generate(prompts, _greedy(3))
    assert spy.cascade == [] and spy.plain > 0
    # Branches of a prompt with one full block share less than the threshold of two.
    short = [1] + _random_ids(gen, vocab, int(torch.randint(BLOCK, 2 * BLOCK - 1, (), generator=gen)))
    assert len(short) // BLOCK == 1
    plain_before = spy.plain
    run_forks(fast, [short], [[_random_ids(gen, vocab, 3) for _ in range(3)]], [1, 5], new_tokens=3)
    assert spy.cascade == [] and spy.plain > plain_before


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_cascade_equals_plain_decode_for_forked_batch(dtype, monkeypatch):
    """On CUDA, the same forked batch with cascade decode and with the plain split-K decode."""
    path = tiny_checkpoint(seed=22, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=1024)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    # Eager: both engines run the same decode kernels apart from the choice under test.
    cascade = make_engine(path, device="cuda", dtype=dtype, block_size=16, enforce_eager=True)
    plain = make_engine(path, device="cuda", dtype=dtype, block_size=16, enforce_eager=True)
    plain.runner.min_shared_prefix_blocks = 10**9
    vocab = cascade.config.vocab_size
    prompts = [[1] + _random_ids(gen, vocab, n) for n in (300, 90)]
    suffixes = [[_random_ids(gen, vocab, int(torch.randint(20, 120, (), generator=gen))) for _ in range(k)]
                for k in (5, 3)]
    lone = [1] + _random_ids(gen, vocab, 200)
    spy = KernelSpy(monkeypatch)
    a, _ = run_forks(cascade, prompts, suffixes, lone, new_tokens=16)
    shared = [len(p) // 16 for p in prompts]
    assert spy.cascade and all(sorted(c["prefix_blocks"], reverse=True) == shared + [0] for c in spy.cascade)
    cascade_calls = len(spy.cascade)
    b, _ = run_forks(plain, prompts, suffixes, lone, new_tokens=16)
    assert len(spy.cascade) == cascade_calls
    if dtype == torch.float32:
        assert_same_outputs(a, b, atol=1e-3)
        return
    for x, y in zip(a, b):
        # Half precision: the summation order differs, so a near tie may flip a later token.
        assert x.token_ids[0] == y.token_ids[0]
        assert x.token_logprobs[0] == pytest.approx(y.token_logprobs[0], abs=3e-2)
        assert sum(s == t for s, t in zip(x.token_ids, y.token_ids)) >= len(y.token_ids) - 2


@pytest.mark.skipif(not INTERPRETED, reason="runs the kernels in the Triton interpreter")
def test_overlapped_steps_reorder_their_device_side_inputs_for_cascade(path, monkeypatch):
    """A step launched ahead takes its input tokens from the previous step's sampler on the device; when the
    cascade regroups the batch, those inputs must be regrouped with it."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    fast = make_engine(path, block_size=BLOCK, use_kernels=True, overlap=True)
    ref = make_engine(path, block_size=BLOCK, use_kernels=False)
    prompts, suffixes, lone = two_families(gen, fast.config.vocab_size)
    ahead = []
    run = fast.runner.run
    fast.runner.run = lambda batch, next_tokens=None: (
        ahead.append(next_tokens is not None) or run(batch, next_tokens))
    spy = KernelSpy(monkeypatch)
    outs, _ = run_forks(fast, prompts, suffixes, lone, new_tokens=6)
    monkeypatch.undo()
    ref_outs, _ = run_forks(ref, prompts, suffixes, lone, new_tokens=6)
    assert_same_outputs(outs, ref_outs, atol=1e-4)
    assert sum(ahead) >= 3 and spy.cascade and spy.plain == 0
    fast.scheduler.block_manager.check_invariants()
