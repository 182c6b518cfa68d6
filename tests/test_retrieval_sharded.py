"""A sharded index (`index build --shards N`) against the unsharded one: the same passages, scores and order,
ties included, for a flat index; for IVF-PQ, the shards' fan-out equals searching their union as one index;
a missing or failing shard is a named error, never a partial top-k."""
import importlib.util
import json
import random
import shutil

import numpy as np
import pytest

from selfrag_engine.entrypoints.cli import main
from selfrag_engine.errors import IndexShardError, RequestError
from selfrag_engine.retrieval.encoders import HashingEncoder
from selfrag_engine.retrieval.passages import CorpusError, Passage
from selfrag_engine.retrieval.retriever import Retriever
from selfrag_engine.retrieval.sharded_index import ShardedRetriever, build_sharded, load_retriever, merge_top_k
from selfrag_engine.retrieval.shards import write_embedding_shard
from tests.test_retrieval import _corpus, _write_corpus

pytestmark = pytest.mark.skipif(importlib.util.find_spec("faiss") is None,
                                reason="needs faiss (pip install faiss-cpu, or selfrag-engine[retrieval])")


def _passages(n: int) -> list[Passage]:
    return [Passage(f"title {i}", f"text {i}", f"id{i}") for i in range(n)]


@pytest.fixture
def one_faiss_thread():
    """faiss's OpenMP threads spin on a loaded 2-core machine (k-means for minutes); one thread trains in
    a second."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _key(hits):
    return [(h.passage.id, h.score, h.row) for h in hits]


def _with_ties(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Random vectors, a few of them repeated (equal scores) at rows that land on different shards."""
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    for src in rng.choice(n // 2, size=8, replace=False):
        for dst in rng.choice(np.arange(n // 2, n), size=4, replace=False):
            emb[dst] = emb[src]
    return emb


def assert_same_top_k(whole: Retriever, queries: np.ndarray, got: list, k: int) -> int:
    """`got` (the shards' merged top-k) is the unsharded index's top-k: the same passages, scores, rows and
    order of ties, except where equal scores straddle the k-th place (faiss's choice among them is its own):
    there the scores are the same and the rows come from the tied ones. Returns how many queries straddled."""
    want, deeper = whole.search_embeddings(queries, k), whole.search_embeddings(queries, k + 1)
    straddling = 0
    for q, w, g, d in zip(queries, want, got, deeper):
        assert [h.score for h in g] == [h.score for h in w]
        if len(d) > k and d[k].score == w[-1].score:
            straddling += 1
            cut = w[-1].score
            assert _key([h for h in g if h.score != cut]) == _key([h for h in w if h.score != cut])
            tied = {h.row for h in whole.search_embeddings(q[None], len(whole))[0] if h.score == cut}
            assert {h.row for h in g if h.score == cut} <= tied
            assert [h.row for h in g if h.score == cut] == sorted((h.row for h in g if h.score == cut), reverse=True)
        else:
            assert _key(g) == _key(w)  # passages, scores, rows and the order of ties all equal
    return straddling


@pytest.mark.parametrize("num_shards", [2, 3])
def test_flat_shards_return_the_unsharded_top_k_exactly(tmp_path, num_shards, one_faiss_thread):
    rng = np.random.default_rng(1000 + num_shards)
    n, dim = 701, 24  # not a multiple of the shard count: the shards differ in size by one
    emb = _with_ties(rng, n, dim)
    passages = _passages(n)
    whole = Retriever.from_embeddings(passages, None, emb, None, progress=False, gpu=False)
    build_sharded(tmp_path / "s", passages, num_shards, None, embeddings=emb, progress=False)
    sharded = ShardedRetriever.load(tmp_path / "s", gpu=False, omp_threads=1)
    assert [len(s) for s in sharded.shards] == [len(range(i, n, num_shards)) for i in range(num_shards)]
    # Random queries, and queries equal to a repeated vector: ties at the top and across the k-th place.
    queries = np.concatenate([rng.standard_normal((40, dim)).astype(np.float32), emb[rng.choice(n, 30)]])
    straddling = 0
    for k in (1, 3, 5, 10, n + 5):
        straddling += assert_same_top_k(whole, queries, sharded.search_embeddings(queries, k), k)
    assert straddling > 0  # the queries do put ties across the k-th place
    # Ties exist among the answers, so the tie rule is exercised, not assumed.
    top = whole.search_embeddings(emb[:n // 2], 3)
    assert any(len({h.score for h in hits}) < len(hits) for hits in top)
    sharded.close()


def test_ivf_pq_shards_equal_their_union_searched_as_one_index(tmp_path, one_faiss_thread):
    import faiss

    rng = np.random.default_rng(77)
    n, dim = 2000, 32
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    passages = _passages(n)
    build_sharded(tmp_path / "s", passages, 2, None, "IVF16,PQ8x4", embeddings=emb, progress=False,
                  train_size=2000, search_parameters={"nprobe": 4})
    sharded = ShardedRetriever.load(tmp_path / "s", gpu=False)
    # The union: the shards' trained (shared) quantizer and codebooks holding every vector in global order.
    union = faiss.clone_index(sharded.shards[0]._cpu_index)
    union.reset()
    union.add(emb)
    faiss.extract_index_ivf(union).nprobe = 4
    assert all(s.search_parameters() == {"nprobe": 4} for s in sharded.shards)
    queries = rng.standard_normal((50, dim)).astype(np.float32)
    scores, rows = union.search(queries, 10)
    got = sharded.search_embeddings(queries, 10)
    for srow, rrow, hits in zip(scores, rows, got):
        assert [h.row for h in hits] == [int(r) for r in rrow if r >= 0]
        assert [h.score for h in hits] == [float(s) for s, r in zip(srow, rrow) if r >= 0]
        assert [h.passage.id for h in hits] == [f"id{r}" for r in rrow if r >= 0]
    # Built the same way unsharded (same training vectors), the index finds the same passages.
    whole = Retriever.from_embeddings(passages, None, emb, None, "IVF16,PQ8x4", progress=False, train_size=2000,
                                      gpu=False)
    whole.set_search_parameter("nprobe", 4)
    same = np.mean([set(_key(a)) == set(_key(b)) for a, b in zip(whole.search_embeddings(queries, 10), got)])
    assert same >= 0.9
    sharded.close()


def test_index_commands_build_and_search_shards_like_the_unsharded_index(tmp_path, capsys):
    rng = random.Random(31)
    passages = _corpus(rng, 41)
    corpus = _write_corpus(tmp_path / "c.jsonl", passages)
    queries = [" ".join(p.text.split()[:2]) for p in rng.sample(passages, 3)]
    for out, extra in (("one", []), ("two", ["--shards", "2"])):
        assert main(["index", "build", "--passages", corpus, "--out", str(tmp_path / out), "--encoder",
                     "hashing:64", "--quiet", *extra]) == 0
    assert "into 2 shards" in capsys.readouterr().out
    printed = {}
    for out in ("one", "two"):
        assert main(["index", "search", "--index", str(tmp_path / out), "-k", "4", "--json", *queries]) == 0
        printed[out] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed["two"] == printed["one"] and len(printed["one"][0]["hits"]) == 4
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["shard-0-of-2", "shard-1-of-2", "sharded.json"]
    # From Contriever embedding files, sharded: the same answers again.
    emb = HashingEncoder(64).encode_passages(passages)
    write_embedding_shard(tmp_path / "passages_00", [p.id for p in passages[:25]], emb[:25])
    write_embedding_shard(tmp_path / "passages_01", [p.id for p in passages[25:]], emb[25:])
    assert main(["index", "build", "--passages", corpus, "--out", str(tmp_path / "three"), "--encoder",
                 "hashing:64", "--embeddings", str(tmp_path / "passages_*"), "--shards", "3", "--quiet"]) == 0
    capsys.readouterr()
    got = load_retriever(tmp_path / "three").search_batch_with_scores(queries, 4)
    want = load_retriever(tmp_path / "one").search_batch_with_scores(queries, 4)
    assert [_key(h) for h in got] == [_key(h) for h in want]
    # Bad shard counts are named.
    assert main(["index", "build", "--passages", corpus, "--out", str(tmp_path / "bad"), "--encoder",
                 "hashing:64", "--shards", "0", "--quiet"]) == 2
    assert "--shards must be a positive integer, got 0" in capsys.readouterr().err
    assert main(["index", "build", "--passages", corpus, "--out", str(tmp_path / "bad"), "--encoder",
                 "hashing:64", "--shards", "50", "--quiet"]) == 2
    assert "41 embeddings cannot fill 50 index shards" in capsys.readouterr().err


def test_a_missing_or_failing_shard_is_a_named_error(tmp_path, capsys):
    rng = np.random.default_rng(5)
    emb = rng.standard_normal((60, 8)).astype(np.float32)
    passages = _passages(60)
    build_sharded(tmp_path / "s", passages, 3, HashingEncoder(8), embeddings=emb, progress=False)
    shutil.rmtree(tmp_path / "s" / "shard-1-of-3")
    sharded = ShardedRetriever.load(tmp_path / "s", gpu=False)
    with pytest.raises(IndexShardError, match=r"index shard 1 of 3 is missing: no directory .*shard-1-of-3"):
        sharded.search("text 3", 5)
    assert main(["index", "search", "--index", str(tmp_path / "s"), "text 3"]) == 2
    assert "index shard 1 of 3 is missing" in capsys.readouterr().err

    class Broken:
        def search_embeddings(self, queries, k):
            raise ConnectionError("replica went away")

    class Short:
        def search_embeddings(self, queries, k):
            return []

    good = Retriever.from_embeddings(passages[:20], None, emb[:20], None, progress=False, gpu=False)
    for bad, message in ((Broken(), "index shard 1 of 2 .* failed: ConnectionError: replica went away"),
                         (Short(), "index shard 1 of 2 .* answered 0 queries of 2")):
        partial = ShardedRetriever([good, bad], HashingEncoder(8), 8, 40)
        with pytest.raises(IndexShardError, match=message):
            partial.search_batch(["a b", "c d"], 3)
        partial.close()
    with pytest.raises(RequestError, match="no sharded index directory|not a sharded index directory"):
        ShardedRetriever.load(tmp_path / "s" / "shard-0-of-3")
    with pytest.raises(CorpusError, match="no embeddings to index"):
        build_sharded(tmp_path / "e", [], 2, None, embeddings=np.zeros((0, 4), np.float32), progress=False)


def test_merge_keeps_faiss_tie_rule_across_shards():
    p = Passage("t", "x")
    from selfrag_engine.retrieval.retriever import Hit

    # Global rows 0..5 over 2 shards (even rows on shard 0), all with one score, and a better one at row 5.
    shard0 = [Hit(p, 1.0, 0), Hit(p, 1.0, 1), Hit(p, 1.0, 2)]   # global 0, 2, 4
    shard1 = [Hit(p, 2.0, 2), Hit(p, 1.0, 0), Hit(p, 1.0, 1)]   # global 5, 1, 3
    merged = merge_top_k([shard0, shard1], 2, 4)
    assert [(h.score, h.row) for h in merged] == [(2.0, 5), (1.0, 2), (1.0, 1), (1.0, 0)]
