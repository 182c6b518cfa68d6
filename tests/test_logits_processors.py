"""SamplingParams.logits_processors: batched hooks called once per step with all the rows that carry them, whose
effect is exactly that of the same rule in transformers' generate."""
import pytest
import torch

from selfrag_engine import Engine, RequestError, SamplingParams
from selfrag_engine.engine.logits_processing import processor_calls
from tests.helpers import hf_model, tiny_checkpoint

N = 12


@pytest.fixture(scope="module")
def path():
    return tiny_checkpoint(seed=35, num_key_value_heads=2)


@pytest.fixture(scope="module")
def engine(path):
    return Engine.from_pretrained(path, dtype=torch.float32, progress=False)


class Recorder:
    """Records each call's rows and their output lengths; pushes every row away from its last token."""

    def __init__(self, push: float = 4.0):
        self.calls: list[list[int]] = []
        self.push = push

    def __call__(self, logits, output_token_ids):
        assert logits.dtype == torch.float32 and logits.shape[0] == len(output_token_ids)
        self.calls.append([len(ids) for ids in output_token_ids])
        for r, ids in enumerate(output_token_ids):
            if ids:
                logits[r, ids[-1]] -= self.push
        return logits


def test_called_once_per_step_over_all_its_rows(engine):
    proc = Recorder()
    prompts = [[1, 20 + i, 30 + i, 40 + i] for i in range(3)]  # same length: prefilled in one step, in step after
    params = SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True, logits_processors=[proc])
    outs = engine.generate(prompts + [[1, 5, 6, 7]], [params] * 3 + [SamplingParams(max_tokens=N, temperature=0.0,
                                                                                   ignore_eos=True)])
    assert proc.calls == [[k, k, k] for k in range(N)]  # one call a step, its three rows, never the fourth
    for o in outs[:3]:
        assert all(a != b for a, b in zip(o.token_ids, o.token_ids[1:]))  # pushed off its last token


def steer(logits, output_token_ids):
    """Lifts a token that depends on the step and on the last token generated."""
    for r, ids in enumerate(output_token_ids):
        logits[r, (7 * len(ids) + (ids[-1] if ids else 0)) % logits.shape[1]] += 6.0
    return logits


def test_effect_equals_transformers_generate(engine, path):
    from transformers import LogitsProcessorList

    hf = hf_model(path)
    prompt = "the the the cat sat on the mat"
    ids = engine.tokenizer.encode(prompt)
    ours = engine.generate(prompt, SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True, logprobs=1,
                                                  logits_processors=[steer]))[0]
    plain = engine.generate(prompt, SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True))[0]

    def hf_rule(input_ids, scores):  # the same rule over transformers' ids (prompt + generated)
        return steer(scores, [row[len(ids):].tolist() for row in input_ids])

    x = torch.tensor([ids])
    with torch.no_grad():
        ref = hf.generate(x, max_new_tokens=N, min_new_tokens=N, do_sample=False, attention_mask=torch.ones_like(x),
                          pad_token_id=0, logits_processor=LogitsProcessorList([hf_rule]))[0, len(ids):]
    assert ours.token_ids == ref.tolist()
    assert ours.token_ids != plain.token_ids
    with torch.no_grad():  # log-probabilities stay those of the raw logits
        logp = torch.log_softmax(hf(torch.tensor([ids + ours.token_ids])).logits[0].double(), -1)
    for step, tok in enumerate(ours.token_ids):
        assert ours.token_logprobs[step] == pytest.approx(float(logp[len(ids) - 1 + step, tok]), abs=1e-4)


def test_rows_of_different_processors_and_orders():
    a, b, c = object(), object(), object()
    # Agreeing lists: each processor called once with all its rows, in an order that keeps every row's.
    assert processor_calls([[a, b], [b], [], [a, c]]) == [(a, [0, 3]), (b, [0, 1]), (c, [3])]
    # Rows that order a and b differently: one call per position.
    assert processor_calls([[a, b], [b, a]]) == [(a, [0]), (b, [1]), (b, [0]), (a, [1])]


def test_forcing_processor_and_bad_processors(engine):
    def force_seven(logits, ids):
        out = torch.full_like(logits, float("-inf"))
        out[:, 7] = 0.0
        return out

    out = engine.generate([1, 5, 6], SamplingParams(max_tokens=5, temperature=1.0, seed=3, ignore_eos=True,
                                                    logits_processors=[force_seven]))[0]
    assert out.token_ids == [7] * 5
    with pytest.raises(RequestError, match="logits_processors must be a list of callables"):
        SamplingParams(logits_processors=[3])
    with pytest.raises(RequestError, match="must return a tensor of shape"):
        engine.generate([1, 5, 6], SamplingParams(max_tokens=2, logits_processors=[lambda x, ids: x[:, :3]]))
    assert engine.cache_stats()["used"] == 0
    assert engine.generate([1, 5, 6], SamplingParams(max_tokens=2))[0].finish_reason == "length"
