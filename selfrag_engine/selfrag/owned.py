"""Engine requests owned by one Self-RAG call, every one of them released on every path, errors included.

The algorithms keep finished requests' KV blocks (keep_cache) to fork branches from them; a forgotten one
would hold its blocks for the engine's lifetime. Each request made through `Owned` is forgotten when the
call no longer needs it (`drop`) or, at the latest, when the `with` block exits.
"""
from __future__ import annotations

from typing import Sequence

from selfrag_engine.engine.client import EngineClient
from selfrag_engine.engine.output import RequestOutput
from selfrag_engine.engine.sampling_params import SamplingParams


class Owned:
    def __init__(self, engine: EngineClient):
        self.engine = engine
        self.ids: set[int] = set()

    def __enter__(self) -> "Owned":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, prompt: Sequence[int], params: SamplingParams, keep_cache: bool = False) -> int:
        rid = self.engine.add_request(prompt, params, keep_cache=keep_cache)
        self.ids.add(rid)
        return rid

    def fork(self, parent: int, suffixes: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
             prefix_len: int, keep_cache: bool = False) -> list[int]:
        kids = self.engine.fork(parent, suffixes, params, prefix_len=prefix_len, keep_cache=keep_cache)
        self.ids.update(kids)
        return kids

    def run(self, ids: Sequence[int]) -> list[RequestOutput]:
        return self.engine.run(ids)

    def drop(self, rid: int) -> None:
        """Forgets a request (freeing its blocks); its output can no longer be read."""
        if rid in self.ids:
            self.ids.discard(rid)
            self.engine.forget(rid)

    def close(self) -> None:
        # Every request gets its chance to be freed before the first failure, if any, is raised.
        failure: Exception | None = None
        for rid in sorted(self.ids):
            try:
                self.drop(rid)
            except Exception as e:  # noqa: BLE001 - re-raised below
                self.ids.discard(rid)
                failure = failure or e
        if failure is not None:
            raise failure
