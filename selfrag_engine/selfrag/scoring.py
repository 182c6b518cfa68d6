"""Self-RAG's critique scores from reflection-token probabilities (paper, Appendix A.3).

All probabilities are full-vocabulary softmax values of the raw logits at the position named. Each score
is a ratio within one group, so probabilities renormalized within their group give the same value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

UTILITY_WEIGHTS = (-1.0, -0.5, 0.0, 0.5, 1.0)


@dataclass(frozen=True)
class ScoringConfig:
    """The knobs of the critique. Defaults follow the paper."""
    threshold: float = 0.2       # retrieve when the gate value exceeds it
    w_rel: float = 1.0
    w_sup: float = 1.0
    w_use: float = 0.5
    use_seqscore: bool = False   # add exp(mean token logprob) to the final score
    gate: str = "prob"           # "prob": p(Ret)/(p(Ret)+p(NoRet)); "logprob": the reference script's ratio of logprobs

    def __post_init__(self) -> None:
        if self.gate not in ("prob", "logprob"):
            raise ValueError(f"gate must be 'prob' or 'logprob', got {self.gate!r}")


def retrieval_gate(p_ret: float, p_noret: float, gate: str = "prob") -> float:
    """The value compared with the threshold. With gate="logprob", p_* are log-probabilities divided as the
    reference short-form script does (which inverts the intent: it is high when p(Ret) is low)."""
    if gate == "logprob":
        return p_ret / (p_ret + p_noret)
    total = p_ret + p_noret
    return p_ret / total if total > 0 else 0.0


def relevance_score(p_rel: float, p_irrel: float) -> float:
    total = p_rel + p_irrel
    return p_rel / total if total > 0 else 0.0


def grounding_score(p_full: float, p_partial: float, p_none: float) -> float:
    total = p_full + p_partial + p_none
    return (p_full + 0.5 * p_partial) / total if total > 0 else 0.0


def utility_score(probs: Sequence[float]) -> float:
    """sum_k w_k p_k / sum_k p_k over [Utility:1]..[Utility:5] with w = (-1, -0.5, 0, 0.5, 1)."""
    if len(probs) != len(UTILITY_WEIGHTS):
        raise ValueError(f"utility needs {len(UTILITY_WEIGHTS)} probabilities, got {len(probs)}")
    total = sum(probs)
    return sum(w * p for w, p in zip(UTILITY_WEIGHTS, probs)) / total if total > 0 else 0.0


def sequence_score(cumulative_logprob: float, num_tokens: int) -> float:
    """exp(mean log-probability of the generated tokens, EOS included)."""
    return math.exp(cumulative_logprob / max(num_tokens, 1))


def final_score(rel: float, grd: float, util: float, seq: float | None, cfg: ScoringConfig) -> float:
    score = cfg.w_rel * rel + cfg.w_sup * grd + cfg.w_use * util
    return score + seq if cfg.use_seqscore and seq is not None else score
