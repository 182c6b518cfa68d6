"""Dense passage retrieval over a faiss index (inner product), with the passages and the query encoder.

`Retriever.build` encodes passages and indexes them; `from_embeddings` and `from_contriever_shards` index
precomputed embeddings instead (the Self-RAG release's Contriever Wikipedia embeddings). The index type is
any faiss `index_factory` string with the inner-product metric: "Flat" (exact, the default, what the
reference uses), "IVF4096,Flat", "IVF4096,PQ64", "HNSW32", "PQ64"...; indexes that need training are trained
on the embeddings themselves (at most `train_size` of them). IVF indexes search `nprobe` lists, by default
min(nlist, 16).

A saved retriever is a directory: `index.faiss`, `passages.jsonl` (row i of the index is line i) and
`retriever.json` (format version, encoder spec, dimension, factory string, count, search parameters).

GPU: when faiss was built with GPU support (the faiss-gpu wheels) and a CUDA device is visible, the index is
copied to GPU 0 for searching (`gpu=None`, the default, decides by itself; `gpu=False` keeps it on the CPU).
Building and training run on the CPU copy.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from selfrag_engine.errors import RequestError
from selfrag_engine.retrieval.encoders import Encoder, get_encoder
from selfrag_engine.retrieval.passages import (
    CorpusError,
    Passage,
    read_passages,
    write_passages_jsonl,
)
from selfrag_engine.retrieval.shards import iter_embedding_shards

__all__ = ["FORMAT_VERSION", "Hit", "Retriever", "faiss_gpu_available"]

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
PASSAGES_FILE = "passages.jsonl"
META_FILE = "retriever.json"
DEFAULT_TRAIN_SIZE = 1_000_000
DEFAULT_NPROBE = 16
_ADD_CHUNK = 65536


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise RequestError("retrieval needs faiss, which is not installed: pip install 'selfrag-engine[retrieval]' "
                           "(or 'selfrag-engine[retrieval-gpu]' for faiss's CUDA build)") from None
    return faiss


def _faiss_message(e: Exception) -> str:
    """faiss's own message without its C++ location prefix."""
    return re.sub(r"^Error in .*? at \S+:\d+: ", "", str(e).strip().splitlines()[-1])


def faiss_gpu_available() -> bool:
    """True when this faiss has GPU support and sees at least one CUDA device."""
    faiss = _faiss()
    if not hasattr(faiss, "StandardGpuResources"):
        return False
    try:
        return faiss.get_num_gpus() > 0
    except Exception:  # a GPU build without a usable driver
        return False


@dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float  # inner product of the query and passage embeddings
    row: int      # the passage's row in the index


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise RequestError(f"k (passages per query) must be a positive integer, got {k!r}")
    return int(k)


def _check_embeddings(queries: np.ndarray, dim: int) -> np.ndarray:
    """Query embeddings [n, dim] as the contiguous float32 array faiss searches."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != dim:
        raise RequestError(f"query embeddings of shape {tuple(q.shape)} for an index of dimension {dim}")
    return q


def _check_queries(queries: Sequence[str]) -> list[str]:
    if isinstance(queries, str):
        raise TypeError("search_batch takes a sequence of queries, not one string")
    out = list(queries)
    for i, q in enumerate(out):
        if not isinstance(q, str) or not q.strip():
            raise RequestError(f"query {i} is empty" if isinstance(q, str) else
                               f"query {i} must be a string, got {type(q).__name__}")
    return out


class _IndexBuilder:
    """Adds embedding chunks to a new faiss index, training it first (on the first `train_size` vectors)
    when its type needs training."""

    def __init__(self, dim: int, factory: str, train_size: int, progress: bool, total: int | None = None,
                 pieces: int = 1):
        faiss = _faiss()
        if not isinstance(factory, str) or not factory.strip():
            raise RequestError(f"index factory must be a non-empty faiss index_factory string, got {factory!r}")
        if isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 1:
            raise RequestError(f"train_size must be a positive integer, got {train_size!r}")
        try:
            self.index = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise RequestError(f"faiss cannot build index {factory!r} for dimension {dim}: "
                               f"{_faiss_message(e)}") from None
        self.dim, self.factory, self.train_size = int(dim), factory, train_size
        # pieces > 1: a sharded build. The vectors are dealt round-robin (global row g goes to piece g % pieces
        # as its row g // pieces) into copies of the one trained (empty) index, so every piece shares its
        # coarse quantizer and codebooks and the pieces together are the unsharded index.
        if isinstance(pieces, bool) or not isinstance(pieces, int) or pieces < 1:
            raise RequestError(f"the number of index shards must be a positive integer, got {pieces!r}")
        self.num_pieces = pieces
        self.pieces: list[Any] = []
        self.num_added = 0
        self.pending: list[np.ndarray] = []
        self.num_pending = 0
        # Opened at the first vectors added (training comes first), with the count when it is known, so no
        # empty "0vec" bar is left on the terminal.
        self.bar: Any = None
        self.progress, self.total = progress, total

    def add(self, emb: np.ndarray) -> None:
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise RequestError(f"embeddings of shape {tuple(emb.shape)} for an index of dimension {self.dim}")
        if not np.isfinite(emb).all():
            raise RequestError("embeddings contain NaN or infinite values")
        if self.index.is_trained:
            self._add(emb)
            return
        self.pending.append(emb)
        self.num_pending += len(emb)
        if self.num_pending >= self.train_size:
            self._train_and_flush()

    def _add(self, emb: np.ndarray) -> None:
        if self.num_pieces > 1 and not self.pieces:
            self.pieces = [_faiss().clone_index(self.index) for _ in range(self.num_pieces)]
        for start in range(0, len(emb), _ADD_CHUNK):
            chunk = emb[start:start + _ADD_CHUNK]
            if self.num_pieces == 1:
                self.index.add(chunk)
            else:
                for i, piece in enumerate(self.pieces):
                    rows = chunk[(i - self.num_added) % self.num_pieces::self.num_pieces]
                    if len(rows):
                        piece.add(np.ascontiguousarray(rows))
            self.num_added += len(chunk)
            if self.bar is None:
                self.bar = tqdm(desc=f"adding to faiss {self.factory}", total=self.total, unit="vector",
                                unit_scale=self.total is None or self.total >= 10_000, disable=not self.progress,
                                leave=False)
            self.bar.update(len(chunk))

    def _train_and_flush(self) -> None:
        data = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        try:
            self.index.train(data[:self.train_size])
        except RuntimeError as e:
            raise RequestError(f"training faiss index {self.factory!r} on {min(len(data), self.train_size)} "
                               f"vectors failed: {_faiss_message(e)}") from None
        self.pending, self.num_pending = [], 0
        self._add(data)

    def finish(self) -> Any:
        if self.pending:
            self._train_and_flush()
        if self.bar is not None:
            self.bar.close()
        if self.num_added == 0:
            raise CorpusError("no embeddings to index")
        if self.num_added < self.num_pieces:
            raise CorpusError(f"{self.num_added} embeddings cannot fill {self.num_pieces} index shards")
        for index in self.pieces or [self.index]:
            ivf = _faiss().try_extract_index_ivf(index)
            if ivf is not None:
                ivf.nprobe = min(ivf.nlist, DEFAULT_NPROBE)
        return self.index

    def finish_pieces(self) -> list[Any]:
        """The pieces of a sharded build (piece i holds the global rows i, i + n, i + 2n, ...)."""
        self.finish()
        return self.pieces if self.num_pieces > 1 else [self.index]


def same_encoder(a: str, b: str) -> bool:
    """Whether two encoder specs name the same encoder; a Contriever is the same model wherever it lives."""
    kind_a, kind_b = a.partition(":")[0], b.partition(":")[0]
    return a == b or kind_a == kind_b == "contriever"


def _passages_by_id(passages: Sequence[Passage]) -> dict[str, Passage]:
    by_id: dict[str, Passage] = {}
    for p in passages:
        if p.id is None:
            continue
        if p.id in by_id:
            raise CorpusError(f"passage id {p.id!r} occurs more than once")
        by_id[p.id] = p
    if not by_id:
        raise CorpusError("the passages have no ids to match the embeddings' ids with")
    return by_id


def _lookup(by_id: dict[str, Passage], ids: Iterable[Any], where: str) -> list[Passage]:
    out = []
    for pid in ids:
        p = by_id.get(str(pid))
        if p is None:
            raise CorpusError(f"{where}: embedding id {str(pid)!r} has no passage with that id")
        out.append(p)
    return out


def embedding_rows(passages: Sequence[Passage], ids: Sequence[Any] | None,
                   embeddings: np.ndarray) -> tuple[list[Passage], np.ndarray]:
    """The passage of each embedding row: `ids[i]` names the passage of `embeddings[i]`; with `ids=None`,
    embeddings[i] belongs to passages[i]."""
    passages = list(passages)
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise RequestError(f"embeddings must be a 2-D array, got shape {tuple(embeddings.shape)}")
    if ids is None:
        if len(passages) != len(embeddings):
            raise CorpusError(f"{len(embeddings)} embeddings for {len(passages)} passages")
        return passages, embeddings
    if len(ids) != len(embeddings):
        raise CorpusError(f"{len(ids)} ids for {len(embeddings)} embeddings")
    return _lookup(_passages_by_id(passages), ids, "embeddings"), embeddings


def contriever_rows(passages: Sequence[Passage],
                    shards: str | Path | Sequence[str | Path]) -> Iterable[tuple[list[Passage], np.ndarray]]:
    """(passages, embeddings) of each Contriever embeddings file in turn, the ids looked up among `passages`."""
    by_id = _passages_by_id(passages)
    for shard in iter_embedding_shards(shards):
        yield _lookup(by_id, shard.ids, str(shard.path)), shard.embeddings


class TextSearch:
    """Searching by text, for an index that embeds queries (`_encode_queries`) and searches embeddings
    (`search_embeddings`): the unsharded `Retriever` and the sharded one."""

    def search_embeddings(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        raise NotImplementedError

    def _encode_queries(self, queries: list[str]) -> np.ndarray:
        raise NotImplementedError

    def search_batch_with_scores(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        k = _check_k(k)
        queries = _check_queries(queries)
        if not queries:
            return []
        return self.search_embeddings(self._encode_queries(queries), k)

    def search_with_scores(self, query: str, k: int) -> list[Hit]:
        return self.search_batch_with_scores([query], k)[0]

    def search_batch(self, queries: Sequence[str], k: int) -> list[list[Passage]]:
        return [[h.passage for h in hits] for hits in self.search_batch_with_scores(queries, k)]

    def search(self, query: str, k: int) -> list[Passage]:
        """The k passages most similar to the query, best first (what SelfRAG calls)."""
        return [h.passage for h in self.search_with_scores(query, k)]


class Retriever(TextSearch):
    """faiss index + passages (row i of the index is `passages[i]`) + the encoder that embeds queries."""

    def __init__(self, index: Any, passages: Sequence[Passage], encoder: Encoder | None, factory: str = "Flat",
                 gpu: bool | None = None):
        self.passages = list(passages)
        if index.ntotal != len(self.passages):
            raise CorpusError(f"the index holds {index.ntotal} vectors but {len(self.passages)} passages were given")
        if encoder is not None and encoder.dim != index.d:
            raise RequestError(f"encoder {encoder.name!r} gives {encoder.dim}-dimensional embeddings but the index "
                               f"holds {index.d}-dimensional ones (built with another encoder)")
        self.encoder = encoder
        self.factory = factory
        self.dim = int(index.d)
        self._cpu_index = index
        self.index = index
        self._gpu_resources = None
        if gpu or (gpu is None and faiss_gpu_available()):
            self._to_gpu(strict=bool(gpu))

    # ---- building -----------------------------------------------------------------------------------

    @classmethod
    def build(cls, passages: Sequence[Passage], encoder: Encoder, factory: str = "Flat", progress: bool = True,
              batch_size: int = 64, train_size: int = DEFAULT_TRAIN_SIZE, gpu: bool | None = None) -> "Retriever":
        """Encodes the passages (`title + " " + text`) and indexes them."""
        passages = list(passages)
        if not passages:
            raise CorpusError("no passages to index")
        emb = encoder.encode_passages(passages, batch_size=batch_size, progress=progress)
        return cls.from_embeddings(passages, None, emb, encoder, factory, progress, train_size, gpu)

    @classmethod
    def from_embeddings(cls, passages: Sequence[Passage], ids: Sequence[Any] | None, embeddings: np.ndarray,
                        encoder: Encoder | None, factory: str = "Flat", progress: bool = True,
                        train_size: int = DEFAULT_TRAIN_SIZE, gpu: bool | None = None) -> "Retriever":
        """Indexes precomputed embeddings. `ids[i]` names the passage of `embeddings[i]`; with `ids=None`,
        embeddings[i] belongs to passages[i]. Passages without an embedding are left out."""
        rows, embeddings = embedding_rows(passages, ids, embeddings)
        cls._check_encoder_dim(encoder, embeddings.shape[1])
        builder = _IndexBuilder(embeddings.shape[1], factory, train_size, progress, len(embeddings))
        builder.add(embeddings)
        return cls(builder.finish(), rows, encoder, factory, gpu)

    @classmethod
    def from_contriever_shards(cls, passages: Sequence[Passage], shards: str | Path | Sequence[str | Path],
                               encoder: Encoder | None, factory: str = "Flat", progress: bool = True,
                               train_size: int = DEFAULT_TRAIN_SIZE, gpu: bool | None = None) -> "Retriever":
        """Indexes the Contriever embedding shards (a glob such as "wikipedia_embeddings/passages_*", or a list
        of files) one at a time; their ids are looked up among `passages` (e.g. psgs_w100.tsv)."""
        builder: _IndexBuilder | None = None
        rows: list[Passage] = []
        for shard_rows, embeddings in contriever_rows(passages, shards):
            if builder is None:
                cls._check_encoder_dim(encoder, embeddings.shape[1])
                builder = _IndexBuilder(embeddings.shape[1], factory, train_size, progress)
            rows.extend(shard_rows)
            builder.add(embeddings)
        assert builder is not None  # iter_embedding_shards raises on an empty list
        return cls(builder.finish(), rows, encoder, factory, gpu)

    @staticmethod
    def _check_encoder_dim(encoder: Encoder | None, dim: int) -> None:
        if encoder is not None and encoder.dim != dim:
            raise RequestError(f"encoder {encoder.name!r} gives {encoder.dim}-dimensional embeddings but the "
                               f"precomputed embeddings are {dim}-dimensional")

    # ---- GPU and search parameters ------------------------------------------------------------------

    def _to_gpu(self, strict: bool) -> None:
        faiss = _faiss()
        if not faiss_gpu_available():
            if strict:
                raise RequestError("gpu=True but this faiss has no GPU support or sees no CUDA device "
                                   "(install faiss-gpu)")
            return
        try:
            self._gpu_resources = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self._cpu_index)
        except RuntimeError as e:  # e.g. HNSW has no GPU implementation
            if strict:
                raise RequestError(f"faiss cannot move index {self.factory!r} to the GPU: "
                                   f"{_faiss_message(e)}") from None
            warnings.warn(f"searching index {self.factory!r} on the CPU: faiss cannot move it to the GPU "
                          f"({_faiss_message(e)})")
            self.index, self._gpu_resources = self._cpu_index, None

    @property
    def on_gpu(self) -> bool:
        return self.index is not self._cpu_index

    def set_search_parameter(self, name: str, value: float) -> None:
        """A faiss search-time parameter, e.g. ("nprobe", 64) for IVF or ("efSearch", 128) for HNSW."""
        faiss = _faiss()
        try:
            faiss.ParameterSpace().set_index_parameter(self._cpu_index, name, value)
            if self.on_gpu:
                faiss.GpuParameterSpace().set_index_parameter(self.index, name, value)
        except RuntimeError as e:
            raise RequestError(f"index {self.factory!r} has no search parameter {name!r} "
                               f"({_faiss_message(e)})") from None

    def search_parameters(self) -> dict[str, float]:
        ivf = _faiss().try_extract_index_ivf(self._cpu_index)
        params: dict[str, float] = {}
        if ivf is not None:
            params["nprobe"] = int(ivf.nprobe)
        hnsw = getattr(self._cpu_index, "hnsw", None)
        if hnsw is not None:
            params["efSearch"] = int(hnsw.efSearch)
        return params

    # ---- search -------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.passages)

    def search_embeddings(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-k passages for query embeddings [n, dim], best first."""
        k = _check_k(k)
        q = _check_embeddings(queries, self.dim)
        if len(q) == 0:
            return []
        scores, rows = self.index.search(q, min(k, len(self.passages)))
        return [[Hit(self.passages[r], float(s), int(r)) for s, r in zip(srow, rrow) if r >= 0]
                for srow, rrow in zip(scores, rows)]

    def _encode_queries(self, queries: list[str]) -> np.ndarray:
        if self.encoder is None:
            raise RequestError("this retriever has no query encoder: pass one (e.g. Retriever.load(dir, "
                               "encoder=...)) or search with embeddings")
        return self.encoder.encode_queries(queries)

    # ---- files --------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        faiss = _faiss()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self._cpu_index, str(directory / INDEX_FILE))
        write_passages_jsonl(self.passages, directory / PASSAGES_FILE)
        meta = {"format": "selfrag-engine-retriever", "version": FORMAT_VERSION,
                "encoder": None if self.encoder is None else self.encoder.name, "dim": self.dim,
                "factory": self.factory, "count": len(self.passages), "metric": "inner_product",
                "search_parameters": self.search_parameters()}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return directory

    @staticmethod
    def read_meta(directory: str | Path) -> dict[str, Any]:
        return read_description(directory, META_FILE, "selfrag-engine-retriever", FORMAT_VERSION,
                                ("dim", "factory", "count"), what="retriever index",
                                described="retriever", build="`selfrag-engine index build`")

    @classmethod
    def load(cls, directory: str | Path, encoder: Encoder | str | None = None, gpu: bool | None = None,
             device: str | None = None) -> "Retriever":
        """A saved retriever. The encoder defaults to the one it was built with (its spec in retriever.json);
        an encoder object or spec may be given instead: the same one (a Contriever may have moved to another
        directory), or any encoder of the index's dimension for an index built from precomputed embeddings
        without one. Another encoder is refused, naming both."""
        faiss = _faiss()
        directory = Path(directory)
        meta = cls.read_meta(directory)
        for name in (INDEX_FILE, PASSAGES_FILE):
            if not (directory / name).is_file():
                raise RequestError(f"{directory}: missing {name}")
        built_with = meta.get("encoder")
        asked = encoder.strip() if isinstance(encoder, str) else getattr(encoder, "name", None)
        if built_with and asked and not same_encoder(asked, built_with):
            raise RequestError(f"the index in {directory} was built with encoder {built_with!r}; searching it with "
                               f"{asked!r} would compare unrelated embeddings (leave the encoder out to use the "
                               f"index's own, or rebuild the index with {asked!r})")
        if isinstance(encoder, str):
            encoder = get_encoder(encoder, device=device)
        elif encoder is None and meta.get("encoder"):
            encoder = get_encoder(meta["encoder"], device=device)
        if encoder is not None and encoder.dim != meta["dim"]:
            raise RequestError(f"encoder {encoder.name!r} gives {encoder.dim}-dimensional embeddings but the index "
                               f"in {directory} holds {meta['dim']}-dimensional ones (built with encoder "
                               f"{meta.get('encoder')!r})")
        try:
            index = faiss.read_index(str(directory / INDEX_FILE))
        except RuntimeError as e:
            raise RequestError(f"{directory / INDEX_FILE}: not a readable faiss index "
                               f"({_faiss_message(e)})") from None
        if index.d != meta["dim"] or index.ntotal != meta["count"]:
            raise RequestError(f"{directory}: the index holds {index.ntotal} vectors of dimension {index.d} but "
                               f"{META_FILE} says {meta['count']} of dimension {meta['dim']}")
        passages = read_passages(directory / PASSAGES_FILE)
        retriever = cls(index, passages, encoder, meta["factory"], gpu)
        for name, value in (meta.get("search_parameters") or {}).items():
            retriever.set_search_parameter(name, value)
        return retriever


def read_description(directory: str | Path, file: str, format_name: str, version: int, keys: Sequence[str], *,
                     what: str, described: str, build: str) -> dict[str, Any]:
    """The JSON description `file` of an index directory, checked: its format name and version, and `keys`
    present; each problem a RequestError naming the file."""
    path = Path(directory) / file
    if not path.is_file():
        raise RequestError(f"{directory}: not a {what} directory (no {file}); build one with {build}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RequestError(f"{path}: not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict) or meta.get("format") != format_name:
        raise RequestError(f"{path}: not a selfrag-engine {described} description")
    if meta.get("version") != version:
        raise RequestError(f"{path}: format version {meta.get('version')!r}, this build reads {version}")
    for key in keys:
        if key not in meta:
            raise RequestError(f"{path}: missing field {key!r}")
    return meta
