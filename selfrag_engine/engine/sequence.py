"""A sequence being decoded: its tokens, how many have K/V in the cache, and what was sampled."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from selfrag_engine.engine.sampling_params import SamplingParams


class Status(Enum):
    WAITING = "waiting"    # no cache blocks (new, or preempted and to be recomputed)
    RUNNING = "running"    # holds blocks and is scheduled every step
    PAUSED = "paused"      # finished decoding but keeps its blocks, to be forked from
    FINISHED = "finished"  # blocks released


@dataclass
class Sequence:
    request_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    seed: int
    keep_cache: bool = False
    status: Status = Status.WAITING
    num_computed: int = 0  # leading tokens whose K/V are in the pool
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    cumulative_logprob: float = 0.0
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    reflection: list[torch.Tensor] = field(default_factory=list)  # per step: group-normalized probs [G]
    reflection_logprobs: list[torch.Tensor] = field(default_factory=list)  # per step: full-vocab logprobs [G]
    text_state: Any = None  # engine/output.py's TextState, made at the first token when detokenizing
    grammar: Any = None  # engine/structured_output.py's GrammarState, when params.structured is set
    scores: bool = False  # a scored prompt (Engine.score): every position's logits are kept, nothing is sampled
    # The prompt of a request sampled several times (n, best_of; engine/sample_groups.py): computed once into
    # the cache and paused there, sampling nothing; `lookahead` holds the prompt tokens its samples compute.
    prefill_only: bool = False
    lookahead: list[int] = field(default_factory=list)
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # scored: chunk start -> float32 [n, vocab]
    # prompt_logprobs: chunk start -> the host tensors of engine/prompt_logprobs.py's PromptChunk
    prompt_logprobs: dict[int, Any] = field(default_factory=dict)
    # What the last delta (engine/output.py take_delta) covered: output tokens, text pieces, the finish.
    reported_tokens: int = 0
    reported_parts: int = 0
    finish_reported: bool = False

    @property
    def text(self) -> str:
        """The final text so far (without any end held back as the possible start of a stop string)."""
        return "" if self.text_state is None else "".join(self.text_state.parts)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def needs_all_rows(self) -> bool:
        """Whether prompt log-probabilities are asked for and not all computed yet (engine/prompt_logprobs.py)."""
        if self.params.prompt_logprobs is None or self.scores:
            return False
        return sum(c.token_logprobs.numel() for c in self.prompt_logprobs.values()) < self.num_prompt_tokens - 1 + \
            len(self.lookahead)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed
