"""compat="paper" vs compat="released": one test per place where the reference scripts differ from the paper
(docs/SELFRAG.md, "compat"), each on a case where the two flavours must diverge, each flavour checked
against values computed here from a fresh full-vocabulary scoring pass."""
import math
import random

import pytest
import torch

from selfrag_engine import RequestError, SamplingParams
from selfrag_engine.selfrag.evaluate import build_runner
from selfrag_engine.selfrag.long_form import LongFormSelfRAG, ScriptQuirks
from selfrag_engine.selfrag.prompts import format_passage, format_prompt
from selfrag_engine.selfrag.scoring import ScoringConfig
from selfrag_engine.selfrag.short_form import SelfRAG
from selfrag_engine.selfrag.tasks import PRESETS
from tests.selfrag_fixtures import RecordingRetriever, passages, probs_at, question, steered_engine, used_blocks


@pytest.fixture(scope="module", params=[(False, 0), (True, 0), (False, 4)], ids=["plain", "overlap", "speculative"])
def engine(request):
    overlap, num_draft_tokens = request.param
    return steered_engine(overlap=overlap, num_draft_tokens=num_draft_tokens)


@pytest.fixture(scope="module")
def ids(engine):
    return engine.tokenizer.reflection_token_ids()


def _clean(engine):
    return used_blocks(engine) == 0 and not engine.seqs


def _prompt(engine, q):
    return engine.tokenizer.encode(format_prompt(q))


def _suffix(engine, doc):
    return engine.tokenizer.encode(format_passage(doc.title, doc.text), add_bos=False)


def _nodes(ans, depth=None):
    return [n for n in ans.trace["nodes"] if depth is None or n["depth"] == depth]


# ---- 1. the short-form gate divides log-probabilities ---------------------------------------------------


def test_1_short_form_gate_divides_logprobs(engine, ids):
    rng = random.Random(51)
    R, N = ids.retrieval[:2]
    for _ in range(50):
        q = question(rng)
        p = probs_at(engine, _prompt(engine, q))
        by_prob = float(p[R] / (p[R] + p[N]))
        by_logprob = float(torch.log(p[R]) / (torch.log(p[R]) + torch.log(p[N])))
        if abs(by_prob - by_logprob) > 0.02:
            break
    threshold = (by_prob + by_logprob) / 2  # the flavours fall on opposite sides of it
    docs = passages(rng, 2)
    paper = SelfRAG(engine, scoring=ScoringConfig.paper(threshold=threshold), max_new_tokens=3).answer(q, docs)
    released = SelfRAG(engine, scoring=ScoringConfig.released(threshold=threshold), max_new_tokens=3,
                       compat="released").answer(q, docs)
    assert paper.retrieval_probability == pytest.approx(by_prob, abs=1e-5)
    assert released.retrieval_probability == pytest.approx(by_logprob, abs=1e-5)
    assert paper.retrieved == (by_prob > threshold)
    assert released.retrieved == (by_logprob > threshold)
    assert paper.retrieved != released.retrieved
    assert _clean(engine)


# ---- 2. the short form decodes a whole no-retrieval draft before deciding ---------------------------------


def test_2_short_form_decodes_a_draft_first(engine, ids):
    rng = random.Random(77)
    q, n = question(rng), rng.randint(5, 9)
    paper = SelfRAG(engine, max_new_tokens=n, mode="never").answer(q)
    released = SelfRAG(engine, max_new_tokens=n, mode="never", compat="released")
    ans = released.answer(q)
    draft = engine.generate([_prompt(engine, q)], SamplingParams(max_tokens=n, temperature=0.0))[0]
    greedy = SamplingParams(max_tokens=n, temperature=0.0)
    continued = engine.generate([_prompt(engine, q) + [ids.retrieval[1]]], greedy)[0]
    # The draft is vLLM's text as the script keeps it (not post-processed, the first word's space kept).
    assert paper.draft is None
    assert ans.draft == engine.tokenizer.decode_continuation(draft.token_ids, _prompt(engine, q))
    assert paper.answer == released._text(continued.token_ids)
    # Without retrieval the script post-processes vLLM's text of the continuation its own way: control tokens
    # and newlines out, the leading space kept.
    text = engine.tokenizer.decode_continuation(continued.token_ids, _prompt(engine, q) + [ids.retrieval[1]])
    assert ans.answer == text.replace("\n", "")
    assert paper.num_generated_tokens == len(continued.token_ids)
    assert ans.num_generated_tokens == len(continued.token_ids) + len(draft.token_ids)
    # Retrieving, the draft is decoded all the same; the gate reads its first position.
    docs = passages(rng, 2)
    cfg = ScoringConfig.released(threshold=-1e9)
    adaptive = SelfRAG(engine, scoring=cfg, max_new_tokens=n, compat="released").answer(q, docs)
    assert adaptive.retrieved and adaptive.draft == ans.draft
    assert adaptive.num_generated_tokens == len(draft.token_ids) + sum(len(b.token_ids) for b in adaptive.branches)
    assert _clean(engine)


# ---- 3. no threshold: the short-form script fails; reported as an error ----------------------------------


def test_3_missing_threshold(engine, ids):
    rng = random.Random(107)
    q, docs = question(rng), passages(rng, 2)
    released = SelfRAG(engine, scoring=ScoringConfig.released(threshold=None), compat="released", max_new_tokens=3)
    with pytest.raises(RequestError, match="needs a threshold"):
        released.answer(q, docs)
    assert released.answer(q, docs, mode="always").retrieved  # no gate, no threshold needed
    # The paper flavour lets the model's own first token decide.
    paper = SelfRAG(engine, scoring=ScoringConfig.paper(threshold=None), max_new_tokens=3)
    for q in [question(rng) for _ in range(3)]:
        first = int(probs_at(engine, _prompt(engine, q)).argmax())
        assert paper.answer(q, docs).retrieved == (first == ids.retrieval[0])
    assert _clean(engine)


# ---- 4. top-n log-probabilities, -100 for a missing token (raw -100 in the long-form relevance) ---------


def _truncated(engine, context, tokens, n, generated, raw=False):
    """The scripts' values of `tokens` at the position after `context`: exp(logprob) in the top n (or the
    generated token), else exp(-100), or -100 itself with raw."""
    logits = engine.score(context)[-1].double()
    lp = torch.log_softmax(logits, -1)
    values = []
    for t in tokens:
        here = t == generated or int((logits > logits[t]).sum()) < n
        values.append(math.exp(float(lp[t])) if here else (-100.0 if raw else math.exp(-100.0)))
    return values


@pytest.mark.parametrize("small", [True, False])  # within the sampler's top-20, or past it (a rank pass)
def test_4_top_n_truncation(engine, ids, small):
    rng = random.Random(138)
    q, docs = question(rng), passages(rng, 3)
    n = rng.randint(2, 4) if small else rng.randint(80, 200)
    paper = SelfRAG(engine, mode="always", max_new_tokens=4).answer(q, docs)
    cfg = ScoringConfig.released(threshold=0.2, top_logprobs=n)
    released = SelfRAG(engine, scoring=cfg, mode="always", max_new_tokens=4, compat="released").answer(q, docs)
    diverged = 0
    for b, bp, doc in zip(released.branches, paper.branches, docs):
        ctx = _prompt(engine, q) + _suffix(engine, doc)
        assert b.token_ids == bp.token_ids
        v = _truncated(engine, ctx, ids.relevance, n, b.token_ids[0])
        assert b.relevance == pytest.approx(v[0] / (v[0] + v[1]), rel=1e-4)
        p = probs_at(engine, ctx)
        assert bp.relevance == pytest.approx(float(p[ids.relevance[0]] / p[list(ids.relevance)].sum()), rel=1e-4)
        diverged += abs(b.relevance - bp.relevance) > 1e-3
    assert diverged
    # The long-form script keeps a missing relevance token's -100 as the value itself.
    cfg = ScoringConfig.released(form="long", threshold=0.2, top_logprobs=n)
    long = LongFormSelfRAG(engine, scoring=cfg, ndocs=3, max_new_tokens=4, mode="always", compat="released")
    kids = _nodes(long.answer(q, docs), depth=1)
    raw_seen = 0
    for kid, doc in zip(kids, docs):
        ctx = _prompt(engine, q) + _suffix(engine, doc)
        v = _truncated(engine, ctx, ids.relevance, n, kid["token_ids"][0], raw=True)
        assert kid["relevance"] == pytest.approx(v[0] / (v[0] + v[1]), rel=1e-4)
        raw_seen += -100.0 in v
    assert raw_seen or not small  # with n <= 4 a relevance token is all but surely missing somewhere
    assert _clean(engine)


# ---- 5. the long-form utility reads the grounding ids: always 0 ------------------------------------------


def test_5_long_form_utility_reads_grounding_ids(engine, ids):
    rng = random.Random(172)
    qs = [question(rng) for _ in range(3)]
    docs = [passages(rng, 3) for _ in qs]
    common = dict(ndocs=3, max_new_tokens=16, mode="always", compat="released")
    released = LongFormSelfRAG(engine, **common).answer_batch(qs, docs)
    paper_rules = LongFormSelfRAG(engine, scoring=ScoringConfig.paper(), **common).answer_batch(qs, docs)
    read = 0
    for a, b, q, ds in zip(released, paper_rules, qs, docs):
        for ka, kb, doc in zip(_nodes(a, 1), _nodes(b, 1), ds):
            assert ka["token_ids"] == kb["token_ids"]  # the same children, scored by the two rules
            at = next((i for i, t in enumerate(ka["token_ids"]) if t in ids.utility), None)
            assert ka["utility"] == 0.0
            if at is None:
                assert kb["utility"] == 0.0
                continue
            p = probs_at(engine, _prompt(engine, q) + _suffix(engine, doc) + ka["token_ids"][:at])[list(ids.utility)]
            expect = float(sum(w * x for w, x in zip((-1, -0.5, 0, 0.5, 1), p)) / p.sum())
            assert kb["utility"] == pytest.approx(expect, abs=1e-5) and expect != 0.0
            assert list(ka["probs"]["utility"]) == ["[Fully supported]", "[Partially supported]",
                                                    "[No support / Contradictory]"]
            read += 1
    assert read  # some child wrote a utility token
    assert _clean(engine)


# ---- 6. the long form ignores use_seqscore; its passages are fixed before decoding ------------------------


def test_6_long_form_seqscore_and_fixed_passages(engine):
    rng = random.Random(201)
    q, docs = question(rng), passages(rng, 2)
    runners = {c: build_runner(engine, PRESETS["asqa"], ndocs=2, max_new_tokens=6, max_depth=2, compat=c)
               for c in ("paper", "released")}
    assert runners["paper"].scoring.use_seqscore and not runners["released"].scoring.use_seqscore
    for compat, runner in runners.items():
        for kid in _nodes(runner.answer(q, docs), 1):
            base = kid["relevance"] + kid["grounding"] + 0.5 * kid["utility"]
            expect = base + kid["seq_score"] if compat == "paper" else base
            assert kid["final"] == pytest.approx(expect, abs=1e-6) and kid["seq_score"] > 0
    # Released: the passages are fetched for the question before anything is decoded, even when the tree
    # is never built. Paper: the retriever is asked only when a node asks for evidence, per segment here.
    for mode in ("adaptive", "always"):
        rec = RecordingRetriever(engine)
        ans = LongFormSelfRAG(engine, rec, ndocs=2, max_new_tokens=6, mode=mode, compat="released").answer(q)
        assert rec.queries == [q] and rec.live_requests == [0]
        assert ans.retrieved == (mode == "always")
    rec = RecordingRetriever(engine)
    ans = LongFormSelfRAG(engine, rec, ndocs=2, max_new_tokens=6, max_depth=3, mode="always",
                          retrieval="per_segment").answer(q)
    assert rec.queries[0] == q and len(rec.queries) == len({n["parent"] for n in _nodes(ans)} - {None})
    assert all(live > 0 for live in rec.live_requests)  # asked while decoding
    rec = RecordingRetriever(engine)
    LongFormSelfRAG(engine, rec, mode="adaptive", scoring=ScoringConfig.paper(threshold=1e9),
                    max_new_tokens=6).answer(q)
    assert rec.queries == []
    with pytest.raises(RequestError, match="fixes the passages before decoding"):
        LongFormSelfRAG(engine, rec, compat="released", retrieval="per_segment")
    assert _clean(engine)


# ---- 7. [No Retrieval] rewritten to [Retrieval] inside a long-form child ----------------------------------


def test_7_no_retrieval_rewrite(engine, ids):
    rng = random.Random(236)
    R, N, C = ids.retrieval
    qs = [question(rng) for _ in range(4)]
    docs = [passages(rng, 3) for _ in qs]
    common = dict(ndocs=3, max_new_tokens=20, mode="always", max_depth=2, compat="released")
    plain = LongFormSelfRAG(engine, quirks=ScriptQuirks(strip_special_tokens=False, rewrite_no_retrieval=False),
                            **common).answer_batch(qs, docs)
    gates = {}  # (question, passage) -> the gate at each [No Retrieval] of the child
    for a, q, ds in zip(plain, qs, docs):
        for kid, doc in zip(_nodes(a, 1), ds):
            ctx = _prompt(engine, q) + _suffix(engine, doc)
            values = []
            for step, t in enumerate(kid["token_ids"]):
                if t == N:
                    p = probs_at(engine, ctx + kid["token_ids"][:step])
                    values.append(float((p[R] + p[C]) / (p[R] + p[N])))
            gates[(q, doc)] = values
    found = sorted(v for vs in gates.values() for v in vs)
    assert found, "no child wrote [No Retrieval]"
    threshold = (found[0] + found[1]) / 2 if len(found) > 1 else found[0] - 1e-3
    cfg = ScoringConfig.released(form="long", threshold=threshold)
    rewritten = LongFormSelfRAG(engine, scoring=cfg, quirks=ScriptQuirks(strip_special_tokens=False),
                                **common).answer_batch(qs, docs)
    paper = LongFormSelfRAG(engine, ndocs=3, max_new_tokens=20, mode="always", max_depth=1,
                            scoring=ScoringConfig.paper(threshold=threshold)).answer_batch(qs, docs)
    changed = 0
    for a, b, c, q, ds in zip(plain, rewritten, paper, qs, docs):
        for ka, kb, kc, doc in zip(_nodes(a, 1), _nodes(b, 1), _nodes(c, 1), ds):
            assert ka["token_ids"] == kb["token_ids"]
            values = gates[(q, doc)]
            pieces = ka["pred"].split("[No Retrieval]")
            if not values:
                assert kb["pred"] == ka["pred"]
            else:  # every piece gets its token back, rewritten where the gate exceeds delta, the last one too
                expect = "".join(piece + ("[Retrieval]" if i < len(values) and values[i] > threshold
                                          else "[No Retrieval]") for i, piece in enumerate(pieces))
                assert kb["pred"] == expect
                changed += kb["pred"] != ka["pred"] + "[No Retrieval]"
            # The paper flavour decides while decoding: the child's segment stops at its first retrieval token.
            stop = next((i for i, t in enumerate(ka["token_ids"]) if t in (R, N, C, ids.paragraph_open)), None)
            if stop is not None:
                assert kc["token_ids"][:stop + 1] == ka["token_ids"][:stop + 1]
    assert changed
    assert _clean(engine)


# ---- 8. special tokens stripped before every string test: depth 1 at most, no adaptive retrieval -----------


def test_8_stripped_text_stops_the_tree(engine, ids):
    rng = random.Random(286)
    qs = [question(rng) for _ in range(3)]
    docs = [passages(rng, 3) for _ in qs]
    common = dict(ndocs=3, max_new_tokens=16, mode="always")
    released = LongFormSelfRAG(engine, compat="released", max_depth=3, **common).answer_batch(qs, docs)
    unstripped = LongFormSelfRAG(engine, compat="released", quirks=ScriptQuirks(strip_special_tokens=False),
                                 max_depth=3, **common).answer_batch(qs, docs)
    paper = LongFormSelfRAG(engine, max_depth=2, **common).answer_batch(qs, docs)
    tok = engine.tokenizer
    # The model did ask for evidence inside children, and still no child expanded.
    assert any(ids.retrieval[0] in k["token_ids"] for a in released for k in _nodes(a, 1))
    for a, q, ds in zip(released, qs, docs):
        kids = _nodes(a, 1)
        assert max(n["depth"] for n in _nodes(a)) == 1
        best = max(kids, key=lambda k: k["score"])
        doc = next(d for d in ds if d.title == best["title"])
        # vLLM's text of the child (special tokens stripped), joined after the root's empty text.
        vllm_text = tok.decode_continuation(best["token_ids"], _prompt(engine, q) + _suffix(engine, doc))
        assert a.answer == " ".join(["", vllm_text])
    assert max(n["depth"] for a in unstripped for n in _nodes(a)) == 2
    assert max(n["depth"] for a in paper for n in _nodes(a)) >= 2
    # The adaptive gate looks for "[Retrieval]" in the stripped draft: never there, so never retrieves.
    for q in qs[:2]:
        draft = engine.generate([_prompt(engine, q)], SamplingParams(max_tokens=25, temperature=0.0))[0]
        gated = dict(ndocs=3, max_new_tokens=8, mode="adaptive", scoring=ScoringConfig.released(form="long",
                                                                                                 threshold=0.0))
        assert not LongFormSelfRAG(engine, compat="released", **gated).answer(q, docs[0]).retrieved
        seen = LongFormSelfRAG(engine, compat="released", quirks=ScriptQuirks(strip_special_tokens=False),
                               **gated).answer(q, docs[0])
        text = tok.decode(draft.token_ids, skip_special_tokens=False).split("\n\n")[0]
        assert seen.retrieved == ("[Retrieval]" in text)
        assert LongFormSelfRAG(engine, scoring=ScoringConfig.paper(threshold=0.0), ndocs=3, max_new_tokens=8,
                               max_depth=1).answer(q, docs[0]).retrieved
    assert _clean(engine)


# ---- 9. siblings 2..K store the previous sibling's text in their prompt ----------------------------------


def test_9_sibling_prompt_carry_over(engine, ids):
    rng = random.Random(326)
    qs = [question(rng) for _ in range(2)]
    docs = [passages(rng, 3) for _ in qs]
    common = dict(ndocs=3, max_new_tokens=12, mode="always", max_depth=3, compat="released")
    on = LongFormSelfRAG(engine, quirks=ScriptQuirks(strip_special_tokens=False), **common).answer_batch(qs, docs)
    off = LongFormSelfRAG(engine, quirks=ScriptQuirks(strip_special_tokens=False, sibling_carry_over=False),
                          **common).answer_batch(qs, docs)
    tok = engine.tokenizer
    for a, b, q, ds in zip(on, off, qs, docs):
        root = format_prompt(q)
        kids_on, kids_off = _nodes(a, 1), _nodes(b, 1)
        assert [k["token_ids"] for k in kids_on] == [k["token_ids"] for k in kids_off]
        assert [k["prompt"] for k in kids_on] == [root] + [root + k["text"] for k in kids_on[:-1]]
        assert [k["prompt"] for k in kids_off] == [root] * len(kids_off)
        assert kids_on[1]["prompt"] != kids_off[1]["prompt"] or not kids_on[0]["text"]
        # The next depth decodes from the stored prompt plus the node's text, re-encoded, then a passage.
        nodes = {n["id"]: n for n in _nodes(a)}
        for kid in _nodes(a, 2)[:2]:
            parent = nodes[kid["parent"]]
            doc = next(d for d in ds if d.title == kid["title"])
            context = tok.encode(parent["prompt"] + parent["text"]) + _suffix(engine, doc)
            ref = engine.generate([context], SamplingParams(max_tokens=12, temperature=0.0))[0]
            assert kid["token_ids"] == ref.token_ids
    assert _clean(engine)


# ---- presets -------------------------------------------------------------------------------------------


def test_released_presets_and_w_use(engine):
    short, long = ScoringConfig.released(), ScoringConfig.released(form="long", use_seqscore=True)
    assert (short.gate, short.w_use, short.top_logprobs, short.missing_relevance, short.utility_group) == \
        ("logprob", 1.0, 5000, "exp", "utility")
    assert (long.gate, long.w_use, long.top_logprobs, long.missing_relevance, long.utility_group,
            long.use_seqscore) == ("prob", 0.5, 32000, "raw", "grounding", False)
    assert ScoringConfig.paper() == ScoringConfig() and ScoringConfig.paper().w_use == 0.5
    assert SelfRAG(engine, compat="official").scoring == short
    assert LongFormSelfRAG(engine, compat="released").scoring == ScoringConfig.released(form="long")
    assert SelfRAG(engine).scoring == ScoringConfig.paper()
    with pytest.raises(ValueError, match="form"):
        ScoringConfig.released(form="medium")
    with pytest.raises(TypeError, match="w_usage"):
        ScoringConfig.released(w_usage=1.0)


def test_speculative_engine_verified_drafts(engine):
    # Last in the module: the speculative engine's answers above went through verify steps, so their
    # agreement with the references covers speculation.
    stats = engine.speculation_stats()
    assert (stats["verify_passes"] > 0 and stats["accepted"] > 0) == (engine.stepper.num_draft_tokens > 0)
