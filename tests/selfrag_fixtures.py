"""Shared pieces of the Self-RAG algorithm tests: an engine whose tiny random model writes reflection tokens,
random questions and passages, a retriever that records its queries, and full-vocabulary references."""
from __future__ import annotations

import random
import string

import torch

from selfrag_engine import Engine
from selfrag_engine.retrieval.passages import Passage
from tests.helpers import tiny_checkpoint

CKPT = dict(seed=31, num_key_value_heads=2)
# Scaling the reflection tokens' (and EOS's) rows of lm_head makes the random model write them now and then,
# at positions its context decides: segments end, branches score differently, trees grow deeper.
STEER = 2.0


def steered_engine(scale: float = STEER, **options) -> Engine:
    engine = Engine.from_pretrained(tiny_checkpoint(**CKPT), progress=False, **options)
    ref = engine.tokenizer.reflection_token_ids()
    ids = [*ref.retrieval, *ref.relevance, *ref.grounding, *ref.utility, engine.tokenizer.eos_id]
    engine.model.lm_head.weight.data[ids] *= scale
    return engine


def words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7))) for _ in range(n))


def question(rng: random.Random) -> str:
    return f"Where was {words(rng, 2).title()} born in {rng.randint(1700, 1999)}?"


def passages(rng: random.Random, k: int) -> list[Passage]:
    return [Passage(words(rng, 2).title(), words(rng, rng.randint(4, 10)) + ".", str(rng.randint(0, 10 ** 6)))
            for _ in range(k)]


class RecordingRetriever:
    """Answers every query with passages derived from it, and records the queries (and how many engine
    requests existed at each call)."""

    def __init__(self, engine: Engine | None = None, seed: int | None = None):
        self.engine = engine
        self.queries: list[str] = []
        self.live_requests: list[int] = []
        self.seed = 20261201 if seed is None else seed
        self.answers: dict[str, list[Passage]] = {}

    def search(self, query: str, k: int) -> list[Passage]:
        self.queries.append(query)
        self.live_requests.append(len(self.engine.seqs) if self.engine is not None else -1)
        rng = random.Random(f"{self.seed}:{query}")
        docs = passages(rng, k)
        self.answers[query] = docs
        return docs


def probs_at(engine: Engine, context: list[int]) -> torch.Tensor:
    """Full-vocabulary probabilities (float64) of the token that follows `context`, from a fresh prefill."""
    return torch.softmax(engine.score(context)[-1].double(), -1)


def used_blocks(engine: Engine) -> int:
    return engine.cache_stats()["used"]
