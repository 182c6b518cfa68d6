"""Retrieval for Self-RAG: passages and corpus files, text encoders, a faiss retriever, and the `index`
command. Importing this package loads neither faiss nor any model; the submodules do when used."""
from selfrag_engine.retrieval.passages import CorpusError, Passage, read_passages

__all__ = ["CorpusError", "Passage", "read_passages"]
