"""What the Self-RAG algorithms need of an engine: `EngineClient`.

Two things satisfy it: the bare `Engine` (one thread, which steps it itself inside `run`), and a program's view
of an `EngineLoop` (engine/program.py: the loop's thread steps, the program waits). The algorithms are typed
against this protocol, so they run unchanged on either.
"""
from __future__ import annotations

from typing import Iterable, Protocol, Sequence, runtime_checkable

import torch

from selfrag_engine.config import LlamaConfig
from selfrag_engine.engine.output import RequestOutput
from selfrag_engine.engine.sampling_params import SamplingParams
from selfrag_engine.layers.sampler import ReflectionGroups
from selfrag_engine.tokenizer import Tokenizer


@runtime_checkable
class EngineClient(Protocol):
    tokenizer: Tokenizer
    config: LlamaConfig
    max_model_len: int
    reflection_groups: ReflectionGroups | None

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    keep_cache: bool = False) -> int:
        """Queues a prompt; returns its request id."""

    def fork(self, request_id: int, suffixes: Iterable[str | Sequence[int]],
             params: SamplingParams | Sequence[SamplingParams], prefix_len: int | None = None,
             keep_cache: bool = False) -> list[int]:
        """New requests continuing the request's cached prefix, one per suffix."""

    def run(self, request_ids: Iterable[int]) -> list[RequestOutput]:
        """Waits until every listed request is done; their outputs, in order."""

    def run_until_any(self, request_ids: Iterable[int]) -> list[int]:
        """Waits until at least one listed request is done; the listed ones done (see Engine.run_until_any)."""

    def output(self, request_id: int) -> RequestOutput:
        """What the request produced (complete once it is done)."""

    def forget(self, request_id: int) -> None:
        """Drops the request, freeing its blocks."""

    def score(self, token_ids: Sequence[int] | str) -> torch.Tensor:
        """Logits [len, vocab] (float32) of every position of a prompt."""
