"""SamplingParams.prompt_logprobs (vLLM's): every prompt position's log-probability and top-k, checked against
transformers' logits, through chunked prefill, prefix-cache hits and preemption."""
import pytest
import torch

from selfrag_engine import Engine, RequestError, SamplingParams
from selfrag_engine.tiny.assets import default_model_dir
from tests.helpers import hf_model, record_preemptions, tiny_checkpoint


@pytest.fixture(scope="module")
def path():
    return tiny_checkpoint(seed=31, num_key_value_heads=2)


@pytest.fixture(scope="module")
def hf(path):
    return hf_model(path)


def _engine(path, **kw) -> Engine:
    return Engine.from_pretrained(path, dtype=torch.float32, progress=False, **kw)


def _reference(hf, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([prompt])).logits[0].double(), -1)


def _check(entries, prompt: list[int], ref: torch.Tensor, k: int) -> None:
    assert len(entries) == len(prompt)
    assert entries[0] is None
    for i in range(1, len(prompt)):
        row = ref[i - 1]
        entry = entries[i]
        assert entry[prompt[i]] == pytest.approx(float(row[prompt[i]]), abs=1e-4)
        top = torch.topk(row, k)
        assert set(entry) == set(top.indices.tolist()) | {prompt[i]}
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert entry[t] == pytest.approx(v, abs=1e-4)


def _prompt(engine: Engine, n: int, seed: int) -> list[int]:
    ids = torch.randint(3, engine.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return [engine.tokenizer.bos_id] + ids


@pytest.mark.parametrize("budget", [7, 4096], ids=["chunked", "whole"])
def test_prompt_logprobs_equal_transformers(path, hf, budget):
    engine = _engine(path, max_num_batched_tokens=budget)
    prompts = [_prompt(engine, n, seed) for n, seed in ((40, 1), (9, 2), (1, 3))]
    outs = engine.generate(prompts, [SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=k)
                                     for k in (3, 0, 5)])
    for prompt, out, k in zip(prompts, outs, (3, 0, 5)):
        _check(out.prompt_logprobs, prompt, _reference(hf, prompt), k)
    # The generated tokens are those of a request without prompt log-probabilities.
    plain = engine.generate(prompts, SamplingParams(max_tokens=3, temperature=0.0))
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert plain[0].prompt_logprobs is None
    assert engine.cache_stats()["used"] == 0


def test_prefix_cache_hit_still_gives_every_position(path, hf):
    engine = _engine(path, block_size=8)
    prompt = _prompt(engine, 45, 4)
    engine.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0))  # the prompt's blocks now cached
    assert engine.cache_stats()["cached"] > 0
    out = engine.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2))[0]
    _check(out.prompt_logprobs, prompt, _reference(hf, prompt), 2)


def test_preempted_request_keeps_its_prompt_logprobs(path, hf):
    prompts = [[1] + list(range(5 + 3 * i, 5 + 3 * i + 6 * (i + 1))) for i in range(5)]
    longest = max(map(len, prompts)) + 30
    tight = _engine(path, num_blocks=-(-longest // 8) + 2, block_size=8)
    preempted = record_preemptions(tight)
    outs = tight.generate(prompts, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True,
                                                  prompt_logprobs=1))
    assert preempted, "the pool was meant to be too small to hold every request at once"
    for prompt, out in zip(prompts, outs):
        _check(out.prompt_logprobs, prompt, _reference(hf, prompt), 1)
    assert tight.cache_stats()["used"] == 0


def test_embedded_model_prompt_logprobs_equal_transformers():
    model = default_model_dir()
    if not (model / "model.safetensors").is_file():
        pytest.skip("tiny_selfrag not present")
    engine = _engine(model, max_num_batched_tokens=16)
    prompt = engine.tokenizer.encode("### Instruction:\nWhat is the capital of Elbonia?\n\n### Response:\n")
    out = engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=4))[0]
    _check(out.prompt_logprobs, prompt, _reference(hf_model(model), prompt), 4)


def test_bad_prompt_logprobs_are_refused(path):
    engine = _engine(path)
    for bad in (-1, True, 1.5, "2"):
        with pytest.raises(RequestError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
    with pytest.raises(RequestError, match="prompt_logprobs"):
        engine.generate([[1, 5, 6]], SamplingParams(prompt_logprobs=engine.config.vocab_size + 1))
    parent = engine.add_request([1, 5, 6, 7], SamplingParams(max_tokens=2, temperature=0.0), keep_cache=True)
    engine.run([parent])
    with pytest.raises(RequestError, match="forked branch"):
        engine.fork(parent, [[9]], SamplingParams(prompt_logprobs=0))
    engine.forget(parent)
    assert engine.cache_stats()["used"] == 0
