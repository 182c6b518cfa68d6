"""Short-form Self-RAG on the engine: forked, batched branches equal naive separate full prompts."""
import pytest
import torch

from selfrag_engine import Engine, RequestError, SamplingParams
from selfrag_engine.selfrag.prompts import format_passage, format_prompt
from selfrag_engine.selfrag.scoring import retrieval_gate
from selfrag_engine.selfrag.short_form import Passage, SelfRAG, critique
from tests.helpers import tiny_checkpoint

PASSAGES = [Passage(f"Entity {i}", f"Entity {i} was born in Town {i * 3} in {1800 + 17 * i}.") for i in range(5)]


@pytest.fixture(scope="module", params=[(False, 0), (True, 0), (False, 4)], ids=["plain", "overlap", "speculative"])
def engine(request):
    overlap, num_draft_tokens = request.param
    return Engine.from_pretrained(tiny_checkpoint(seed=31, num_key_value_heads=2), progress=False,
                                  overlap=overlap, num_draft_tokens=num_draft_tokens)


def test_forked_branches_equal_naive_full_prompts(engine):
    rag = SelfRAG(engine, max_new_tokens=20)
    ans = rag.answer("Where was Entity 2 born?", PASSAGES, mode="always")
    assert ans.retrieved and len(ans.branches) == 5
    tok = engine.tokenizer
    params = SamplingParams(max_tokens=20, temperature=0.0, reflection=True)
    prompt = format_prompt("Where was Entity 2 born?")
    naive = engine.generate([tok.encode(prompt + format_passage(p.title, p.text)) for p in PASSAGES], params)
    for branch, out in zip(ans.branches, naive):
        assert branch.token_ids == out.token_ids
        rel, grd, util, seq, final, _ = critique(out, rag.ids, rag.scoring)
        assert (branch.relevance, branch.grounding, branch.utility) == pytest.approx((rel, grd, util), abs=1e-5)
        assert branch.final == pytest.approx(final, abs=1e-5)
    finals = [b.final for b in ans.branches]
    assert ans.best == finals.index(max(finals))
    assert ans.answer == ans.branches[ans.best].text
    assert engine.cache_stats()["used"] == 0


def test_no_retrieval_continues_the_prompt(engine):
    rag = SelfRAG(engine, max_new_tokens=16)
    ans = rag.answer("Say hello.", mode="never")
    assert not ans.retrieved and ans.branches == []
    tok = engine.tokenizer
    noret = tok.token_to_id("[No Retrieval]")
    ref = engine.generate([tok.encode(format_prompt("Say hello.")) + [noret]],
                          SamplingParams(max_tokens=16, temperature=0.0))[0]
    assert ans.num_generated_tokens == len(ref.token_ids)
    assert engine.cache_stats()["used"] == 0


def test_adaptive_gate_reads_the_first_position(engine):
    tok = engine.tokenizer
    question = "Who founded Town 9?"
    logits = engine.score(tok.encode(format_prompt(question)))[-1].double()
    p = torch.softmax(logits, -1)
    gate = retrieval_gate(float(p[tok.token_to_id("[Retrieval]")]), float(p[tok.token_to_id("[No Retrieval]")]))
    for threshold, expect in ((gate - 1e-3, True), (gate + 1e-3, False)):
        from selfrag_engine.selfrag.scoring import ScoringConfig
        rag = SelfRAG(engine, scoring=ScoringConfig(threshold=threshold), max_new_tokens=4)
        ans = rag.answer(question, PASSAGES[:2])
        assert ans.retrieval_probability == pytest.approx(gate, abs=1e-5)
        assert ans.retrieved is expect


def test_batch_equals_single(engine):
    rag = SelfRAG(engine, max_new_tokens=12)
    qs = ["Where was Entity 1 born?", "Where was Entity 4 born?"]
    batch = rag.answer_batch(qs, [PASSAGES[:3], PASSAGES[2:]], mode="always")
    single = [rag.answer(qs[0], PASSAGES[:3], mode="always"), rag.answer(qs[1], PASSAGES[2:], mode="always")]
    for a, b in zip(batch, single):
        assert [x.token_ids for x in a.branches] == [x.token_ids for x in b.branches]
        assert a.best == b.best


def test_bad_inputs(engine):
    rag = SelfRAG(engine, max_new_tokens=8)
    with pytest.raises(ValueError, match="empty"):
        rag.answer("   ", PASSAGES)
    with pytest.raises(ValueError, match="mode"):
        rag.answer("q", PASSAGES, mode="sometimes")
    huge = Passage("Long", "word " * (engine.max_model_len + 10))
    with pytest.raises(RequestError, match="no room to generate"):
        rag.answer("q", [huge], mode="always")
    with pytest.raises(ValueError, match="neither passages nor a retriever"):
        rag.answer("q", mode="always")
    with pytest.raises(RequestError, match="no room to generate"):
        rag.answer_batch(["q1", "q2"], [PASSAGES[:2], [huge]], mode="always")
    assert engine.cache_stats()["used"] == 0
    assert not engine.scheduler.has_work() and not engine.seqs


def test_speculative_engine_verified_drafts(engine):
    # Last in the module: the speculative engine's answers above went through verify steps, so their
    # agreement with the references covers speculation.
    stats = engine.speculation_stats()
    assert (stats["verify_passes"] > 0 and stats["accepted"] > 0) == (engine.stepper.num_draft_tokens > 0)
