"""Per-request decoding parameters."""
from __future__ import annotations

from dataclasses import dataclass, field

from selfrag_engine.errors import RequestError

MAX_TOP_LOGPROBS = 20


@dataclass
class SamplingParams:
    """How to decode one request.

    temperature 0 is greedy (ties to the lowest token id). top_k 0 disables top-k. `logprobs` asks for the
    top-n log-probabilities at every step (n <= 20). All log-probabilities are of the raw logits at
    temperature 1 (full-vocabulary softmax), whatever the sampling temperature and truncation.
    `reflection` returns, at every step, the Self-RAG reflection-token probabilities normalized within their
    groups (retrieval, relevance, grounding, utility), computed in the sampling pass.
    """
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    reflection: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True  # False leaves RequestOutput.text empty (token ids only; no stop strings)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not self.temperature >= 0.0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError(f"top_k must be a non-negative integer (0 disables it), got {self.top_k!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.logprobs!r}")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must be non-empty")
        if self.stop and not self.detokenize:
            raise RequestError("stop strings need detokenize=True")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
