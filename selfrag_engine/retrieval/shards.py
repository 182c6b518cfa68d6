"""Precomputed passage embeddings in the Contriever shards format, so an index can be built without encoding.

Contriever's `generate_passage_embeddings.py` writes one file per shard (`passages_00`, `passages_01`, ...,
the Self-RAG release's `wikipedia_embeddings/passages_*`), each a pickled tuple `(ids, embeddings)`: a list of
passage ids (the `id` column of `psgs_w100.tsv`, as strings) and a numpy array [len(ids), dim], float16 or
float32. Shards are read with an unpickler that only rebuilds numpy arrays, so a hostile file cannot run code.
"""
from __future__ import annotations

import glob
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from selfrag_engine.retrieval.passages import CorpusError

__all__ = ["EmbeddingShard", "expand_shard_paths", "iter_embedding_shards", "read_embedding_shard",
           "write_embedding_shard"]

# What pickled numpy arrays reference (numpy 1.x and 2.x module names); protocol 2 spells bytes through
# _codecs.encode.
_ALLOWED = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: an embeddings shard holds only ids and "
                                     "a numpy array")


@dataclass
class EmbeddingShard:
    path: Path
    ids: list[str]
    embeddings: np.ndarray  # float32 [len(ids), dim], C-contiguous


def read_embedding_shard(path: str | Path) -> EmbeddingShard:
    path = Path(path)
    try:
        with path.open("rb") as f:
            obj = _ArrayUnpickler(io.BufferedReader(f)).load()
    except FileNotFoundError:
        raise CorpusError(f"{path}: no such embeddings shard") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
        raise CorpusError(f"{path}: not a Contriever embeddings shard ({e})") from None
    if not isinstance(obj, tuple) or len(obj) != 2:
        raise CorpusError(f"{path}: expected a pickled (ids, embeddings) tuple, got {type(obj).__name__}")
    ids, emb = obj
    if not isinstance(emb, np.ndarray) or emb.ndim != 2:
        raise CorpusError(f"{path}: embeddings must be a 2-D numpy array, got "
                          f"{getattr(emb, 'shape', type(emb).__name__)}")
    if not np.issubdtype(emb.dtype, np.floating):
        raise CorpusError(f"{path}: embeddings must be floating point, got {emb.dtype}")
    if not isinstance(ids, (list, tuple)) or len(ids) != emb.shape[0]:
        raise CorpusError(f"{path}: {len(ids) if isinstance(ids, (list, tuple)) else type(ids).__name__} ids for "
                          f"{emb.shape[0]} embeddings")
    return EmbeddingShard(path, [str(i) for i in ids], np.ascontiguousarray(emb, dtype=np.float32))


def expand_shard_paths(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """A glob pattern (e.g. "wikipedia_embeddings/passages_*"), one path, or a list of paths; sorted by name
    so the shards keep their order."""
    if isinstance(spec, (str, Path)):
        paths = sorted(Path(p) for p in glob.glob(str(spec)))
        if not paths:
            raise CorpusError(f"no embeddings shards match {str(spec)!r}")
        return paths
    paths = [Path(p) for p in spec]
    if not paths:
        raise CorpusError("no embeddings shards given")
    return paths


def iter_embedding_shards(spec: str | Path | Sequence[str | Path]) -> Iterator[EmbeddingShard]:
    """The shards one at a time (the full Wikipedia set does not fit in memory twice)."""
    dim = None
    for path in expand_shard_paths(spec):
        shard = read_embedding_shard(path)
        if dim is not None and shard.embeddings.shape[1] != dim:
            raise CorpusError(f"{path}: embeddings of dimension {shard.embeddings.shape[1]}, but earlier shards "
                              f"have {dim}")
        dim = shard.embeddings.shape[1]
        yield shard


def write_embedding_shard(path: str | Path, ids: Sequence[str], embeddings: np.ndarray) -> None:
    """Writes one shard in the Contriever format (a pickled (list of ids, numpy array) tuple)."""
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(ids):
        raise ValueError(f"{len(ids)} ids for embeddings of shape {embeddings.shape}")
    with Path(path).open("wb") as f:
        pickle.dump(([str(i) for i in ids], embeddings), f)
