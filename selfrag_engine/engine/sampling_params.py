"""Per-request decoding parameters."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from selfrag_engine.engine.structured_output import StructuredOutput
from selfrag_engine.errors import RequestError

# The most top log-probabilities the fused sampling pass returns, and what the OpenAI-style API offers. A
# request may ask for more, up to the vocabulary: a device top-k then serves them (layers/sampler.py).
MAX_TOP_LOGPROBS = 20
# The sampler takes top_k as int32; a larger k keeps the whole vocabulary anyway.
MAX_TOP_K = 2**31 - 1


@dataclass
class SamplingParams:
    """How to decode one request.

    temperature 0 is greedy (ties to the lowest token id). top_k 0 disables top-k. `logprobs` asks for the
    top-n log-probabilities at every step (n >= 1, at most the vocabulary, checked when the request is made;
    n above MAX_TOP_LOGPROBS costs a device top-k and n floats per step on the host). All log-probabilities
    are of the raw logits at temperature 1 (full-vocabulary softmax), whatever the sampling temperature and
    truncation.
    `reflection` returns, at every step, the Self-RAG reflection-token probabilities normalized within their
    groups (retrieval, relevance, grounding, utility), computed in the sampling pass.
    `structured` holds the output to a JSON schema, any JSON object, a regex, a choice or a grammar
    (engine/structured_output.py; a dict of StructuredOutput's fields is taken too). The scores above stay those
    of the unmasked logits.
    """
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] | str | None = field(default_factory=list)  # None: no stop strings, as in vLLM
    stop_token_ids: list[int] | None = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    reflection: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True  # False leaves RequestOutput.text empty (token ids only; no stop strings)
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        # Every field is checked here, where the caller can still be told, rather than inside a later step
        # that would fail for every request sharing it. bool is refused wherever a number is meant (Python
        # counts True as 1).
        self.stop = _str_list("stop", self.stop)
        self.stop_token_ids = _id_list(self.stop_token_ids)
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature < math.inf:
            raise RequestError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not 0 <= self.top_k <= MAX_TOP_K:
            raise RequestError(f"top_k must be an integer from 0 (disabled) to {MAX_TOP_K}, got {self.top_k!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise RequestError(f"seed must be an integer or None, got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 1):
            raise RequestError(f"logprobs must be None or a count >= 1, got {self.logprobs!r} "
                               "(the chosen token's log-probability is always in RequestOutput.token_logprobs)")
        for name in ("ignore_eos", "reflection", "skip_special_tokens", "include_stop_str_in_output", "detokenize"):
            if not isinstance(getattr(self, name), bool):
                raise RequestError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.stop and not self.detokenize:
            raise RequestError("stop strings need detokenize=True")
        if isinstance(self.structured, dict):
            self.structured = StructuredOutput.from_dict(self.structured)
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise RequestError(f"structured must be a StructuredOutput or None, got {type(self.structured).__name__}")
        if self.structured is not None and self.ignore_eos:
            raise RequestError("ignore_eos cannot be combined with structured output: EOS is how a grammar ends")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _str_list(name: str, value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise RequestError(f"{name} must be a string or a list of strings, got {value!r}")
    if any(not s for s in value):
        raise RequestError(f"{name} strings must be non-empty")
    return list(value)


def _id_list(value: object) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise RequestError(f"stop_token_ids must be a list of token ids, got {value!r}")
    bad = [t for t in value if not _is_int(t) or t < 0]
    if bad:
        raise RequestError(f"stop_token_ids must be token ids (integers >= 0), got {bad[0]!r}")
    return list(value)
