"""Long-form Self-RAG (paper flavour) on the engine: the forked, batched segment tree equals a naive
implementation that prefills every segment's whole context afresh and reads full-vocabulary probabilities;
per-segment retrieval queries; bad inputs; no KV blocks leak on any path."""
import math
import random

import pytest

from selfrag_engine import RequestError, SamplingParams
from selfrag_engine.retrieval.passages import Passage
from selfrag_engine.selfrag.long_form import LongFormSelfRAG
from selfrag_engine.selfrag.prompts import format_passage, format_prompt, postprocess
from selfrag_engine.selfrag.scoring import ScoringConfig
from tests.selfrag_fixtures import RecordingRetriever, passages, probs_at, question, steered_engine, used_blocks


@pytest.fixture(scope="module", params=[(False, 0), (True, 0), (False, 4)], ids=["plain", "overlap", "speculative"])
def engine(request):
    overlap, num_draft_tokens = request.param
    return steered_engine(overlap=overlap, num_draft_tokens=num_draft_tokens)


def _clean(engine):
    return used_blocks(engine) == 0 and not engine.seqs and not engine.scheduler.has_work()


class Naive:
    """The paper's long form written plainly: every segment decoded by `generate` on its full context (no
    fork, no shared blocks), every probability a float64 softmax of a fresh `score` of the context."""

    def __init__(self, engine, threshold, beam_width, max_depth, budget, w_use=0.5):
        self.engine, self.threshold, self.beam_width = engine, threshold, beam_width
        self.max_depth, self.budget, self.w_use = max_depth, budget, w_use
        tok = engine.tokenizer
        ref = tok.reflection_token_ids()
        self.R, self.N, self.C = ref.retrieval
        self.P = ref.paragraph_open
        self.rel, self.grd, self.utl = ref.relevance, ref.grounding, ref.utility
        self.control = set(ref.retrieval + ref.relevance + ref.grounding + ref.utility) | {ref.paragraph_open,
                                                                                        ref.paragraph_close}
        self.generated = 0

    def text(self, ids):
        tok = self.engine.tokenizer
        return postprocess(tok.decode([t for t in ids if t not in self.control and t != tok.eos_id],
                                      skip_special_tokens=True))

    def segment(self, context):
        out, logprobs = [], []
        while True:
            o = self.engine.generate([context + out], SamplingParams(
                max_tokens=self.budget - len(out), temperature=0.0, stop_token_ids=[self.R, self.N, self.C, self.P]))[0]
            out += o.token_ids
            logprobs += o.token_logprobs
            self.generated += len(o.token_ids)
            if o.finish_reason != "stop" or o.stop_reason is None:
                return out, logprobs, o.finish_reason
            if out[-1] == self.P:
                return out, logprobs, "retrieval"
            p = probs_at(self.engine, context + out[:-1])
            if (p[self.R] + p[self.C]) / (p[self.R] + p[self.N]) > self.threshold:
                return out, logprobs, "retrieval"
            if len(out) >= self.budget:
                return out, logprobs, "length"

    def critique(self, context, out, logprobs):
        p = probs_at(self.engine, context)
        rel = float(p[self.rel[0]] / (p[self.rel[0]] + p[self.rel[1]]))
        grd = util = 0.0
        at = next((i for i, t in enumerate(out) if t in self.grd), None)
        if at is not None:
            q = probs_at(self.engine, context + out[:at])[list(self.grd)]
            grd = float((q[0] + 0.5 * q[1]) / q.sum())
        at = next((i for i, t in enumerate(out) if t in self.utl), None)
        if at is not None:
            q = probs_at(self.engine, context + out[:at])[list(self.utl)]
            util = float(sum(w * x for w, x in zip((-1, -0.5, 0, 0.5, 1), q)) / q.sum())
        seq = math.exp(sum(logprobs) / len(out))
        return rel + grd + self.w_use * util + seq

    def run(self, q, docs):
        tok = self.engine.tokenizer
        prompt = tok.encode(format_prompt(q))
        p = probs_at(self.engine, prompt)
        if p[self.R] / (p[self.R] + p[self.N]) > self.threshold:
            beam = [dict(ids=prompt + [int(p.argmax())], ended="retrieval", score=None, path=[], root=True)]
        else:
            out, _, ended = self.segment(prompt + [self.N])
            seg = dict(text=self.text(out[:-1] if ended == "retrieval" else out), passage=None, tokens=out)
            beam = [dict(ids=prompt + [self.N] + out, ended=ended, score=None, path=[seg], root=True)]
        suffixes = [tok.encode(format_passage(d.title, d.text), add_bos=False) for d in docs]
        for _ in range(self.max_depth):
            expanding = [n for n in beam if n["ended"] == "retrieval"]
            if not expanding:
                break
            kids = []
            for n in expanding:
                for doc, suffix in zip(docs, suffixes):
                    ctx = n["ids"][:-1] + suffix
                    out, logprobs, ended = self.segment(ctx)
                    final = self.critique(ctx, out, logprobs)
                    seg = dict(text=self.text(out[:-1] if ended == "retrieval" else out), passage=doc, tokens=out)
                    kids.append(dict(ids=ctx + out, ended=ended, path=n["path"] + [seg], root=False,
                                     score=final if n["score"] is None else n["score"] * final))
            carried = [n for n in beam if all(n is not e for e in expanding)]
            beam = sorted(kids + carried, key=lambda n: -math.inf if n["score"] is None else n["score"],
                          reverse=True)[:self.beam_width]
        best = beam[0]
        answer = postprocess(" ".join(s["text"] for s in best["path"] if s["text"]), long_form=True)
        return best, answer


def test_tree_equals_naive_reprefill(engine):
    rng = random.Random(114)
    threshold = rng.uniform(0.15, 0.25)  # around the [No Retrieval] gate values: segments both end and go on
    budget, beam_width, max_depth, k = rng.randint(10, 14), 2, 3, 3
    qs = [question(rng) for _ in range(2)]
    docs = [passages(rng, k) for _ in qs]
    cfg = ScoringConfig.paper(threshold=threshold, use_seqscore=True)
    rag = LongFormSelfRAG(engine, scoring=cfg, ndocs=k, max_new_tokens=budget, beam_width=beam_width,
                          max_depth=max_depth)
    answers = rag.answer_batch(qs, docs)
    assert _clean(engine)
    naive = Naive(engine, threshold, beam_width, max_depth, budget)
    depths, resumed = set(), 0
    for ans, q, ds in zip(answers, qs, docs):
        best, text = naive.run(q, ds)
        assert ans.answer == text
        assert [s.text for s in ans.segments] == [s["text"] for s in best["path"]]
        assert [s.token_ids for s in ans.segments] == [s["tokens"] for s in best["path"]]
        assert ans.citations == [s["passage"] for s in best["path"]]
        if best["score"] is None:
            assert ans.score is None
        else:
            assert ans.score == pytest.approx(best["score"], rel=1e-5)
        depths |= {n["depth"] for n in ans.trace["nodes"]}
        resumed += sum(not d["retrieve"] for n in ans.trace["nodes"] for d in n["decisions"])
    assert sum(a.num_generated_tokens for a in answers) == naive.generated
    # The draw exercised what the tree adds over the short form: several depths of children, and segments
    # that went on past a retrieval token the threshold turned down.
    assert max(depths) >= 2 and resumed > 0


@pytest.mark.parametrize("compat,beam_width", [("paper", 1), ("paper", 2), ("released", 2)])
def test_segments_stream_in_order_as_they_settle(engine, compat, beam_width):
    rng = random.Random(11)
    qs = [question(rng) for _ in range(2)]
    docs = [passages(rng, 2) for _ in qs]
    rag = LongFormSelfRAG(engine, ndocs=2, max_new_tokens=10, beam_width=beam_width, max_depth=3, mode="always",
                          compat=compat)
    streamed: dict[int, list] = {0: [], 1: []}
    passes_at: list[float] = []

    def on_segment(i, segment):
        streamed[i].append(segment)
        passes_at.append(engine.speculation_stats()["forward_passes"])

    answers = rag.answer_batch(qs, docs, on_segment=on_segment)
    passes_after = engine.speculation_stats()["forward_passes"]
    for i, ans in enumerate(answers):
        assert streamed[i] == ans.segments and ans.segments
    one: list = []
    single = rag.answer(qs[1], docs[1], on_segment=one.append)
    assert one == single.segments
    assert [s.token_ids for s in one] == [s.token_ids for s in streamed[1]]
    if beam_width == 1:
        # A beam of one settles every depth as it ends: segments came while later depths still decoded.
        assert min(passes_at) < passes_after
    assert _clean(engine)


def test_batch_equals_single_and_never_mode(engine):
    rng = random.Random(173)
    qs = [question(rng) for _ in range(3)]
    docs = [passages(rng, 2) for _ in qs]
    rag = LongFormSelfRAG(engine, ndocs=2, max_new_tokens=10, max_depth=2, mode="always")
    batch = rag.answer_batch(qs, docs)
    for q, d, b in zip(qs, docs, batch):
        single = rag.answer(q, d)
        assert single.answer == b.answer and single.score == pytest.approx(b.score, rel=1e-6)
        assert [s.token_ids for s in single.segments] == [s.token_ids for s in b.segments]
        assert b.retrieved and b.segments[0].passage in d
    never = LongFormSelfRAG(engine, max_new_tokens=12, mode="never").answer(qs[0], docs[0])
    tok = engine.tokenizer
    ref = engine.generate([tok.encode(format_prompt(qs[0])) + [tok.token_to_id("[No Retrieval]")]],
                          SamplingParams(max_tokens=12, temperature=0.0))[0]
    assert never.segments[0].token_ids == ref.token_ids and not never.retrieved and never.score is None
    assert never.num_generated_tokens == len(ref.token_ids)
    assert _clean(engine)


def test_per_segment_retrieval_queries_question_plus_last_segment(engine):
    rng = random.Random(7)
    retriever = RecordingRetriever(engine)
    q = question(rng)
    rag = LongFormSelfRAG(engine, retriever, ndocs=2, max_new_tokens=10, max_depth=3, mode="always",
                          retrieval="per_segment")
    ans = rag.answer(q)
    nodes = {n["id"]: n for n in ans.trace["nodes"]}
    expanded = sorted({n["parent"] for n in nodes.values() if n["parent"] is not None})
    assert len(expanded) >= 2  # the root and at least one segment asked for evidence
    expect = [f"{q} {nodes[e]['text']}" if nodes[e]["text"] else q for e in expanded]
    assert sorted(retriever.queries) == sorted(expect) == sorted(ans.trace["queries"])
    for n in nodes.values():  # every child reads a passage its parent's query returned
        if n["parent"] is not None:
            query = expect[expanded.index(n["parent"])]
            assert n["title"] in [d.title for d in retriever.answers[query]]
    # Static retrieval asks once, with the question, and reads the same passages at every depth.
    static = RecordingRetriever(engine)
    ans = LongFormSelfRAG(engine, static, ndocs=2, max_new_tokens=10, max_depth=3, mode="always").answer(q)
    assert static.queries == [q]
    assert {n["title"] for n in ans.trace["nodes"] if n["parent"] is not None} <= \
        {d.title for d in static.answers[q]}
    assert _clean(engine)


def test_bad_inputs_and_no_leaks(engine):
    rng = random.Random(218)
    docs = passages(rng, 2)
    rag = LongFormSelfRAG(engine, ndocs=2, max_new_tokens=8, max_depth=2, mode="always")
    with pytest.raises(ValueError, match="empty"):
        rag.answer("  ", docs)
    huge = Passage("Huge", "word " * (engine.max_model_len + 10))
    # The passage is never cut to fit (nor the instruction): the error names it.
    with pytest.raises(RequestError, match=r"passage 1 \('Huge'.*no room to generate"):
        rag.answer_batch([question(rng), question(rng)], [docs, [docs[0], huge]])
    assert _clean(engine)
    with pytest.raises(ValueError, match="neither passages nor a retriever"):
        rag.answer(question(rng))
    assert _clean(engine)
    long_q = "word " * (engine.max_model_len + 5)
    with pytest.raises(RequestError, match="no room to generate"):
        rag.answer(long_q, docs)
    assert _clean(engine)

    class Failing(RecordingRetriever):
        def search(self, query, k):
            if len(self.queries) == 1:
                raise RuntimeError("index unavailable")
            return super().search(query, k)

    failing = LongFormSelfRAG(engine, Failing(engine), ndocs=2, max_new_tokens=10, max_depth=3, mode="always",
                              retrieval="per_segment")
    with pytest.raises(RuntimeError, match="index unavailable"):  # fails mid-tree, with nodes holding caches
        failing.answer_batch([question(rng) for _ in range(3)])
    assert _clean(engine)
    for kwargs, message in [(dict(mode="sometimes"), "mode"), (dict(retrieval="dynamic"), "retrieval"),
                            (dict(beam_width=0), "beam_width"), (dict(max_depth=0), "max_depth"),
                            (dict(retrieval="per_segment"), "needs a retriever"), (dict(compat="x"), "compat")]:
        with pytest.raises(ValueError, match=message):
            LongFormSelfRAG(engine, **kwargs)


def test_speculative_engine_verified_drafts(engine):
    # Last in the module: the speculative engine's answers above went through verify steps, so their
    # agreement with the references covers speculation.
    stats = engine.speculation_stats()
    assert (stats["verify_passes"] > 0 and stats["accepted"] > 0) == (engine.stepper.num_draft_tokens > 0)
