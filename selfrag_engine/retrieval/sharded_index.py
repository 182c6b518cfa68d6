"""An index split into N index shards, each holding 1/N of the vectors, searched by fanning a query out to
every shard and merging their top-k into exactly the unsharded index's top-k.

(Not to be confused with `shards.py`: those are Contriever's precomputed embedding files, an input of a
build; these are pieces of a built index, each served on its own, possibly by another machine.)

Layout. Global row g (the row the unsharded index would give the passage) lives in shard g % N as its local
row g // N: the vectors are dealt round-robin, so the shards stay within one vector of each other in size,
a build never needs the total count up front, and local order is global order within a shard. An index type
that needs training (IVF, PQ) is trained once, on the same vectors as the unsharded build, and every shard is
a copy of that trained index: the shards share the coarse quantizer and the codebooks, so searching them all
and merging is searching their union as one index (faiss's `IndexShards` definition), with the same `nprobe`.

Merge. Each shard returns its own top-k; the merged top-k takes, across all shards, the k best scores, and
lists equal scores highest row first, as faiss lists them. A flat index sharded this way returns the same
passages, scores and order as the unsharded one, with one exception faiss itself leaves open: when equal
scores straddle the k-th place, which of the tied rows make the cut depends on faiss's search path and heap
(the unsharded index's choice is not a rule one can reproduce); the merge keeps the lowest rows, and the
scores are the same at every place.

Scores are bitwise the unsharded index's when each search runs faiss on one OpenMP thread (a retrieval
replica of one CPU does: Ray sets its OMP_NUM_THREADS to 1); faiss's multi-threaded scan of a flat index may
round the last bit of a score differently with the number of vectors it splits between threads.

A shard that is missing or fails raises `IndexShardError` naming it, for every query that needed it (all of
them: a query fans out to every shard); no query gets a partial top-k.

A sharded index is a directory: `sharded.json` (format, version, shard count, encoder, dimension, factory,
total count, search parameters) and one retriever directory per shard, `shard-I-of-N/` (index.faiss,
passages.jsonl, retriever.json, written without an encoder: the encoder belongs to the whole).
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from selfrag_engine.errors import IndexShardError, RequestError
from selfrag_engine.retrieval.encoders import Encoder, get_encoder
from selfrag_engine.retrieval.passages import CorpusError, Passage
from selfrag_engine.retrieval.retriever import (
    DEFAULT_TRAIN_SIZE,
    Hit,
    Retriever,
    TextSearch,
    _check_embeddings,
    _check_k,
    _IndexBuilder,
    contriever_rows,
    embedding_rows,
    read_description,
    same_encoder,
)

__all__ = ["MANIFEST_FILE", "IndexShardSearcher", "ShardedRetriever", "build_sharded", "is_sharded", "load_retriever",
           "merge_top_k", "shard_dir_name"]

MANIFEST_FILE = "sharded.json"
FORMAT = "selfrag-engine-sharded-retriever"
FORMAT_VERSION = 1


def shard_dir_name(i: int, n: int) -> str:
    return f"shard-{i}-of-{n}"


def is_sharded(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST_FILE).is_file()


class IndexShardSearcher(Protocol):
    """One shard as the fan-out sees it: in this process (a `Retriever`) or a client of a remote one."""

    def search_embeddings(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-k per query embedding, the hits' rows local to the shard."""
        ...


def merge_top_k(per_shard: Sequence[Sequence[Hit]], num_shards: int, k: int) -> list[Hit]:
    """One query's hits from every shard (local rows) -> the global top-k (global rows): the best scores,
    the lowest rows among equal scores at the cut, listed highest row first among equal scores as faiss does."""
    candidates = [Hit(h.passage, h.score, h.row * num_shards + i)
                  for i, hits in enumerate(per_shard) for h in hits]
    best = sorted(candidates, key=lambda h: (-h.score, h.row))[:k]
    return sorted(best, key=lambda h: (-h.score, -h.row))


class _MissingShard:
    def __init__(self, message: str):
        self.message = message

    def search_embeddings(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        raise IndexShardError(self.message)


def _set_omp_threads(n: int) -> None:
    import faiss

    faiss.omp_set_num_threads(n)


class ShardedRetriever(TextSearch):
    """The query encoder plus N shard searchers; searches like a `Retriever` (`search`, `search_batch`,
    `search_with_scores`, `search_batch_with_scores`, `search_embeddings`), fanning out to the shards at once."""

    def __init__(self, shards: Sequence[IndexShardSearcher], encoder: Encoder | None, dim: int, count: int,
                 names: Sequence[str] | None = None, omp_threads: int | None = None):
        if not shards:
            raise RequestError("a sharded index needs at least one shard")
        self.shards = list(shards)
        self.encoder = encoder
        self.dim, self.count = int(dim), int(count)
        self.names = list(names) if names is not None else [shard_dir_name(i, len(shards))
                                                          for i in range(len(shards))]
        # omp_threads: faiss's OpenMP threads in each fan-out thread (OpenMP's setting is per thread). One
        # thread per search, here and in the unsharded index, gives bitwise the unsharded scores; faiss's
        # multi-threaded scan of a flat index may round a score's last bit differently by the size it splits.
        self._pool = ThreadPoolExecutor(max_workers=len(self.shards), thread_name_prefix="selfrag-shard",
                                        initializer=None if omp_threads is None else _set_omp_threads,
                                        initargs=() if omp_threads is None else (omp_threads,))

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def __len__(self) -> int:
        return self.count

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _search_shard(self, i: int, q: np.ndarray, k: int) -> list[list[Hit]]:
        try:
            hits = self.shards[i].search_embeddings(q, k)
        except IndexShardError:
            raise
        except RequestError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of a shard is that shard's named error
            raise IndexShardError(f"index shard {i} of {self.num_shards} ({self.names[i]}) failed: "
                                  f"{type(e).__name__}: {e}") from e
        if len(hits) != len(q):
            raise IndexShardError(f"index shard {i} of {self.num_shards} ({self.names[i]}) answered "
                                  f"{len(hits)} queries of {len(q)}")
        return hits

    def search_embeddings(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        k = _check_k(k)
        q = _check_embeddings(queries, self.dim)
        if len(q) == 0:
            return []
        futures = [self._pool.submit(self._search_shard, i, q, k) for i in range(self.num_shards)]
        per_shard = [f.result() for f in futures]  # the first failing shard's error, after all have answered
        return [merge_top_k([hits[j] for hits in per_shard], self.num_shards, k) for j in range(len(q))]

    def _encode_queries(self, queries: list[str]) -> np.ndarray:
        if self.encoder is None:
            raise RequestError("this sharded index has no query encoder: pass one, or search with embeddings")
        return self.encoder.encode_queries(queries)

    # ---- files --------------------------------------------------------------------------------------

    @staticmethod
    def read_manifest(directory: str | Path) -> dict[str, Any]:
        meta = read_description(directory, MANIFEST_FILE, FORMAT, FORMAT_VERSION,
                                ("shards", "dim", "factory", "count"), what="sharded index",
                                described="sharded index", build="`selfrag-engine index build --shards N`")
        if not isinstance(meta["shards"], int) or meta["shards"] < 1:
            raise RequestError(f"{Path(directory) / MANIFEST_FILE}: 'shards' must be a positive integer, "
                               f"got {meta['shards']!r}")
        return meta

    @classmethod
    def shard_paths(cls, directory: str | Path) -> list[Path]:
        n = cls.read_manifest(directory)["shards"]
        return [Path(directory) / shard_dir_name(i, n) for i in range(n)]

    @staticmethod
    def load_shard(directory: str | Path, i: int, gpu: bool | None = None) -> Retriever:
        """Shard i of the sharded index in `directory`, as a `Retriever` without an encoder (what a retrieval
        replica serves)."""
        meta = ShardedRetriever.read_manifest(directory)
        n = meta["shards"]
        if not 0 <= i < n:
            raise RequestError(f"{directory}: has {n} shards, no shard {i}")
        path = Path(directory) / shard_dir_name(i, n)
        if not path.is_dir():
            raise IndexShardError(f"index shard {i} of {n} is missing: no directory {path}")
        expected = (meta["count"] - i + n - 1) // n
        shard = Retriever.load(path, gpu=gpu)
        if len(shard) != expected or shard.dim != meta["dim"]:
            raise IndexShardError(f"index shard {i} of {n} ({path}) holds {len(shard)} vectors of dimension "
                                  f"{shard.dim}; {MANIFEST_FILE} says {expected} of dimension {meta['dim']}")
        for name, value in (meta.get("search_parameters") or {}).items():
            shard.set_search_parameter(name, value)
        return shard

    @classmethod
    def encoder_for(cls, directory: str | Path, encoder: Encoder | str | None = None,
                    device: str | None = None) -> Encoder | None:
        """The query encoder (by default the one the index was built with), checked against the index."""
        meta = cls.read_manifest(directory)
        built_with = meta.get("encoder")
        asked = encoder.strip() if isinstance(encoder, str) else getattr(encoder, "name", None)
        if built_with and asked and not same_encoder(asked, built_with):
            raise RequestError(f"the index in {directory} was built with encoder {built_with!r}; searching it with "
                               f"{asked!r} would compare unrelated embeddings")
        if isinstance(encoder, str):
            encoder = get_encoder(encoder, device=device)
        elif encoder is None and built_with:
            encoder = get_encoder(built_with, device=device)
        if encoder is not None and encoder.dim != meta["dim"]:
            raise RequestError(f"encoder {encoder.name!r} gives {encoder.dim}-dimensional embeddings but the index "
                               f"in {directory} holds {meta['dim']}-dimensional ones")
        return encoder

    @classmethod
    def load(cls, directory: str | Path, encoder: Encoder | str | None = None, gpu: bool | None = None,
             device: str | None = None, omp_threads: int | None = None) -> "ShardedRetriever":
        """Every shard in this process. A shard that cannot be loaded is kept as a missing shard: the
        queries fail with its `IndexShardError` (each query needs every shard)."""
        meta = cls.read_manifest(directory)
        enc = cls.encoder_for(directory, encoder, device)
        n = meta["shards"]
        shards: list[IndexShardSearcher] = []
        for i in range(n):
            try:
                shards.append(cls.load_shard(directory, i, gpu))
            except (IndexShardError, RequestError, CorpusError) as e:
                shards.append(_MissingShard(e.args[0] if isinstance(e, IndexShardError)
                                            else f"index shard {i} of {n} cannot be loaded: {e}"))
        return cls(shards, enc, meta["dim"], meta["count"], [shard_dir_name(i, n) for i in range(n)], omp_threads)


def build_sharded(directory: str | Path, passages: Sequence[Passage], num_shards: int, encoder: Encoder | None,
                  factory: str = "Flat", *, embeddings: np.ndarray | None = None, ids: Sequence[Any] | None = None,
                  contriever_shards: str | Path | Sequence[str | Path] | None = None, progress: bool = True,
                  batch_size: int = 64, train_size: int = DEFAULT_TRAIN_SIZE,
                  search_parameters: dict[str, float] | None = None) -> Path:
    """Builds and writes a sharded index: from precomputed `embeddings` (row i for `ids[i]`, or passages[i]),
    from Contriever embedding files, or by encoding the passages. Training (IVF, PQ) uses the first
    `train_size` vectors, as the unsharded build does."""
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise RequestError(f"--shards must be a positive integer, got {num_shards!r}")
    chunks: Iterable[tuple[list[Passage], np.ndarray]]
    if contriever_shards is not None:
        chunks = contriever_rows(passages, contriever_shards)
    elif embeddings is not None:
        chunks = [embedding_rows(passages, ids, embeddings)]
    else:
        if encoder is None:
            raise RequestError("building from passages needs an encoder to embed them")
        passages = list(passages)
        if not passages:
            raise CorpusError("no passages to index")
        chunks = [(passages, encoder.encode_passages(passages, batch_size=batch_size, progress=progress))]
    builder: _IndexBuilder | None = None
    rows: list[Passage] = []
    for chunk_rows, emb in chunks:
        if builder is None:
            if encoder is not None and encoder.dim != emb.shape[1]:
                raise RequestError(f"encoder {encoder.name!r} gives {encoder.dim}-dimensional embeddings but the "
                                   f"precomputed embeddings are {emb.shape[1]}-dimensional")
            builder = _IndexBuilder(emb.shape[1], factory, train_size, progress, pieces=num_shards)
        rows.extend(chunk_rows)
        builder.add(emb)
    if builder is None:
        raise CorpusError("no embeddings to index")
    pieces = builder.finish_pieces()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params: dict[str, float] = {}
    for i, index in enumerate(pieces):
        shard = Retriever(index, rows[i::num_shards], None, factory, gpu=False)
        for name, value in (search_parameters or {}).items():
            shard.set_search_parameter(name, value)
        params = shard.search_parameters()
        shard.save(directory / shard_dir_name(i, num_shards))
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "shards": num_shards, "assignment": "round-robin",
            "encoder": None if encoder is None else encoder.name, "dim": builder.dim, "factory": factory,
            "count": len(rows), "metric": "inner_product", "search_parameters": params}
    (directory / MANIFEST_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return directory


def read_index_meta(directory: str | Path) -> dict[str, Any]:
    """The description of the index in `directory` (a sharded index's manifest, or a plain index's
    `retriever.json`), checked without loading any vectors: the cheap check before a command loads a model."""
    if is_sharded(directory):
        return ShardedRetriever.read_manifest(directory)
    return Retriever.read_meta(directory)


def load_retriever(directory: str | Path, encoder: Encoder | str | None = None, gpu: bool | None = None,
                   device: str | None = None) -> Retriever | ShardedRetriever:
    """The retriever in `directory`: a sharded index (every shard in this process) or a plain one."""
    if is_sharded(directory):
        return ShardedRetriever.load(directory, encoder=encoder, gpu=gpu, device=device)
    return Retriever.load(directory, encoder=encoder, gpu=gpu, device=device)
