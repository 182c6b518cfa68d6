"""n and best_of: the prompt computed once, its samples forked off its blocks; best_of ranks by cumulative
log-probability; no block leaked."""
import pytest
import torch

from selfrag_engine import Engine, RequestError, SamplingParams
from tests.helpers import tiny_checkpoint

N = 10


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained(tiny_checkpoint(seed=37, num_key_value_heads=2), dtype=torch.float32,
                                  progress=False, block_size=8)


PROMPT = [1] + list(range(40, 60))  # 21 tokens: two full blocks shared by the samples


def test_samples_share_the_prompt_and_equal_single_requests(engine):
    computed = []
    run = engine.runner.run

    def watch(batch, next_tokens=None):
        computed.append(batch.num_tokens)
        return run(batch, next_tokens)

    engine.runner.run = watch
    try:
        out = engine.generate([PROMPT], SamplingParams(n=3, max_tokens=N, temperature=1.0, seed=5,
                                                       ignore_eos=True, logprobs=1))[0]
    finally:
        engine.runner.run = run
    assert len(out.outputs) == 3 and [c.index for c in out.outputs] == [0, 1, 2]
    assert out.prompt_token_ids == PROMPT
    # The prompt but its last token computed once, then each sample's own tokens: 20 + 3 * N, not 3 * 21 + ...
    assert sum(computed) == len(PROMPT) - 1 + 3 * N
    # Each sample is exactly the request sampled alone with its seed (seed + i).
    for i, c in enumerate(out.outputs):
        alone = engine.generate([PROMPT], SamplingParams(max_tokens=N, temperature=1.0, seed=5 + i,
                                                         ignore_eos=True))[0]
        assert c.token_ids == alone.token_ids
        assert c.cumulative_logprob == pytest.approx(alone.cumulative_logprob, abs=1e-4)
        assert c.finish_reason == "length" and len(c.logprobs) == N
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert (out.token_ids, out.text) == (out.outputs[0].token_ids, out.outputs[0].text)
    assert engine.cache_stats()["used"] == 0


def test_best_of_keeps_the_highest_cumulative_logprobs(engine):
    params = SamplingParams(n=2, best_of=5, max_tokens=N, temperature=1.0, seed=11, ignore_eos=True)
    out = engine.generate([PROMPT], params)[0]
    every = [engine.generate([PROMPT], SamplingParams(max_tokens=N, temperature=1.0, seed=11 + i,
                                                      ignore_eos=True))[0] for i in range(5)]
    ranked = sorted(every, key=lambda o: o.cumulative_logprob, reverse=True)[:2]
    assert [c.token_ids for c in out.outputs] == [o.token_ids for o in ranked]
    assert out.outputs[0].cumulative_logprob >= out.outputs[1].cumulative_logprob
    assert engine.cache_stats()["used"] == 0


def test_prompt_logprobs_and_deltas_of_a_sampled_request(engine):
    rid = engine.add_request(PROMPT, SamplingParams(n=2, max_tokens=4, temperature=1.0, seed=1, ignore_eos=True,
                                                    prompt_logprobs=0))
    deltas = []
    while not engine.is_done(rid):
        deltas += [d for d in engine.step_deltas() if d.request_id == rid]
    out = engine.output(rid)
    assert [d.finished for d in deltas].count(True) == 1 and deltas[-1].finished
    for i in range(2):
        assert sum((d.token_ids for d in deltas if d.index == i and not d.finished), []) == out.outputs[i].token_ids
    single = engine.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))[0]
    assert len(out.prompt_logprobs) == len(PROMPT)
    for a, b in zip(out.prompt_logprobs[1:], single.prompt_logprobs[1:]):
        assert a == pytest.approx(b, abs=1e-5)
    engine.forget(rid)
    assert not engine.has_request(rid)
    assert engine.cache_stats()["used"] == 0


def test_release_before_and_after_the_fork_frees_every_block(engine):
    params = SamplingParams(n=3, max_tokens=N, temperature=1.0, ignore_eos=True)
    early = engine.add_request(PROMPT, params)
    engine.release(early)
    assert engine.is_done(early) and engine.output(early).finish_reason == "abort"
    late = engine.add_request(PROMPT, params)
    engine.step()
    engine.step()
    engine.release(late)
    assert engine.is_done(late) and all(c.finish_reason == "abort" for c in engine.output(late).outputs)
    engine.forget(early)
    engine.forget(late)
    assert engine.cache_stats()["used"] == 0 and not engine.has_work()


@pytest.mark.parametrize("kw,match", [
    (dict(n=0), "n must be a positive integer"),
    (dict(n=3, best_of=2), "best_of must be >= n"),
    (dict(n=2, temperature=0.0), "needs temperature > 0"),
    (dict(best_of=1000), "at most"),
])
def test_bad_n_and_best_of_are_refused(kw, match):
    with pytest.raises(RequestError, match=match):
        SamplingParams(**kw)


def test_n_refusals_in_the_engine(engine):
    with pytest.raises(RequestError, match="at least 2 tokens"):
        engine.add_request([1], SamplingParams(n=2))
    with pytest.raises(RequestError, match="keep_cache"):
        engine.add_request(PROMPT, SamplingParams(n=2), keep_cache=True)
    rid = engine.add_request(PROMPT, SamplingParams(n=2, max_tokens=2))
    with pytest.raises(RequestError, match="no one cache to fork from"):
        engine.fork(rid, [[5]], SamplingParams())
    engine.forget(rid)
    assert engine.cache_stats()["used"] == 0


def test_sampled_request_through_the_engine_loop(engine):
    from selfrag_engine import EngineLoop

    params = SamplingParams(n=2, max_tokens=6, temperature=1.0, seed=21, ignore_eos=True)
    direct = engine.generate([PROMPT], params)[0]
    with EngineLoop(engine) as loop:
        handle = loop.submit(PROMPT, params)
        deltas = list(handle.deltas(timeout=120))
        out = handle.result(timeout=120)
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in direct.outputs]
    for i in range(2):
        assert sum((d.token_ids for d in deltas if d.index == i), []) == out.outputs[i].token_ids
    assert deltas[-1].finished and sum(d.finished for d in deltas) == 1
    assert engine.cache_stats()["used"] == 0
