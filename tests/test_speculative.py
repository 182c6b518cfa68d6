"""Passage-copy speculative decoding: every output equals plain decoding's, greedy or sampled (tokens, text,
stop reasons, log-probabilities, top-n, reflection probabilities, Self-RAG answers), with forks, preemption,
stops, the prefix cache and overlapped steps, on the torch path and under the Triton interpreter; no block
leaks."""
from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from selfrag_engine import Engine, SamplingParams
from selfrag_engine.engine.speculative import DraftPool, draft_limit, propose
from selfrag_engine.errors import EngineConfigError
from selfrag_engine.selfrag.long_form import LongFormSelfRAG
from selfrag_engine.selfrag.scoring import ScoringConfig
from selfrag_engine.selfrag.short_form import SelfRAG
from tests.helpers import tiny_checkpoint
from tests.selfrag_fixtures import CKPT, passages, question, steered_engine, used_blocks

K = 4
# Verify steps compute a row's positions in one prefill-style call, plain decoding one at a time: the same
# math in another order, so probabilities agree to float32 rounding, and tokens exactly.
TOL = 1e-4


def same(a, b, path: str = "") -> None:
    """a equals b: exactly for tokens, text and decisions, to TOL for floats and tensors (timings skipped)."""
    if dataclasses.is_dataclass(a):
        assert type(a) is type(b), path
        for f in dataclasses.fields(a):
            if f.name not in ("seconds", "request_id"):
                same(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            if k != "seconds":
                same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.shape == b.shape and torch.allclose(a, b, atol=TOL, rtol=0, equal_nan=True), path
    elif isinstance(a, float) and not isinstance(b, int) or isinstance(b, float):
        assert (math.isinf(a) and a == b) or a == pytest.approx(b, abs=TOL), path
    else:
        assert a == b, path


def engine_pair(**options) -> tuple[Engine, Engine]:
    return (Engine.from_pretrained(tiny_checkpoint(**CKPT), progress=False, num_draft_tokens=0, **options),
            Engine.from_pretrained(tiny_checkpoint(**CKPT), progress=False, num_draft_tokens=K, **options))


@pytest.fixture(scope="module")
def pair():
    return engine_pair()


@pytest.fixture(scope="module")
def steered_pair():
    return steered_engine(num_draft_tokens=0), steered_engine(num_draft_tokens=K)


def copying_prompts(engine: Engine, n: int, seed: int) -> list[list[int]]:
    """Prompts that repeat a random span, so that drafts of the continuation exist and are sometimes right."""
    rng = random.Random(seed)
    vocab = engine.config.vocab_size
    out = []
    for _ in range(n):
        span = [rng.randrange(3, vocab) for _ in range(rng.randint(4, 12))]
        out.append([engine.tokenizer.bos_id] + span + [rng.randrange(3, vocab) for _ in range(3)] + span[:3])
    return out


def drafted_and_rejected(engine: Engine, before: dict) -> bool:
    after = engine.speculation_stats()
    accepted = after["accepted"] - before["accepted"]
    drafted = after["drafted"] - before["drafted"]
    return 0 < accepted < drafted


# ---- drafting ----------------------------------------------------------------------------------------

def test_propose_takes_the_latest_match_of_the_longest_suffix():
    #            0  1  2  3  4  5  6  7  8  9 10
    tokens = [5, 1, 2, 9, 1, 2, 7, 8, 3, 1, 2]
    assert propose(tokens, 3) == [7, 8, 3]  # "1 2" last seen at 4..5 (the 3-gram "3 1 2" never)
    assert propose(tokens, 1) == [7]
    assert propose([4, 1, 2, 3, 6, 2, 3], 2) == [6, 2]  # the 2-gram "2 3" beats the latest "3"
    assert propose([1, 2, 3, 4], 4) == []  # nothing recurs
    assert propose([7, 7, 7], 4) == [7]  # a match may run into the suffix itself
    assert propose([], 4) == [] and propose([3], 4) == []


def test_the_pool_drafts_what_earlier_outputs_wrote():
    pool = DraftPool(width=3)
    pool.add([9, 4, 5, 6, 7, 8])
    assert propose([1, 2, 4, 5], 3, pool) == [6, 7, 8]  # 2-gram "4 5" from the pool
    assert propose([1, 4, 5, 6], 2, pool) == [7, 8]  # the 3-gram first
    assert propose([4, 5, 1, 4, 5], 3, pool) == [1, 4, 5]  # the row's own context comes first
    assert propose([1, 2, 3], 3, pool) == []
    small = DraftPool(width=2, capacity=3)
    small.add(list(range(10)))
    assert len(small.table) == 3 and propose([0, 6, 7, 8], 2, small) == [9]
    assert propose([9, 1, 2], 2, small) == []  # written first, dropped first


def test_drafts_stop_at_max_tokens_and_the_model_length(pair):
    _, spec = pair
    rid = spec.add_request([1, 5, 6, 5, 6], SamplingParams(max_tokens=3, temperature=0))
    seq = spec.seqs[rid]
    assert draft_limit(seq, K, 100) == 2  # 3 tokens to go: the last comes from the verify step's last row
    assert draft_limit(seq, K, 7) == 1  # positions up to 6 only
    assert draft_limit(seq, K, 6) == 0
    spec.forget(rid)


def test_num_draft_tokens_option():
    ckpt = tiny_checkpoint(**CKPT)
    assert Engine.from_pretrained(ckpt, progress=False).num_draft_tokens == 0  # off by default on the CPU
    for bad in (-1, True, 1.5, "4"):
        with pytest.raises(EngineConfigError, match="num_draft_tokens"):
            Engine.from_pretrained(ckpt, progress=False, num_draft_tokens=bad)


# ---- plain generation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=20, temperature=0),
    SamplingParams(max_tokens=16, temperature=0, logprobs=5, reflection=True),
    SamplingParams(max_tokens=7, temperature=0, logprobs=1),
], ids=["greedy", "logprobs_reflection", "short"])
def test_generate_equals_plain_decoding(pair, params):
    plain, spec = pair
    prompts = copying_prompts(plain, 4, seed=3)
    before = spec.speculation_stats()
    same(plain.generate(prompts, params), spec.generate(prompts, params))
    # Later cases run the same prompts again: the draft pool then knows their outputs.
    assert spec.speculation_stats()["accepted"] > before["accepted"]
    assert used_blocks(spec) == 0 and spec.cache_stats() == plain.cache_stats()


def accepting_prompt(spec: Engine, seed: int) -> list[int]:
    """Of a few candidate prompts, the one whose greedy continuation accepts the most drafts."""
    best = (-1.0, [])
    for p in copying_prompts(spec, 8, seed):
        before = spec.speculation_stats()["accepted"]
        spec.generate([p], SamplingParams(max_tokens=30, temperature=0))
        best = max(best, (spec.speculation_stats()["accepted"] - before, p))
    assert best[0] >= 3
    return best[1]


def test_stops_inside_an_accepted_run(pair):
    """Every max_tokens, stop token and stop string that falls in the output ends the request where plain
    decoding ends it, also inside a verified run (the tokens verified after the stop are dropped)."""
    plain, spec = pair
    prompt = accepting_prompt(spec, seed=5)
    ref = plain.generate([prompt], SamplingParams(max_tokens=30, temperature=0))[0]
    text = ref.text
    params = [SamplingParams(max_tokens=m, temperature=0, logprobs=2) for m in range(1, len(ref.token_ids) + 1)]
    params += [SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[t], reflection=True)
               for t in sorted(set(ref.token_ids))]
    pieces = {text[i:i + 2] for i in range(0, len(text) - 2, max(1, len(text) // 12))}
    params += [SamplingParams(max_tokens=30, temperature=0, stop=[piece], include_stop_str_in_output=include)
               for piece in sorted(pieces) if piece.strip() for include in (False, True)]
    before = spec.speculation_stats()
    a, b = plain.generate([prompt] * len(params), params), spec.generate([prompt] * len(params), params)
    same(a, b)
    assert {o.finish_reason for o in a} == {"stop", "length"}
    assert drafted_and_rejected(spec, before)
    assert used_blocks(spec) == 0


def test_eos_and_the_model_length(steered_pair):
    """The steered model writes EOS now and then; max_model_len cuts others short."""
    plain, spec = steered_pair
    rng = random.Random(8)
    prompts = [plain.tokenizer.encode(question(rng) + " " + passages(rng, 1)[0].text) for _ in range(5)]
    params = SamplingParams(max_tokens=28, temperature=0, reflection=True, logprobs=1)
    a, b = plain.generate(prompts, params), spec.generate(prompts, params)
    same(a, b)
    assert {o.finish_reason for o in a} == {"stop", "length"}
    short = [Engine.from_pretrained(tiny_checkpoint(**CKPT), progress=False, num_draft_tokens=k,
                                    max_model_len=max(map(len, prompts)) + 6) for k in (0, K)]
    same(short[0].generate(prompts, params), short[1].generate(prompts, params))
    assert used_blocks(spec) == 0 and used_blocks(short[1]) == 0


def test_sampling_rows_mixed_with_greedy_rows(pair):
    """Greedy and sampling rows speculate together. Draws are keyed by seed and position, not by batching
    or by the step that makes them, so every output matches."""
    plain, spec = pair
    prompts = copying_prompts(plain, 4, seed=11)
    params = [SamplingParams(max_tokens=20, temperature=0), SamplingParams(max_tokens=6, temperature=0.8, seed=4),
              SamplingParams(max_tokens=20, temperature=0, logprobs=3), SamplingParams(max_tokens=3, temperature=1.0,
                                                                                       seed=9, top_k=5)]
    before = spec.speculation_stats()
    same(plain.generate(prompts, params), spec.generate(prompts, params))
    assert spec.speculation_stats()["verify_passes"] > before["verify_passes"]


def test_prefix_cache_never_holds_rolled_back_tokens(pair):
    """A prompt extending a speculated request's tokens reuses its cached blocks: they must hold the K/V of
    those tokens, not of rejected drafts."""
    plain, spec = pair
    prompts = copying_prompts(plain, 3, seed=13)
    params = SamplingParams(max_tokens=24, temperature=0, logprobs=2)
    first = spec.generate(prompts, params)
    longer = [p + o.token_ids for p, o in zip(prompts, first)]
    cached_before = spec.cache_stats()["cached"]
    assert cached_before > 0
    same(plain.generate(longer, params), spec.generate(longer, params))
    fresh = Engine.from_pretrained(tiny_checkpoint(**CKPT), progress=False, enable_prefix_caching=False)
    same(fresh.generate(longer, params), spec.generate(longer, params))


# ---- forks and preemption -----------------------------------------------------------------------------

def _forked(engine: Engine, prompt: list[int], suffixes: list[list[int]], params: SamplingParams):
    parent = engine.add_request(prompt, SamplingParams(max_tokens=6, temperature=0), keep_cache=True)
    engine.run([parent])
    kids = engine.fork(parent, suffixes, params, keep_cache=True)
    outs = engine.run(kids)
    # Paused children keep their blocks: a second-level fork reads them, after the rollbacks.
    grand = engine.fork(kids[0], [[5, 6]], params)
    outs += engine.run(grand)
    for r in [parent, *kids]:
        engine.release(r)
    for r in [parent, *kids, *grand]:
        engine.forget(r)
    return outs


def test_forked_branches(pair):
    plain, spec = pair
    prompt = copying_prompts(plain, 1, seed=17)[0]
    suffixes = [prompt[1:4], prompt[2:9], [7], prompt[5:7] + prompt[1:3]]
    params = SamplingParams(max_tokens=25, temperature=0, reflection=True, logprobs=3)
    before = spec.speculation_stats()
    same(_forked(plain, prompt, suffixes, params), _forked(spec, prompt, suffixes, params))
    assert drafted_and_rejected(spec, before)
    assert used_blocks(spec) == 0 and not spec.seqs


def test_preemption_under_a_tight_pool():
    """A pool too small for every request at once: the newest are preempted and recomputed, with and
    without drafts (which never preempt: a draft that does not fit is dropped)."""
    outs = []
    for k in (0, K):
        engine = Engine.from_pretrained(tiny_checkpoint(**CKPT), progress=False, num_draft_tokens=k,
                                        block_size=4, num_blocks=24)
        prompts = copying_prompts(engine, 5, seed=19)
        outs.append(engine.generate(prompts, SamplingParams(max_tokens=30, temperature=0, logprobs=1)))
        assert used_blocks(engine) == 0
        engine.scheduler.block_manager.check_invariants()
    same(*outs)


# ---- Self-RAG -----------------------------------------------------------------------------------------

def test_short_form(steered_pair):
    plain, spec = steered_pair
    rng = random.Random(23)
    qs = [question(rng) for _ in range(3)]
    docs = [passages(rng, 4) for _ in qs]
    for mode in ("always", "adaptive"):
        answers = [SelfRAG(e, max_new_tokens=16, mode=mode).answer_batch(qs, docs) for e in (plain, spec)]
        same(*answers)
    released = [SelfRAG(e, scoring=ScoringConfig.released(threshold=0.2), max_new_tokens=12, compat="released",
                        mode="adaptive").answer(qs[0], docs[0]) for e in (plain, spec)]
    same(*released)
    assert spec.speculation_stats()["verify_passes"] > 0
    assert used_blocks(spec) == 0 and not spec.seqs


def test_long_form(steered_pair):
    plain, spec = steered_pair
    rng = random.Random(29)
    qs = [question(rng) for _ in range(2)]
    docs = [passages(rng, 3) for _ in qs]
    for kwargs in (dict(mode="always", beam_width=2, max_depth=3), dict(mode="adaptive", max_depth=2),
                   dict(mode="always", max_depth=2, compat="released")):
        answers = [LongFormSelfRAG(e, ndocs=3, max_new_tokens=10, **kwargs).answer_batch(qs, docs)
                   for e in (plain, spec)]
        same(*answers)
    assert used_blocks(spec) == 0 and not spec.seqs


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.6, 1.0, 0), (1.0, 0.9, 0), (0.8, 1.0, 4)])
def test_sampling_rows_speculate_and_draw_what_plain_sampling_draws(pair, temperature, top_p, top_k):
    """Sampling rows alone: verify steps run, some drafts are accepted and some rejected, and every output
    (tokens, log-probabilities, reflection probabilities) is the one plain sampling draws with the seed."""
    plain, spec = pair
    prompts = copying_prompts(plain, 12, seed=int(temperature * 100) + top_k)
    params = [SamplingParams(max_tokens=24, temperature=temperature, top_p=top_p, top_k=top_k, seed=s,
                             logprobs=2, reflection=True) for s in range(len(prompts))]
    before = spec.speculation_stats()
    same(plain.generate(prompts, params), spec.generate(prompts, params))
    assert spec.speculation_stats()["verify_passes"] > before["verify_passes"]
    assert drafted_and_rejected(spec, before)
    assert used_blocks(spec) == 0


# ---- overlapped steps and the Triton interpreter ------------------------------------------------------

def test_overlapped_steps(pair):
    plain, _ = pair
    overlapped = Engine.from_pretrained(tiny_checkpoint(**CKPT), progress=False, overlap=True, num_draft_tokens=K)
    prompts = copying_prompts(plain, 4, seed=31)
    params = [SamplingParams(max_tokens=18, temperature=0, logprobs=2),
              SamplingParams(max_tokens=12, temperature=0.7, seed=3)] * 2
    same(plain.generate(prompts, params), overlapped.generate(prompts, params))
    assert overlapped.speculation_stats()["verify_passes"] > 0 and used_blocks(overlapped) == 0


def test_triton_interpreter(pair):
    """The kernels' paths (prefill attention over the paged cache for verify steps, decode attention for
    plain ones, the fused sampler), run by the interpreter."""
    plain, spec = engine_pair(use_kernels=True, max_num_seqs=4)
    prompts = [accepting_prompt(pair[1], seed=37)]
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=2, reflection=True)
    same(plain.generate(prompts, params), spec.generate(prompts, params))
    assert spec.speculation_stats()["accepted"] > 0
    rng = random.Random(41)
    q, docs = question(rng), passages(rng, 2)
    same(*[SelfRAG(e, max_new_tokens=5, mode="always").answer(q, docs) for e in (plain, spec)])
    # The long form, in both flavours, on the same kernels.
    for compat in ("paper", "released"):
        same(*[LongFormSelfRAG(e, ndocs=2, max_new_tokens=4, max_depth=2, mode="always", compat=compat
                               ).answer(q, docs) for e in (plain, spec)])
    assert used_blocks(spec) == 0
