"""Concurrent searches gathered into batches: many users' questions, one encoder pass and one faiss search.

`BatchedSearch(retriever)` is itself a retriever (`search(query, k)`, thread-safe, blocking). One worker
thread serves the queue: a search that arrives while the worker is idle runs at once, alone; the searches
that arrive while a batch runs wait for it and then go together, as one `search_batch(queries, k)` of the
wrapped retriever (per distinct k, so every answer is the one its own search would give). A lone user pays
no added wait; under load the encoder runs one forward per batch, and the index spreads a batch's queries over
its threads instead of many calls contending for them (bench/search.py measures it).

A batch that fails is searched again one query at a time, so only the query at fault gets its error.
"""
from __future__ import annotations

import threading
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Sequence

from selfrag_engine.retrieval.passages import Passage

__all__ = ["BatchedSearch", "SearchStats"]


@dataclass
class SearchStats:
    """Counts since start; `batch_sizes[n]` is how many batches held n queries."""
    queries: int = 0
    batches: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)


class BatchedSearch:
    """Wraps `retriever` (anything with `search(query, k)`; `search_batch(queries, k)` is used when it has
    one). max_batch: the most queries one batch carries."""

    def __init__(self, retriever: Any, max_batch: int = 64):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.retriever = retriever
        self.max_batch = max_batch
        self.stats = SearchStats()
        self._queue: list[tuple[str, int, Future]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self.retriever)

    def submit(self, query: str, k: int) -> Future:
        """Queues a search; the future gets its passages (or the error the search raised)."""
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("this BatchedSearch is closed")
            self._queue.append((query, k, fut))
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="selfrag-search-batch", daemon=True)
                self._thread.start()
            self._cond.notify()
        return fut

    def search(self, query: str, k: int) -> list[Passage]:
        return self.submit(query, k).result()

    def search_batch(self, queries: Sequence[str], k: int) -> list[list[Passage]]:
        futures = [self.submit(q, k) for q in queries]
        return [f.result() for f in futures]

    def close(self) -> None:
        """Stops the worker once the queued searches are done; later searches are refused."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
            self._run(batch)

    def _run(self, batch: list[tuple[str, int, Future]]) -> None:
        self.stats.queries += len(batch)
        self.stats.batches += 1
        self.stats.batch_sizes[len(batch)] = self.stats.batch_sizes.get(len(batch), 0) + 1
        by_k: dict[int, list[tuple[str, Future]]] = defaultdict(list)
        for query, k, fut in batch:
            if fut.set_running_or_notify_cancel():
                by_k[k].append((query, fut))
        batched = getattr(self.retriever, "search_batch", None)
        for k, items in by_k.items():
            if batched is not None and len(items) > 1:
                try:
                    results = list(batched([q for q, _ in items], k))
                except Exception:  # noqa: BLE001 - searched one by one below, so each query gets its own error
                    results = None
                if results is not None and len(results) == len(items):
                    for (_, fut), passages in zip(items, results):
                        fut.set_result(passages)
                    continue
            for query, fut in items:
                try:
                    fut.set_result(self.retriever.search(query, k))
                except BaseException as e:  # noqa: BLE001 - handed to the caller; the worker lives on
                    fut.set_exception(e)
