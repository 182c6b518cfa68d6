"""The retriever's search runs beside the prompt's prefill: it starts when the question arrives, its passages
are used when the gate retrieves and dropped when it does not, and answers are those of the passages given
directly. Ordered by events, not timings."""
from __future__ import annotations

import dataclasses
import threading

import pytest

from selfrag_engine.retrieval.batched import BatchedSearch
from selfrag_engine.selfrag.scoring import ScoringConfig
from selfrag_engine.selfrag.short_form import SelfRAG
from tests.selfrag_fixtures import RecordingRetriever, steered_engine

QUESTION = "Where was Entity 2 born in 1850?"
WAIT_S = 30.0  # a bound for a broken ordering to fail instead of hang; a working one never waits it out


@pytest.fixture(scope="module")
def engine():
    return steered_engine()


class SleepingRetriever(RecordingRetriever):
    """Sleeps through the prefill: it returns only once the engine's first step (the prompt's prefill) is done,
    and records whether that step had finished when it was called."""

    def __init__(self, engine):
        super().__init__(engine)
        self.called = threading.Event()
        self.prefill_done = threading.Event()
        self.prefill_done_at_call: list[bool] = []
        self.slept_through_prefill: list[bool] = []

    def search(self, query: str, k: int):
        self.prefill_done_at_call.append(self.prefill_done.is_set())
        self.called.set()
        self.slept_through_prefill.append(self.prefill_done.wait(WAIT_S))
        return super().search(query, k)


def _watch_prefill(monkeypatch, engine, retriever: SleepingRetriever) -> list[bool]:
    """Records, at the first engine step, whether the search had been called; marks that step's end."""
    search_in_flight: list[bool] = []
    step = engine.stepper.step

    def watched():
        if not search_in_flight:
            search_in_flight.append(retriever.called.wait(WAIT_S))
        out = step()
        retriever.prefill_done.set()
        return out

    monkeypatch.setattr(engine.stepper, "step", watched)
    return search_in_flight


def _answer_fields(ans):
    return (ans.retrieved, ans.answer, [b.token_ids for b in ans.branches],
            [(b.relevance, b.grounding, b.utility, b.final) for b in ans.branches])


@pytest.mark.parametrize("threshold,retrieves", [(0.0, True), (1.0, False)])
def test_search_overlaps_the_prefill_and_answers_are_unchanged(engine, monkeypatch, threshold, retrieves):
    scoring = dataclasses.replace(ScoringConfig.paper(), threshold=threshold)
    retriever = SleepingRetriever(engine)
    search_in_flight = _watch_prefill(monkeypatch, engine, retriever)
    ans = SelfRAG(engine, retriever=retriever, scoring=scoring, max_new_tokens=12).answer(QUESTION)
    monkeypatch.undo()
    # The search was called before the prefill began and was still asleep when it ended.
    assert search_in_flight == [True]
    assert retriever.prefill_done_at_call == [False] and retriever.slept_through_prefill == [True]
    assert retriever.queries == [QUESTION] and ans.retrieved is retrieves
    given = retriever.answers[QUESTION] if retrieves else None
    expected = SelfRAG(engine, scoring=scoring, max_new_tokens=12).answer(QUESTION, given)
    assert _answer_fields(ans) == _answer_fields(expected)
    if retrieves:
        assert [b.passage for b in ans.branches] == given
    assert engine.cache_stats()["used"] == 0


def test_no_search_when_passages_are_given_or_retrieval_is_off(engine):
    retriever = RecordingRetriever(engine)
    rag = SelfRAG(engine, retriever=retriever, max_new_tokens=4)
    rag.answer(QUESTION, mode="never")
    rag.answer(QUESTION, retriever.search("other", 3), mode="always")
    assert retriever.queries == ["other"]


class SleepingBatchRetriever(SleepingRetriever):
    """SleepingRetriever with a batched search that sleeps through the prefill too."""

    def __init__(self, engine):
        super().__init__(engine)
        self.batches: list[list[str]] = []

    def search_batch(self, queries, k):
        self.batches.append(list(queries))
        self.called.set()
        self.slept_through_prefill.append(self.prefill_done.wait(WAIT_S))
        return [RecordingRetriever.search(self, q, k) for q in queries]


def test_batched_searches_of_several_questions_overlap_the_prefill(engine, monkeypatch):
    """Over a BatchedSearch the questions of one answer_batch are searched without the pool, in at most two
    batches (the first search, then all that queued while it slept through the prefill)."""
    scoring = dataclasses.replace(ScoringConfig.paper(), threshold=0.0)
    questions = [f"Where was Entity {i} born in {1800 + 7 * i}?" for i in range(4)]
    retriever = SleepingBatchRetriever(engine)
    batched = BatchedSearch(retriever)
    search_in_flight = _watch_prefill(monkeypatch, engine, retriever)
    rag = SelfRAG(engine, retriever=batched, scoring=scoring, max_new_tokens=10)
    answers = rag.answer_batch(questions)
    monkeypatch.undo()
    batched.close()
    assert search_in_flight == [True] and all(retriever.slept_through_prefill)
    assert rag._search_pool is None
    assert sorted(retriever.queries) == sorted(questions)
    assert batched.stats.queries == 4 and batched.stats.batches <= 2
    expected = SelfRAG(engine, scoring=scoring, max_new_tokens=10).answer_batch(
        questions, [retriever.answers[q] for q in questions])
    assert [_answer_fields(a) for a in answers] == [_answer_fields(e) for e in expected]
    assert all(a.retrieved for a in answers)
    assert engine.cache_stats()["used"] == 0
