"""Self-RAG's critique scores from reflection-token probabilities (paper, Appendix A.3), and the knobs that
switch each rule between the paper and the released reference scripts.

In the paper's rules every probability is a full-vocabulary softmax value of the raw logits at the position
named; each score is a ratio within one group, so probabilities renormalized within their group (what the
sampler returns) give the same value. The reference scripts read the same positions but take the values from
vLLM's top-n log-probability dicts, where a token outside the top n counts as log-probability -100; see
`ScoringConfig.released`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Sequence

from selfrag_engine.errors import RequestError

UTILITY_WEIGHTS = (-1.0, -0.5, 0.0, 0.5, 1.0)
GATES = ("prob", "logprob")
MISSING_RULES = ("exp", "raw")
UTILITY_GROUPS = ("utility", "grounding")
FORMS = ("short", "long")
# What the reference scripts substitute for the log-probability of a token missing from the top-n dict.
MISSING_LOGPROB = -100.0
# The top-n the reference scripts ask vLLM for when they score retrieval branches.
RELEASED_TOP_LOGPROBS = {"short": 5000, "long": 32000}


@dataclass(frozen=True)
class ScoringConfig:
    """Every knob of the retrieval decision and the critique, settable field by field. The defaults are the
    paper's; `ScoringConfig.paper()` and `ScoringConfig.released(form=...)` are the two presets.

    threshold: retrieve when the gate value exceeds it. None: in the paper flavour the model's own first token
        decides ([Retrieval] or not); the released short form fails without one (reported as an error).
    gate: "prob" is p(Ret) / (p(Ret) + p(NoRet)); "logprob" divides the log-probabilities instead, as the
        released short-form script does.
    use_seqscore: add exp(mean token log-probability) to a branch's final score.
    top_logprobs: None reads exact probabilities. n reads exp(log-probability) for tokens in the step's top n
        (the token generated there always counts) and MISSING_LOGPROB for the others, as the scripts do.
    missing_relevance: how a relevance token outside the top n counts: "exp" is exp(-100); "raw" is -100 itself
        (the long-form script), which can make the relevance ratio negative.
    utility_group: the tokens read at the first utility token: "utility", or "grounding" as the long-form
        script does, which leaves three values where five are needed, so its utility is always 0.
    """
    threshold: float | None = 0.2
    w_rel: float = 1.0
    w_sup: float = 1.0
    w_use: float = 0.5
    use_seqscore: bool = False
    gate: str = "prob"
    top_logprobs: int | None = None
    missing_relevance: str = "exp"
    utility_group: str = "utility"

    def __post_init__(self) -> None:
        if self.gate not in GATES:
            raise RequestError(f"gate must be one of {GATES}, got {self.gate!r}")
        if self.missing_relevance not in MISSING_RULES:
            raise RequestError(f"missing_relevance must be one of {MISSING_RULES}, got {self.missing_relevance!r}")
        if self.utility_group not in UTILITY_GROUPS:
            raise RequestError(f"utility_group must be one of {UTILITY_GROUPS}, got {self.utility_group!r}")
        if self.threshold is not None and not _is_real(self.threshold):
            raise RequestError(f"threshold must be a finite number or None, got {self.threshold!r}")
        for name in ("w_rel", "w_sup", "w_use"):
            if not _is_real(getattr(self, name)):
                raise RequestError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if self.top_logprobs is not None and (isinstance(self.top_logprobs, bool)
                                              or not isinstance(self.top_logprobs, int) or self.top_logprobs < 1):
            raise RequestError(f"top_logprobs must be a positive integer or None, got {self.top_logprobs!r}")
        if not isinstance(self.use_seqscore, bool):
            raise RequestError(f"use_seqscore must be a bool, got {self.use_seqscore!r}")

    @classmethod
    def paper(cls, **overrides: Any) -> "ScoringConfig":
        """The paper's rules: exact probabilities, the probability gate, weights 1.0 / 1.0 / 0.5."""
        return cls(**overrides)

    @classmethod
    def released(cls, form: str = "short", **overrides: Any) -> "ScoringConfig":
        """The reference scripts' rules. form="short" (run_short_form.py): the log-probability gate, top-5000
        reads with exp(-100) for missing tokens, w_use 1.0 (its --w_use default). form="long"
        (run_long_form_static.py): the probability gate, top-32000 reads, a missing relevance token counted
        as -100 raw, the utility read off the grounding ids, w_use 0.5. The long-form script never passes
        use_seqscore to its scoring, so the long preset ignores it (it stays False)."""
        if form not in FORMS:
            raise RequestError(f"form must be one of {FORMS}, got {form!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown ScoringConfig field(s): {', '.join(unknown)}")
        if form == "short":
            base: dict[str, Any] = dict(gate="logprob", w_use=1.0, top_logprobs=RELEASED_TOP_LOGPROBS["short"])
        else:
            overrides = {k: v for k, v in overrides.items() if k != "use_seqscore"}
            base = dict(gate="prob", w_use=0.5, top_logprobs=RELEASED_TOP_LOGPROBS["long"],
                        missing_relevance="raw", utility_group="grounding", use_seqscore=False)
        return cls(**{**base, **overrides})


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def retrieval_gate(p_ret: float, p_noret: float, gate: str = "prob") -> float:
    """The value compared with the threshold. With gate="logprob", p_* are log-probabilities divided as the
    reference short-form script does (which inverts the intent: it is high when p(Ret) is low)."""
    if gate == "logprob":
        total = p_ret + p_noret
        return p_ret / total if total != 0 else 0.0
    total = p_ret + p_noret
    return p_ret / total if total > 0 else 0.0


def segment_gate(p_ret: float, p_noret: float, p_cont: float) -> float:
    """Inside a long-form segment: (p(Ret) + p(Continue)) / (p(Ret) + p(NoRet)), the value the reference
    compares with the threshold (0 when the denominator is 0, as it does)."""
    total = p_ret + p_noret
    return (p_ret + p_cont) / total if total != 0 else 0.0


def relevance_score(p_rel: float, p_irrel: float) -> float:
    # != 0 rather than > 0: the long-form script's raw -100 makes the sum negative, and the ratio stands.
    total = p_rel + p_irrel
    return p_rel / total if total != 0 else 0.0


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


def truncated_values(logprobs: Sequence[float], present: Sequence[bool], missing: str = "exp") -> list[float]:
    """The reference scripts' reading of a group: exp(logprob) for a token in the top-n dict; for one outside
    it, exp(MISSING_LOGPROB) ("exp") or MISSING_LOGPROB itself ("raw")."""
    if len(logprobs) != len(present):
        raise ValueError(f"{len(logprobs)} log-probabilities but {len(present)} presence flags")
    if missing not in MISSING_RULES:
        raise ValueError(f"missing must be one of {MISSING_RULES}, got {missing!r}")
    absent = math.exp(MISSING_LOGPROB) if missing == "exp" else MISSING_LOGPROB
    return [math.exp(lp) if here else absent for lp, here in zip(logprobs, present)]


def final_score(rel: float, grd: float, util: float, seq: float | None, cfg: ScoringConfig) -> float:
    score = cfg.w_rel * rel + cfg.w_sup * grd + cfg.w_use * util
    return score + seq if cfg.use_seqscore and seq is not None else score


# ---- flavours -------------------------------------------------------------------------------------------

COMPATS = ("paper", "released")
COMPAT_ALIASES = {"official": "released"}


def normalize_compat(compat: str) -> str:
    """"paper" or "released" ("official" is another name for "released")."""
    compat = COMPAT_ALIASES.get(compat, compat)
    if compat not in COMPATS:
        raise RequestError(f"compat must be one of {COMPATS} (or {tuple(COMPAT_ALIASES)}), got {compat!r}")
    return compat
