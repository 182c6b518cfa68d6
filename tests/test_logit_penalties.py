"""Penalties, logit bias and min-p: the Triton kernel (interpreted) and the torch path against a float64
reference, both against transformers' own processors and OpenAI's published formula, and end to end against
transformers' generate with the same processor."""
import math

import pytest
import torch

from selfrag_engine import Engine, RequestError, SamplingParams
from selfrag_engine.engine.logits_processing import logit_bias_rows, token_counts
from selfrag_engine.kernels.logit_penalties import apply_penalties as kernel
from selfrag_engine.layers.penalties import apply_penalties_torch
from tests.helpers import hf_model, tiny_checkpoint

R, V = 6, 333


def _inputs(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(R, V, generator=g) * 3).to(dtype)
    out_ids = [torch.randint(0, V, (int(n),), generator=g).tolist() for n in torch.randint(0, 40, (R,), generator=g)]
    prompt_ids = [torch.randint(0, V, (15,), generator=g).tolist() for _ in range(R)]
    counts = token_counts(out_ids, V, torch.device("cpu"))
    seen = token_counts([p + o for p, o in zip(prompt_ids, out_ids)], V, torch.device("cpu")) > 0
    params = [SamplingParams(presence_penalty=0.7, frequency_penalty=0.3, repetition_penalty=1.3, min_p=0.05,
                             logit_bias={3: 5.0, 17: -100.0}),
              SamplingParams(presence_penalty=-1.5, repetition_penalty=0.6, min_p=0.3, temperature=0.5),
              SamplingParams(frequency_penalty=2.0, temperature=0.0, min_p=0.5),  # greedy: min-p is off
              SamplingParams(),  # nothing asked: the row must come back as it was
              SamplingParams(logit_bias={0: 1.5, V - 1: -2.0}, min_p=1.0, temperature=2.0),
              SamplingParams(repetition_penalty=2.0, frequency_penalty=-2.0, temperature=1.3, min_p=0.01)]
    bias = logit_bias_rows(params, V, torch.device("cpu"))
    per_row = torch.tensor([[p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p, p.temperature]
                            for p in params], dtype=torch.float32).T.contiguous()
    return logits, counts, seen, bias, per_row, out_ids, prompt_ids, params


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_equals_float64_reference(dtype, poisoned_alloc):
    logits, counts, seen, bias, (pres, freq, rep, min_p, temp), *_ = _inputs(1, dtype)
    ref = apply_penalties_torch(logits.double(), counts, seen, bias.double(), pres, freq, rep, min_p, temp)
    got = kernel(logits, counts, seen, bias, pres, freq, rep, min_p, temp)
    assert not got.isnan().any()
    assert torch.equal(torch.isinf(got), torch.isinf(ref)), "min-p must drop the same tokens"
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin].double(), ref[fin], rtol=1e-6, atol=1e-5)
    assert torch.equal(got[3], logits[3].float()), "a row that asks for nothing is unchanged"
    torch_path = apply_penalties_torch(logits, counts, seen, bias, pres, freq, rep, min_p, temp)
    assert torch.equal(torch.isinf(torch_path), torch.isinf(ref))
    torch.testing.assert_close(torch_path[fin].double(), ref[fin], rtol=1e-6, atol=1e-5)


def test_kernel_without_optional_inputs(poisoned_alloc):
    logits, counts, seen, bias, (pres, freq, rep, min_p, temp), *_ = _inputs(2)
    ref = apply_penalties_torch(logits.double(), counts, None, None, pres, freq, rep, min_p, temp, use_min_p=False)
    got = kernel(logits, counts, None, None, pres, freq, rep, min_p, temp, use_min_p=False)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-5)


def _neutral(**kw):
    z = torch.zeros(R)
    d = dict(presence=z, frequency=z, repetition=torch.ones(R), min_p=z, temperature=torch.ones(R))
    d.update(kw)
    return d


def test_repetition_penalty_equals_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits, _, seen, _, _, out_ids, prompt_ids, _ = _inputs(3)
    ids = torch.tensor([p + o[:10] + [p[0]] * (10 - len(o[:10])) for p, o in zip(prompt_ids, out_ids)])
    seen = token_counts(ids.tolist(), V, torch.device("cpu")) > 0
    for penalty in (1.3, 0.7):
        ref = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        got = kernel(logits, None, seen, None, **_neutral(repetition=torch.full((R,), penalty)), use_min_p=False)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_min_p_equals_transformers():
    from transformers import MinPLogitsWarper

    logits, *_ = _inputs(4)
    for min_p, t in ((0.1, 1.0), (0.02, 0.7), (0.5, 1.8)):
        ref = MinPLogitsWarper(min_p)(None, logits / t)
        got = kernel(logits, None, None, None, **_neutral(min_p=torch.full((R,), min_p),
                                                         temperature=torch.full((R,), t)))
        assert torch.equal(torch.isinf(got), torch.isinf(ref))
        assert (~torch.isinf(got)).sum() < R * V  # something was dropped
        torch.testing.assert_close(got[torch.isfinite(got)], logits[torch.isfinite(got)])


def test_logit_bias_equals_transformers_sequence_bias():
    from transformers import SequenceBiasLogitsProcessor

    logits, *_ = _inputs(5)
    bias = {3: 5.0, 17: -100.0, 200: 0.25}
    ref = SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()})(torch.zeros(R, 1, dtype=torch.long),
                                                                         logits.clone())
    rows = logit_bias_rows([SamplingParams(logit_bias=bias)] * R, V, torch.device("cpu"))
    got = kernel(logits, None, None, rows, **_neutral(), use_min_p=False)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_presence_and_frequency_follow_openai_formula():
    # platform.openai.com/docs/advanced-usage: mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
    logits, counts, _, _, _, out_ids, *_ = _inputs(6)
    pres, freq = torch.linspace(-2, 2, R), torch.linspace(2, -2, R)
    got = kernel(logits, counts, None, None, **_neutral(presence=pres, frequency=freq), use_min_p=False)
    ref = logits.double().clone()
    for r, toks in enumerate(out_ids):
        for j in set(toks):
            c = toks.count(j)
            ref[r, j] = ref[r, j] - c * float(freq[r]) - (c > 0) * float(pres[r])
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-5)


# ---- end to end --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def path():
    return tiny_checkpoint(seed=33, num_key_value_heads=2)


@pytest.fixture(scope="module")
def engine(path):
    return Engine.from_pretrained(path, dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def hf(path):
    return hf_model(path)


PROMPTS = ["the the the cat sat on the mat", "### Instruction:\nCount to ten.\n\n### Response:\n"]
N = 16


def _hf_greedy(hf, engine, prompt, **kw):
    ids = torch.tensor([engine.tokenizer.encode(prompt)])
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                          attention_mask=torch.ones_like(ids), pad_token_id=0, **kw)
    return out[0, ids.shape[1]:].tolist()


class OpenAIPenalties:
    """OpenAI's presence / frequency formula over the generated tokens, as a transformers LogitsProcessor."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        for r in range(scores.shape[0]):
            gen = input_ids[r, self.prompt_len:]
            c = torch.bincount(gen, minlength=scores.shape[1]).to(scores.dtype)
            scores[r] -= c * self.frequency + (c > 0).to(scores.dtype) * self.presence
        return scores


@pytest.mark.parametrize("case", ["repetition", "presence_frequency", "logit_bias"])
def test_penalties_change_greedy_output_as_transformers_does(engine, hf, case):
    from transformers import LogitsProcessorList

    plain = engine.generate(PROMPTS, SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True))
    changed = 0
    for prompt, base in zip(PROMPTS, plain):
        n_prompt = len(engine.tokenizer.encode(prompt))
        if case == "repetition":
            params, kw = dict(repetition_penalty=1.8), dict(repetition_penalty=1.8)
        elif case == "presence_frequency":
            params = dict(presence_penalty=1.5, frequency_penalty=0.8)
            kw = dict(logits_processor=LogitsProcessorList([OpenAIPenalties(n_prompt, 1.5, 0.8)]))
        else:
            favoured = base.token_ids[1]  # pushed up from the second step on: the output must change
            bias = {favoured: 8.0, base.token_ids[0]: -3.0}
            params, kw = dict(logit_bias=bias), dict(sequence_bias={(t,): b for t, b in bias.items()})
        out = engine.generate(prompt, SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True, logprobs=2,
                                                     **params))[0]
        assert out.token_ids == _hf_greedy(hf, engine, prompt, **kw)
        changed += out.token_ids != base.token_ids
        # The log-probabilities stay those of the raw logits.
        full = torch.tensor([engine.tokenizer.encode(prompt) + out.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(hf(full).logits[0].double(), -1)
        for step, tok in enumerate(out.token_ids):
            assert out.token_logprobs[step] == pytest.approx(float(logp[n_prompt - 1 + step, tok]), abs=1e-4)
            top = torch.topk(logp[n_prompt - 1 + step], 2).indices.tolist()
            assert set(top) <= set(out.logprobs[step])
    assert changed, "the option was meant to change the greedy output"


def test_min_p_one_samples_the_argmax(engine):
    greedy = engine.generate(PROMPTS, SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True))
    sampled = engine.generate(PROMPTS, SamplingParams(max_tokens=N, temperature=1.5, min_p=1.0, seed=7,
                                                      ignore_eos=True))
    free = engine.generate(PROMPTS, SamplingParams(max_tokens=N, temperature=1.5, seed=7, ignore_eos=True))
    assert [o.token_ids for o in sampled] == [o.token_ids for o in greedy]
    assert [o.token_ids for o in free] != [o.token_ids for o in greedy]


def test_penalized_rows_batch_with_plain_rows(engine):
    """A batch mixing penalized and plain rows gives each row what it gets alone."""
    params = [SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True, repetition_penalty=1.8),
              SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True)]
    both = engine.generate(PROMPTS, params)
    alone = [engine.generate(p, sp)[0] for p, sp in zip(PROMPTS, params)]
    assert [o.token_ids for o in both] == [o.token_ids for o in alone]


@pytest.mark.parametrize("field,value,match", [
    ("presence_penalty", 2.5, r"presence_penalty must be a number in \[-2, 2\]"),
    ("frequency_penalty", -2.01, r"frequency_penalty must be a number in \[-2, 2\]"),
    ("frequency_penalty", math.nan, "frequency_penalty"),
    ("repetition_penalty", 0.0, "repetition_penalty must be a finite number > 0"),
    ("repetition_penalty", math.inf, "repetition_penalty"),
    ("min_p", 1.5, r"min_p must be in \[0, 1\]"),
    ("min_p", True, "min_p"),
    ("logit_bias", {5: 101.0}, r"logit_bias values must be numbers in \[-100, 100\]"),
    ("logit_bias", {"5": 1.0}, "logit_bias keys must be token ids"),
    ("logit_bias", [5], "logit_bias must be a dict"),
])
def test_out_of_range_is_refused(field, value, match):
    with pytest.raises(RequestError, match=match):
        SamplingParams(**{field: value})


def test_logit_bias_outside_the_vocabulary_is_refused(engine):
    with pytest.raises(RequestError, match="logit_bias keys must be token ids of the vocabulary"):
        engine.generate("hi", SamplingParams(logit_bias={engine.config.vocab_size: 1.0}))


def test_triton_engine_equals_torch_engine(path):
    """The whole engine on the Triton kernels (interpreted here) applies the hooks as the torch path does."""
    fast = Engine.from_pretrained(path, dtype=torch.float32, progress=False, use_kernels=True)
    ref = Engine.from_pretrained(path, dtype=torch.float32, progress=False, use_kernels=False)
    # min_p=1 keeps only the top token: the two backends' random draws differ, the kept set does not.
    params = [SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, repetition_penalty=1.5,
                             frequency_penalty=0.5, logit_bias={11: 2.0}),
              SamplingParams(max_tokens=5, temperature=0.9, ignore_eos=True, min_p=1.0, presence_penalty=1.0,
                             seed=4)]
    a, b = fast.generate(PROMPTS, params), ref.generate(PROMPTS, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    for x, y in zip(a, b):
        assert x.token_logprobs == pytest.approx(y.token_logprobs, abs=1e-4)
