"""A seeded random walk over the engine's public API on a pool small enough to preempt, with a token budget
small enough to prefill in chunks: every operation either works or raises a named error, no block is left
once everything is released, and every request that finished got the tokens it gets run alone."""
import random

import pytest

from selfrag_engine import Engine, RequestError, SamplingParams
from selfrag_engine.errors import SelfragEngineError
from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def path():
    return tiny_checkpoint(seed=43, num_key_value_heads=2)


def _params(rng: random.Random) -> SamplingParams:
    n = rng.randint(1, 8)
    if rng.random() < 0.5:
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=rng.random() < 0.7)
    return SamplingParams(max_tokens=n, temperature=rng.choice([0.7, 1.0]), top_k=rng.choice([0, 20]),
                          top_p=rng.choice([1.0, 0.9]), seed=rng.randrange(2**31), ignore_eos=rng.random() < 0.7)


@pytest.mark.parametrize("overlap,seed,kv_cache_dtype", [(False, 7, "auto"), (True, 8, "auto"), (False, 9, "fp8")])
def test_random_operations_raise_only_named_errors_leak_nothing_and_match_alone(path, overlap, seed, kv_cache_dtype):
    rng = random.Random(seed)
    engine = Engine.from_pretrained(path, progress=False, overlap=overlap, block_size=4, num_blocks=40,
                                    max_num_batched_tokens=20, max_num_seqs=5, kv_cache_dtype=kv_cache_dtype)
    vocab = engine.config.vocab_size
    specs: dict[int, tuple[list[int], SamplingParams]] = {}  # request -> the prompt and params run alone
    finished: dict[int, list[int]] = {}

    def live() -> list[int]:
        return sorted(engine.seqs)

    def collect() -> None:
        for rid in live():
            if engine.is_done(rid) and rid in specs:
                out = engine.output(rid)
                if out.finish_reason != "abort":
                    finished[rid] = out.token_ids

    def op() -> None:
        kind = rng.choices(["add", "fork", "step", "run", "release", "forget", "bad"],
                           [5, 3, 6, 2, 1, 2, 1])[0]
        ids = live()
        if kind == "add" or not ids:
            prompt = [1] + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 30))]
            params = _params(rng)
            rid = engine.add_request(prompt, params, keep_cache=rng.random() < 0.3)
            specs[rid] = (prompt, params)
        elif kind == "fork":
            parent = rng.choice(ids)
            out = engine.output(parent)
            full = out.prompt_token_ids + out.token_ids
            prefix_len = rng.choice([None, len(full) - 1])
            suffixes = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 3))]
            params = [_params(rng) for _ in suffixes]
            kids = engine.fork(parent, suffixes, params, prefix_len=prefix_len, keep_cache=rng.random() < 0.2)
            prefix = full if prefix_len is None else full[:prefix_len]
            for kid, sfx, prm in zip(kids, suffixes, params):
                specs[kid] = (prefix + sfx, prm)
        elif kind == "step":
            for _ in range(rng.randint(1, 4)):
                engine.step()
        elif kind == "run":
            engine.run(rng.sample(ids, min(len(ids), rng.randint(1, 3))))
        elif kind == "release":
            engine.release(rng.choice(ids))
        elif kind == "forget":
            rid = rng.choice(ids)
            if engine.is_done(rid):
                collect()
            engine.forget(rid)
        else:
            bad = rng.choice([lambda: engine.add_request([1, vocab + 5]), lambda: engine.output(10**9),
                              lambda: engine.fork(10**9, [[5]], _params(rng)), lambda: engine.add_request([1, 2.5]),
                              lambda: engine.release(-1), lambda: engine.add_request("")])
            with pytest.raises(RequestError):
                bad()

    errors = 0
    for _ in range(110):
        try:
            op()
        except SelfragEngineError:
            errors += 1
        collect()
    # Everything still live runs to its end, then is released.
    for rid in live():
        try:
            engine.run([rid])
        except SelfragEngineError:
            errors += 1
        collect()
    for rid in live():
        engine.forget(rid)
    assert not engine.seqs and engine.cache_stats()["used"] == 0
    engine.scheduler.block_manager.check_invariants()

    assert len(finished) >= 20, "the walk was meant to finish many requests"
    ref = Engine.from_pretrained(path, progress=False, kv_cache_dtype=kv_cache_dtype)
    for rid, tokens in sorted(finished.items()):
        prompt, params = specs[rid]
        assert ref.generate([prompt], params)[0].token_ids == tokens, f"request {rid}"
