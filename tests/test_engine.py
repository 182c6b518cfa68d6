"""The engine's request API: batching, sampling options, stop conditions, forks, and bad requests."""
import pytest

from selfrag_engine import CacheCapacityError, Engine, RequestError, SamplingParams
from tests.helpers import record_preemptions, tiny_checkpoint


@pytest.fixture(scope="module")
def path():
    return tiny_checkpoint(seed=21, num_key_value_heads=2)


@pytest.fixture(scope="module")
def engine(path):
    return make_engine(path)


def make_engine(path, **kw) -> Engine:
    """An engine whose KV pool starts as NaN, so a read of a slot nobody wrote cannot go unnoticed."""
    engine = Engine.from_pretrained(path, progress=False, **kw)
    for cache in engine.kv_caches:
        cache.k.fill_(float("nan"))
        cache.v.fill_(float("nan"))
    return engine


def _greedy(n=24, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def test_batched_equals_one_by_one(engine):
    prompts = ["a", "### Instruction:\nWhat is 2 + 2?\n\n### Response:\n", "the quick brown fox " * 6, "x y z"]
    batched = engine.generate(prompts, _greedy(logprobs=3))
    for prompt, b in zip(prompts, batched):
        single = engine.generate(prompt, _greedy(logprobs=3))[0]
        assert single.token_ids == b.token_ids
        assert single.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-5)
    assert engine.cache_stats()["used"] == 0


def test_chunked_prefill_equals_whole(path):
    small = make_engine(path, max_num_batched_tokens=7)
    big = make_engine(path)
    prompt = "a long prompt that will be split into several prefill chunks " * 3
    a = small.generate(prompt, _greedy())[0]
    b = big.generate(prompt, _greedy())[0]
    assert a.token_ids == b.token_ids
    assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-5)


def test_sampling_is_seeded_and_batch_independent(engine):
    p = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    a = engine.generate(["once upon a time", "other"], p)[0]
    b = engine.generate("once upon a time", p)[0]
    c = engine.generate("once upon a time", SamplingParams(max_tokens=20, temperature=1.0, seed=99,
                                                            ignore_eos=True))[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_max_tokens_and_finish_reason(engine):
    out = engine.generate("count", _greedy(5))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_stop_token_and_stop_string(engine):
    ref = engine.generate("stop here", _greedy(30))[0]
    tok = ref.token_ids[4]
    out = engine.generate("stop here", _greedy(30, stop_token_ids=[tok]))[0]
    first = ref.token_ids.index(tok)
    assert out.token_ids == ref.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == tok
    text = ref.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    if stop.strip():
        out = engine.generate("stop here", _greedy(30, stop=[stop]))[0]
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.text == text[: text.find(stop)]


def test_eos_stops(engine):
    # Force EOS by making it the only allowed token through a stop on every token: use top_k=1 on a prompt
    # whose greedy continuation we know, then check ignore_eos=False ends at EOS when EOS is produced.
    out = engine.generate("eos", SamplingParams(max_tokens=200, temperature=0.0))[0]
    if engine.tokenizer.eos_id in out.token_ids:
        assert out.token_ids[-1] == engine.tokenizer.eos_id and out.finish_reason == "stop"
    else:
        assert out.finish_reason == "length"


def test_fork_branches_equal_independent_generates(path):
    engine = make_engine(path)
    prompt = engine.tokenizer.encode("### Instruction:\nWho was born in Veloria?\n\n### Response:\n")
    suffixes = [engine.tokenizer.encode(f"[Retrieval]<paragraph>Passage {i}\nSome text {i * 7}.</paragraph>",
                                        add_bos=False) for i in range(5)]
    parent = engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0), keep_cache=True)
    engine.run([parent])
    children = engine.fork(parent, suffixes, _greedy(16, logprobs=2), prefix_len=len(prompt))
    engine.release(parent)
    forked = engine.run(children)
    for suffix, out in zip(suffixes, forked):
        ref = engine.generate([prompt + suffix], _greedy(16, logprobs=2))[0]
        assert out.token_ids == ref.token_ids
        assert out.token_logprobs == pytest.approx(ref.token_logprobs, abs=1e-5)
    assert engine.cache_stats()["used"] == 0


def test_fork_with_one_bad_branch_makes_none(path):
    engine = make_engine(path)
    prompt = engine.tokenizer.encode("### Instruction:\nName a town.\n\n### Response:\n")
    parent = engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0), keep_cache=True)
    engine.run([parent])
    before = (set(engine.seqs), engine.cache_stats())
    good = engine.tokenizer.encode("[Retrieval]<paragraph>Town</paragraph>", add_bos=False)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.fork(parent, [good, good, [engine.config.vocab_size + 3]], _greedy(4), prefix_len=len(prompt))
    assert (set(engine.seqs), engine.cache_stats()) == before
    # The parent still forks cleanly afterwards, and everything is freed at the end.
    kids = engine.fork(parent, [good, good], _greedy(4), prefix_len=len(prompt))
    engine.release(parent)
    assert all(o.finish_reason == "length" for o in engine.run(kids))
    assert engine.cache_stats()["used"] == 0


def test_preemption_keeps_outputs(path):
    prompts = [f"prompt number {i} " * (i + 1) for i in range(6)]
    roomy = make_engine(path)
    longest = max(len(roomy.tokenizer.encode(p)) for p in prompts) + 40
    # Room for the longest request and a little more: six running requests must take turns.
    tight = make_engine(path, num_blocks=-(-longest // 8) + 2, block_size=8)
    preempted = record_preemptions(tight)
    a = roomy.generate(prompts, _greedy(40, logprobs=1))
    b = tight.generate(prompts, _greedy(40, logprobs=1))
    assert preempted, "the pool was meant to be too small to hold every request at once"
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert x.token_logprobs == pytest.approx(y.token_logprobs, abs=1e-5)
    assert tight.cache_stats()["used"] == 0


def test_bad_requests(path, engine):
    with pytest.raises(RequestError, match="empty prompt"):
        engine.generate([[]], _greedy())
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.generate([[1, 10**6]], _greedy())
    with pytest.raises(RequestError, match="no room to generate"):
        engine.generate([[5] * engine.max_model_len], _greedy())
    with pytest.raises(RequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(RequestError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(RequestError, match="logprobs"):
        SamplingParams(logprobs=-1)
    with pytest.raises(RequestError, match="vocabulary size"):
        engine.generate([[1, 5]], _greedy(logprobs=engine.config.vocab_size + 1))
    small = make_engine(path, num_blocks=2, block_size=8)
    with pytest.raises(CacheCapacityError, match="whole pool holds 16 "):
        small.generate([[5] * 30], _greedy())
    assert small.cache_stats()["used"] == 0
    assert engine.cache_stats()["used"] == 0


def test_scheduler_bench_smoke(tmp_path):
    from bench.scheduler import main
    main(["--smoke", "--out", str(tmp_path)])
    assert list(tmp_path.glob("scheduler-cpu-*.json")) and list(tmp_path.glob("scheduler-cpu-*.png"))


def test_detokenize_off_keeps_tokens_and_skips_text(engine):
    prompt = "the quick brown fox"
    with_text = engine.generate([prompt], _greedy(8))[0]
    ids_only = engine.generate([prompt], _greedy(8, detokenize=False))[0]
    assert ids_only.token_ids == with_text.token_ids and with_text.text
    assert ids_only.text == ""
    with pytest.raises(RequestError, match="detokenize"):
        SamplingParams(stop=["x"], detokenize=False)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logprobs_beyond_the_fused_pass_are_the_exact_top_n(backend):
    """logprobs=5000 (the reference scripts' count per retrieval branch) on a 6016-token vocabulary: every step's
    dict holds the 5000 most likely tokens with their full-vocabulary log-probabilities, in rank order, as the
    float64 log-softmax of the same sequence's logits from a scoring pass says; a request batched beside it
    that asks for none gets no dict and the same tokens."""
    import tempfile
    from pathlib import Path

    import torch

    from bench.workload import random_llama
    from selfrag_engine.testing import tiny_config, write_tokenizer
    from selfrag_engine.tokenizer import Tokenizer

    cfg = tiny_config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=6016)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp), vocab_pieces=320, pad_to=cfg["vocab_size"] - 16)
        tokenizer = Tokenizer.from_pretrained(Path(tmp))
    # Weights ten times the bench's keep the logits spread out, so neighbouring ranks are far apart next to the
    # difference between a decode step's and a scoring pass's float32 sums.
    model = random_llama(cfg, "cpu", torch.float32, seed=5)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    engine = Engine(model, tokenizer, use_kernels=backend == "triton", kv_cache_bytes=8 << 20)
    n, prompt = 5000, [1, 50, 60, 70]
    asked, plain = engine.generate([prompt, prompt], [_greedy(3, logprobs=n), _greedy(3)])
    assert plain.logprobs is None and plain.token_ids == asked.token_ids
    logits = engine.score(prompt + asked.token_ids[:-1]).double()
    ref = torch.log_softmax(logits, -1)[len(prompt) - 1:]
    for step, top in enumerate(asked.logprobs):
        vals, ids = torch.sort(ref[step], descending=True, stable=True)
        assert float(vals[n - 1] - vals[n]) > 1e-4  # the rank-n boundary is not a near tie
        # Ranks inside the top n may swap between two float32 sums of near-equal logits, the set may not.
        assert len(top) == n and set(top) == set(ids[:n].tolist())
        assert list(top.values()) == pytest.approx(vals[:n].tolist(), abs=1e-4)
        assert list(top.values()) == pytest.approx(ref[step, list(top)].tolist(), abs=1e-4)
        assert list(top.values()) == sorted(top.values(), reverse=True)
        assert list(top)[0] == asked.token_ids[step]
