"""Concurrent searches gathered into batches (`BatchedSearch`): each answer equals its own search, the searches
that wait behind a running one go together, a failing batch fails only its bad query; and over a real faiss
retriever, and the server's `/v1/selfrag` with an index, which counts the batches in `/metrics`."""
from __future__ import annotations

import importlib.util
import random
import string
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from selfrag_engine.errors import RequestError
from selfrag_engine.retrieval.batched import BatchedSearch
from selfrag_engine.retrieval.passages import Passage

needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="needs faiss")


def _words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
                    for _ in range(n))


class _Recording:
    """Passages derived from the query (distinct per query and k); records every call. The first search blocks
    until `release` is set, after telling `started`."""

    def __init__(self, block_first: bool = True):
        self.calls: list[tuple[str, tuple[str, ...], int]] = []
        self.started, self.release = threading.Event(), threading.Event()
        if not block_first:
            self.release.set()

    def _answer(self, query: str, k: int) -> list[Passage]:
        if "bad" in query:
            raise RequestError(f"cannot search {query!r}")
        return [Passage(f"{query}/{i}", f"text {len(query) * 7 + i}", f"{query}:{k}:{i}") for i in range(k)]

    def search(self, query: str, k: int) -> list[Passage]:
        self.calls.append(("search", (query,), k))
        self.started.set()
        self.release.wait(30)
        return self._answer(query, k)

    def search_batch(self, queries, k):
        self.calls.append(("batch", tuple(queries), k))
        return [self._answer(q, k) for q in queries]


def test_searches_behind_a_running_one_go_together_per_k():
    rng = random.Random(41)
    inner = _Recording()
    batched = BatchedSearch(inner)
    lead = "lead " + _words(rng, 2)
    first = batched.submit(lead, 3)
    assert inner.started.wait(30)
    queries = [(_words(rng, rng.randint(1, 4)), k) for k in (3, 3, 2, 3, 3, 2, 5)]
    futures = [batched.submit(q, k) for q, k in queries]
    inner.release.set()
    assert first.result(30) == inner._answer(lead, 3)
    for (q, k), fut in zip(queries, futures):
        assert fut.result(30) == inner._answer(q, k)
    # The lone first search, then one batch: k=3 and k=2 as batches, the single k=5 as a plain search.
    assert inner.calls[0] == ("search", (lead,), 3)
    assert sorted(inner.calls[1:]) == sorted([
        ("batch", tuple(q for q, k in queries if k == 3), 3),
        ("batch", tuple(q for q, k in queries if k == 2), 2),
        ("search", tuple(q for q, k in queries if k == 5), 5)])
    assert (batched.stats.queries, batched.stats.batches, batched.stats.batch_sizes) == (8, 2, {1: 1, 7: 1})
    batched.close()
    with pytest.raises(RuntimeError, match="closed"):
        batched.submit("later", 1)


def test_a_failing_batch_fails_only_its_bad_query_and_max_batch_holds():
    inner = _Recording()
    batched = BatchedSearch(inner, max_batch=3)
    lead = batched.submit("lead", 2)
    assert inner.started.wait(30)
    names = ["alpha", "bad beta", "gamma", "delta", "epsilon"]
    futures = [batched.submit(q, 2) for q in names]
    inner.release.set()
    assert lead.result(30) == inner._answer("lead", 2)
    for q, fut in zip(names, futures):
        if "bad" in q:
            with pytest.raises(RequestError, match="cannot search 'bad beta'"):
                fut.result(30)
        else:
            assert fut.result(30) == inner._answer(q, 2)
    # max_batch=3: [alpha, bad beta, gamma] failed as a batch and went one by one; [delta, epsilon] together.
    assert ("batch", ("alpha", "bad beta", "gamma"), 2) in inner.calls
    assert [c for c in inner.calls if c[0] == "search"][1:4] == [("search", (q,), 2) for q in names[:3]]
    assert inner.calls[-1] == ("batch", ("delta", "epsilon"), 2)
    assert batched.stats.batch_sizes == {1: 1, 3: 1, 2: 1}
    batched.close()


def test_a_retriever_without_search_batch_is_searched_one_by_one():
    class Plain:
        def __init__(self):
            self.inner = _Recording(block_first=False)

        def search(self, query, k):
            return self.inner.search(query, k)

    plain = Plain()
    batched = BatchedSearch(plain)
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda q: batched.search(q, 2), [f"q{i}" for i in range(12)]))
    assert got == [plain.inner._answer(f"q{i}", 2) for i in range(12)]
    assert all(kind == "search" for kind, _, _ in plain.inner.calls) and len(plain.inner.calls) == 12
    batched.close()


@needs_faiss
def test_concurrent_searches_of_a_faiss_retriever_equal_its_own_searches():
    from selfrag_engine.retrieval.encoders import HashingEncoder
    from selfrag_engine.retrieval.retriever import Retriever

    rng = random.Random(113)
    passages = [Passage(_words(rng, 2).title(), _words(rng, rng.randint(5, 15)), f"p{i}") for i in range(200)]
    retriever = Retriever.build(passages, HashingEncoder(96), progress=False)
    queries = [" ".join(p.text.split()[:3]) for p in rng.sample(passages, 48)]
    ks = [rng.choice([3, 5]) for _ in queries]
    expected = [retriever.search(q, k) for q, k in zip(queries, ks)]
    batched = BatchedSearch(retriever)
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda qk: batched.search(*qk), zip(queries, ks)))
    assert got == expected
    assert batched.stats.queries == 48
    with pytest.raises(RequestError):
        batched.search("fine", 0)
    batched.close()


@needs_faiss
def test_server_selfrag_with_an_index_searches_in_batches():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from selfrag_engine import Engine
    from selfrag_engine.engine.loop import EngineLoop
    from selfrag_engine.entrypoints.server import build_app
    from selfrag_engine.retrieval.encoders import HashingEncoder
    from selfrag_engine.retrieval.retriever import Retriever
    from selfrag_engine.selfrag.short_form import SelfRAG
    from selfrag_engine.tiny.assets import default_model_dir, read_corpus, read_examples

    model = default_model_dir()
    if not (model / "model.safetensors").is_file():
        pytest.skip("tiny_selfrag not present")
    engine = Engine.from_pretrained(model, progress=False)
    retriever = Retriever.build(read_corpus(), HashingEncoder(128), progress=False)
    questions = [ex["question"] for ex in read_examples()["questions"][:6]]
    rag = SelfRAG(engine, retriever=retriever, max_new_tokens=12, mode="always", ndocs=3)
    expected = [rag.answer(q) for q in questions]
    with EngineLoop(engine) as loop:
        app = build_app(loop, "tiny", retriever)
        with TestClient(app) as http, ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda q: http.post("/v1/selfrag", json={
                "question": q, "mode": "always", "ndocs": 3, "max_tokens": 12}).json(), questions))
            metrics = http.get("/metrics").text
    for g, e in zip(got, expected):
        assert g["answer"] == e.answer
        assert [b["passage"]["title"] for b in g["branches"]] == [b.passage.title for b in e.branches]
    assert "selfrag_searches_total 6.0" in metrics
    batches = float(next(line.split()[1] for line in metrics.splitlines()
                         if line.startswith("selfrag_search_batches_total")))
    assert 1 <= batches <= 6
    assert app.state.retriever.stats.queries == 6
