"""Reading Self-RAG's critique off decoded tokens: which positions are read, what the probabilities there are
under a ScoringConfig's rules, and the resulting scores. Shared by the short and the long form.

The sampler reports, at every generated step, the reflection groups' probabilities (normalized within each
group) and their full-vocabulary log-probabilities, plus the top-n log-probabilities when asked. The paper's
rules read the first. The released scripts' rules (`ScoringConfig.top_logprobs`) need to know whether a token
is among the step's top n: the generated token always is; the sampler's top-k (k = min(n, 20)) settles the
tokens it holds, and with n <= 20 every token; one with probability >= 1/n is in (fewer than n tokens can be
more likely); for the rest, one scoring pass over the sequence gives its exact rank. That pass runs only when
a truncated read meets such a token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from selfrag_engine.engine.llm_engine import RequestOutput
from selfrag_engine.engine.sampling_params import MAX_TOP_LOGPROBS
from selfrag_engine.layers.sampler import ReflectionGroups
from selfrag_engine.selfrag.prompts import GROUPS
from selfrag_engine.selfrag.scoring import (
    ScoringConfig,
    final_score,
    grounding_score,
    relevance_score,
    sequence_score,
    truncated_values,
    utility_score,
)


@dataclass
class Decoded:
    """The generated tokens of one branch or segment and what the sampler reported at each step. A segment
    decoded in several pieces (the long form resumes after a retrieval token it decides to pass) is one
    Decoded: `extend` appends the later pieces."""
    context_ids: list[int]                   # the tokens before the first generated one
    token_ids: list[int]
    token_logprobs: list[float]
    probs: torch.Tensor                      # [steps, G] normalized within each reflection group
    logprobs: torch.Tensor                   # [steps, G] full-vocabulary log-probabilities
    top: list[dict[int, float]] | None       # per step: the top-k log-probabilities and the generated token
    groups: ReflectionGroups
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @classmethod
    def from_output(cls, out: RequestOutput) -> "Decoded":
        if out.reflection_probs is None or out.reflection_groups is None:
            raise ValueError("the output carries no reflection probabilities (decode with reflection=True)")
        return cls(list(out.prompt_token_ids), list(out.token_ids), list(out.token_logprobs),
                   out.reflection_probs, out.reflection_logprobs, list(out.logprobs) if out.logprobs else None,
                   out.reflection_groups, out.finish_reason, out.stop_reason)

    def extend(self, out: RequestOutput) -> None:
        """Appends a piece that continued this one (its prompt is this one's context and tokens)."""
        if list(out.prompt_token_ids) != self.context_ids + self.token_ids:
            raise ValueError("the piece does not continue this sequence")
        piece = Decoded.from_output(out)
        self.token_ids += piece.token_ids
        self.token_logprobs += piece.token_logprobs
        self.probs = torch.cat([self.probs, piece.probs])
        self.logprobs = torch.cat([self.logprobs, piece.logprobs])
        if self.top is not None and piece.top is not None:
            self.top += piece.top
        self.finish_reason, self.stop_reason = piece.finish_reason, piece.stop_reason

    @property
    def cumulative_logprob(self) -> float:
        return sum(self.token_logprobs)

    def first(self, token_ids: tuple[int, ...]) -> int | None:
        """The first step whose generated token is one of token_ids."""
        wanted = set(token_ids)
        return next((s for s, t in enumerate(self.token_ids) if t in wanted), None)


def top_k_for(cfg: ScoringConfig, vocab: int) -> int | None:
    """The top-k log-probabilities to ask the sampler for, so that truncated reads rarely need a rank pass."""
    if cfg.top_logprobs is None or cfg.top_logprobs >= vocab:
        return None
    return min(cfg.top_logprobs, MAX_TOP_LOGPROBS)


class Reader:
    """Reads groups of a Decoded under a ScoringConfig. `score_fn(ids) -> logits [len, vocab]` (the engine's
    `score`) serves the rank pass when it is needed."""

    def __init__(self, cfg: ScoringConfig, vocab: int | None = None,
                 score_fn: Callable[[list[int]], torch.Tensor] | None = None):
        self.cfg = cfg
        self.vocab = vocab
        self.score_fn = score_fn
        self._logits: dict[tuple[int, ...], torch.Tensor] = {}
        self.rank_passes = 0

    def _row(self, d: Decoded, step: int) -> torch.Tensor:
        # Row j of the logits predicts token j + 1: the context and every generated token but the last.
        ids = tuple(d.context_ids + d.token_ids[:-1])
        if ids not in self._logits:
            if self.score_fn is None:
                raise ValueError("a truncated read needs a token's rank and no scoring pass is available")
            # One sequence at a time is read, so only the latest pass is kept (a 7B pass is [len, 32016]).
            self._logits = {ids: self.score_fn(list(ids))}
            self.rank_passes += 1
        return self._logits[ids][len(d.context_ids) + step - 1]

    def present(self, d: Decoded, step: int, token: int, logprob: float) -> bool:
        """Whether `token` is in the top-n dict the reference scripts would see at `step`."""
        n = self.cfg.top_logprobs
        if n is None or (self.vocab is not None and n >= self.vocab) or token == d.token_ids[step]:
            return True
        top = d.top[step] if d.top is not None else None
        if top is not None:
            # The dict lists the sampler's top-k in rank order, then the generated token if it was not among
            # them; k is min(n, MAX_TOP_LOGPROBS) (`top_k_for`). With n within k the dict settles every token;
            # beyond it, only the tokens it holds.
            keys = list(top)
            if n < len(keys):
                return token in keys[:n]
            if token in top:
                return True
            if n <= MAX_TOP_LOGPROBS:
                return False
        if logprob >= -math.log(n):
            return True
        row = self._row(d, step)
        return int((row > row[token]).sum()) < n

    def group(self, d: Decoded, step: int, name: str, missing: str = "exp") -> dict[str, float]:
        """The values of group `name` at `step`, keyed by token string."""
        span = d.groups.span(name)
        if self.cfg.top_logprobs is None:
            return dict(zip(GROUPS[name], d.probs[step, span].tolist()))
        ids = d.groups.ids[d.groups.names.index(name)]
        lps = d.logprobs[step, span].tolist()
        here = [self.present(d, step, t, lp) for t, lp in zip(ids, lps)]
        return dict(zip(GROUPS[name], truncated_values(lps, here, missing)))

    def full_logprobs(self, d: Decoded, step: int, name: str) -> dict[str, float]:
        """Full-vocabulary log-probabilities of group `name` at `step` (exact: the gates read these)."""
        return dict(zip(GROUPS[name], d.logprobs[step, d.groups.span(name)].tolist()))


@dataclass
class Critique:
    relevance: float
    grounding: float
    utility: float
    seq_score: float
    final: float
    probs: dict[str, dict[str, float]] = field(default_factory=dict)  # values read, by group and token
    steps: dict[str, int] = field(default_factory=dict)               # the step each group was read at


def critique(d: Decoded, reader: Reader, ids: dict[str, tuple[int, ...]]) -> Critique:
    """Relevance at step 0, grounding at the first grounding token, utility at the first utility token (each 0
    when that token never comes), the sequence score over every generated token, and the weighted sum."""
    cfg = reader.cfg
    probs: dict[str, dict[str, float]] = {}
    steps: dict[str, int] = {}
    rel = grd = util = 0.0
    if d.token_ids:
        probs["relevance"] = reader.group(d, 0, "relevance", cfg.missing_relevance)
        steps["relevance"] = 0
        rel = relevance_score(*probs["relevance"].values())
    step = d.first(ids["grounding"])
    if step is not None:
        probs["grounding"] = reader.group(d, step, "grounding")
        steps["grounding"] = step
        grd = grounding_score(*probs["grounding"].values())
    step = d.first(ids["utility"])
    if step is not None:
        read = reader.group(d, step, cfg.utility_group)
        probs["utility"] = read
        steps["utility"] = step
        # Read off the grounding ids there are three values where five are needed: the script scores 0.
        util = utility_score(list(read.values())) if cfg.utility_group == "utility" else 0.0
    seq = sequence_score(d.cumulative_logprob, len(d.token_ids))
    return Critique(rel, grd, util, seq, final_score(rel, grd, util, seq, cfg), probs, steps)
