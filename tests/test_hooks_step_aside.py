"""Speculation and overlapped steps with the sampling hooks: exact where they can be (bias and min-p read only the
row's own logits), stepped aside for rows whose processing reads their latest tokens (penalties, logits
processors), prompt log-probabilities and the prompt of a sampled group. CUDA graphs compute logits only, so
the hooks, applied after them, are unaffected (a graphed decode of rows asking for each equals the eager one)."""
import importlib.util
import re

import pytest
import torch

from selfrag_engine import Engine, SamplingParams
from selfrag_engine.engine.scheduler import Batch, Chunk
from selfrag_engine.engine.sequence import Sequence
from selfrag_engine.engine.speculative import speculable
from tests.helpers import tiny_checkpoint

N = 20


def _decode_batch(params: SamplingParams, **seq_kw) -> Batch:
    seq = Sequence(0, [1, 5, 6, 7], 3, params, seed=0, **seq_kw)
    return Batch([Chunk(seq, 3, 1)])


@pytest.mark.parametrize("kw,ok", [
    (dict(), True),
    (dict(logit_bias={5: 3.0}), True),
    (dict(min_p=0.2), True),
    (dict(repetition_penalty=1.2), False),
    (dict(presence_penalty=0.5), False),
    (dict(frequency_penalty=-0.5), False),
    (dict(logits_processors=[lambda x, ids: x]), False),
])
def test_speculation_steps_aside_for_rows_that_read_their_tokens(kw, ok):
    assert speculable(_decode_batch(SamplingParams(**kw))) is ok


def test_speculation_steps_aside_for_prompt_rows():
    # A one-token last prompt chunk looks like a decode row; it must not be drafted when its prompt
    # log-probabilities are pending, nor when it is the prompt of a sampled group.
    assert not speculable(_decode_batch(SamplingParams(prompt_logprobs=0)))
    assert not speculable(_decode_batch(SamplingParams(), prefill_only=True))


@pytest.fixture(scope="module")
def path():
    return tiny_checkpoint(seed=39, num_key_value_heads=2)


def _engine(path, **kw):
    return Engine.from_pretrained(path, dtype=torch.float32, progress=False, **kw)


# Repetitive prompts give the prompt-lookup drafts something to copy.
PROMPTS = ["a b c d a b c d a b c d a b c", "one two three one two three one two"]


def test_speculating_engine_equals_plain_decoding(path):
    plain, spec = _engine(path), _engine(path, num_draft_tokens=4)
    for extra, drafted in ((dict(logit_bias={7: 2.0}, min_p=0.1, temperature=0.8, seed=3), True),
                           (dict(repetition_penalty=1.4, presence_penalty=0.4, temperature=0.0), False)):
        params = SamplingParams(max_tokens=N, ignore_eos=True, **extra)
        before = spec.speculation_stats()["verify_passes"]
        a = plain.generate(PROMPTS, params)
        b = spec.generate(PROMPTS, params)
        assert [o.token_ids for o in a] == [o.token_ids for o in b]
        for x, y in zip(a, b):
            assert x.token_logprobs == pytest.approx(y.token_logprobs, abs=1e-5)
        assert (spec.speculation_stats()["verify_passes"] > before) is drafted


def test_overlapped_engine_steps_aside_for_penalties(path):
    plain, overlapped = _engine(path), _engine(path, overlap=True)
    ahead = []
    schedule_ahead = overlapped.scheduler.schedule_ahead
    overlapped.scheduler.schedule_ahead = lambda seqs: ahead.append(len(seqs)) or schedule_ahead(seqs)
    params = SamplingParams(max_tokens=N, ignore_eos=True, temperature=0.0, frequency_penalty=1.0)
    assert [o.token_ids for o in overlapped.generate(PROMPTS, params)] == \
        [o.token_ids for o in plain.generate(PROMPTS, params)]
    assert not ahead, "no step may be launched ahead of a penalized row's token"
    biased = SamplingParams(max_tokens=N, ignore_eos=True, temperature=0.0, logit_bias={9: 1.5})
    assert [o.token_ids for o in overlapped.generate(PROMPTS, biased)] == \
        [o.token_ids for o in plain.generate(PROMPTS, biased)]
    assert ahead, "a bias alone does not stop steps launched ahead"


class _GraphStandIn:
    """The runner's view of captured decode graphs on the torch path: `run` fills one output buffer reused by
    every replay, as a graph does (its static-buffer arithmetic is test_cuda_graph's concern), and counts."""

    def __init__(self, engine: Engine):
        self.model, self.kv_caches = engine.model, engine.kv_caches
        self.out = torch.full((8, engine.config.vocab_size), float("nan"))
        self.rows: list[int] = []

    def fits(self, batch: int, num_blocks: int) -> bool:
        return batch <= self.out.shape[0]

    def run(self, input_ids, positions, meta):
        hidden = self.model(input_ids, positions, meta, self.kv_caches)
        batch = input_ids.shape[0]
        self.out.fill_(float("nan"))
        self.out[:batch] = self.model.compute_logits(hidden)
        self.rows.append(batch)
        return self.out[:batch]


def test_graphed_decode_honours_every_hook(path):
    """Graphs make the logits; penalties, bias, min-p, processors and grammars apply after them: rows asking for
    each, graphed in one batch, decode as eagerly."""
    def last_token_away(logits, output_token_ids):
        for r, ids in enumerate(output_token_ids):
            if ids:
                logits[r, ids[-1]] -= 5.0
        return logits

    rows = [SamplingParams(max_tokens=N, ignore_eos=True, temperature=0.0),
            SamplingParams(max_tokens=N, ignore_eos=True, temperature=0.0, repetition_penalty=1.5,
                           presence_penalty=0.5, frequency_penalty=0.5),
            SamplingParams(max_tokens=N, ignore_eos=True, temperature=0.9, seed=4, logit_bias={7: 2.0}, min_p=0.1),
            SamplingParams(max_tokens=N, ignore_eos=True, temperature=0.0, logits_processors=[last_token_away])]
    if importlib.util.find_spec("xgrammar") is not None:  # structured output's optional dependency
        from selfrag_engine.engine.structured_output import StructuredOutput

        rows.append(SamplingParams(max_tokens=N, temperature=0.0, structured=StructuredOutput(regex="[a-z]{3,12}")))
    prompts = (PROMPTS * 3)[:len(rows)]
    eager = _engine(path).generate(prompts, rows)
    engine = _engine(path)
    engine.runner.graphs = graphs = _GraphStandIn(engine)
    graphed = engine.generate(prompts, rows)
    assert graphs.rows and max(graphs.rows) == len(rows)  # decode steps of the whole batch went through it
    for x, y in zip(eager, graphed):
        assert x.token_ids == y.token_ids
        assert x.token_logprobs == pytest.approx(y.token_logprobs, abs=1e-5)
    if len(rows) == 5:
        assert re.fullmatch("[a-z]{3,12}", graphed[4].text), graphed[4].text
