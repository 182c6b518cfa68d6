"""Per-request decoding parameters."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from selfrag_engine.engine.sampling_defaults import default
from selfrag_engine.engine.structured_output import StructuredOutput
from selfrag_engine.errors import RequestError

# The most top log-probabilities the fused sampling pass returns, and what the OpenAI-style API offers. A
# request may ask for more, up to the vocabulary: a device top-k then serves them (layers/sampler.py).
MAX_TOP_LOGPROBS = 20
# The sampler takes top_k as int32; a larger k keeps the whole vocabulary anyway.
MAX_TOP_K = 2**31 - 1
# The most sequences one request may sample (n, best_of): each is a row of every decode step.
MAX_SAMPLES = 128


@dataclass
class SamplingParams:
    """How to decode one request. The defaults are vLLM's, from one table (engine/sampling_defaults.py).

    temperature 0 is greedy (ties to the lowest token id). top_k 0 disables top-k. `logprobs` asks for the
    top-n log-probabilities at every step (n >= 1, at most the vocabulary, checked when the request is made;
    n above MAX_TOP_LOGPROBS costs a device top-k and n floats per step on the host). All log-probabilities
    are of the raw logits at temperature 1 (full-vocabulary softmax), whatever the sampling temperature and
    truncation.
    `reflection` returns, at every step, the Self-RAG reflection-token probabilities normalized within their
    groups (retrieval, relevance, grounding, utility), computed in the sampling pass.

    Logit processing, with vLLM's names and meanings, applied on the device to the rows' logits before the
    sampler, in this order (engine/logits_processing.py):
    - `logits_processors`: callables `f(logits, output_token_ids) -> logits`, logits float32 [R, V] of the R
      rows of the step that carry f, output_token_ids their generated tokens so far (list of R lists); each
      distinct callable is called once per step over all its rows (engine/logits_processing.py, LogitsProcessor).
    - `logit_bias`: {token id: bias in [-100, 100]} added to the logits (OpenAI's / vLLM's).
    - `repetition_penalty` (> 0, 1 is off): a logit of a token seen in the prompt or the output is divided by
      it when positive and multiplied by it when negative (transformers' / vLLM's formula).
    - `frequency_penalty`, `presence_penalty` (in [-2, 2], 0 is off): OpenAI's formula over the generated
      tokens, logit -= frequency_penalty * count + presence_penalty * (count > 0).
    - `min_p` (in [0, 1], 0 is off): tokens whose probability at the sampling temperature is below min_p times
      the most likely token's are dropped (before top-k and top-p, as vLLM does; no effect on greedy rows).
    Every log-probability the engine returns (token, top-n, prompt, reflection) stays that of the raw model
    logits, before any of these and before temperature (vLLM v1's default, `logprobs_mode="raw_logprobs"`).

    `n` samples are returned per prompt (RequestOutput.outputs), drawn from `best_of` (default n) sampled
    sequences, the n with the highest cumulative log-probability kept; the prompt is prefilled once and the
    samples fork off its KV blocks. Served by `Engine.generate` (and `add_request`), see RequestOutput.
    `prompt_logprobs` (vLLM's): 0 returns each prompt token's log-probability given the tokens before it, k > 0
    the top-k too (RequestOutput.prompt_logprobs); such a request computes its whole prompt (it does not read
    the prefix cache, as in vLLM).
    `structured` holds the output to a JSON schema, any JSON object, a regex, a choice or a grammar
    (engine/structured_output.py; a dict of StructuredOutput's fields is taken too). The scores above stay those
    of the unmasked logits.
    """
    max_tokens: int = default("max_tokens")
    temperature: float = default("temperature")
    top_p: float = default("top_p")
    top_k: int = default("top_k")
    seed: int | None = default("seed")
    stop: list[str] | str | None = field(default_factory=list)  # None: no stop strings, as in vLLM
    stop_token_ids: list[int] | None = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    reflection: bool = False
    skip_special_tokens: bool = default("skip_special_tokens")
    include_stop_str_in_output: bool = False
    detokenize: bool = True  # False leaves RequestOutput.text empty (token ids only; no stop strings)
    presence_penalty: float = default("presence_penalty")
    frequency_penalty: float = default("frequency_penalty")
    repetition_penalty: float = default("repetition_penalty")
    min_p: float = default("min_p")
    logit_bias: dict[int, float] | None = None
    logits_processors: list | None = None
    n: int = default("n")
    best_of: int | None = None
    prompt_logprobs: int | None = None
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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise RequestError(f"{name} must be a number in [-2, 2], got {value!r}")
        if not _is_number(self.repetition_penalty) or not 0.0 < self.repetition_penalty < math.inf:
            raise RequestError(f"repetition_penalty must be a finite number > 0 (1 is off), "
                               f"got {self.repetition_penalty!r}")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p!r}")
        self.logit_bias = _logit_bias(self.logit_bias)
        self.logits_processors = _processors(self.logits_processors)
        if not _is_int(self.n) or self.n < 1:
            raise RequestError(f"n must be a positive integer, got {self.n!r}")
        if self.best_of is not None:
            if not _is_int(self.best_of) or self.best_of < 1:
                raise RequestError(f"best_of must be a positive integer or None, got {self.best_of!r}")
            if self.best_of < self.n:
                raise RequestError(f"best_of must be >= n, got best_of={self.best_of} and n={self.n}")
        if self.num_samples > MAX_SAMPLES:
            raise RequestError(f"best_of (or n) is at most {MAX_SAMPLES}, got {self.num_samples}")
        if self.num_samples > 1 and self.greedy:
            # vLLM refuses this too: every greedy sample would be the same sequence.
            raise RequestError(f"n > 1 or best_of > 1 needs temperature > 0 (greedy samples are all the same), "
                               f"got n={self.n}, best_of={self.best_of}")
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs) or self.prompt_logprobs < 0):
            raise RequestError(f"prompt_logprobs must be None or a count >= 0 (0: the prompt tokens' own "
                               f"log-probabilities), got {self.prompt_logprobs!r}")
        if isinstance(self.structured, dict):
            self.structured = StructuredOutput.from_dict(self.structured)
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise RequestError(f"structured must be a StructuredOutput or None, got {type(self.structured).__name__}")
        if self.structured is not None and self.ignore_eos:
            raise RequestError("ignore_eos cannot be combined with structured output: EOS is how a grammar ends")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def num_samples(self) -> int:
        """Sequences sampled for the request: best_of, or n."""
        return self.n if self.best_of is None else self.best_of

    @property
    def processes_logits(self) -> bool:
        """Whether the rows' logits are changed before sampling (engine/logits_processing.py)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.min_p or self.logit_bias or self.logits_processors)

    @property
    def reads_history(self) -> bool:
        """Whether the processing of a step's logits reads the tokens generated so far (penalties, processors),
        so a step cannot be computed before the previous one's token is known on the host."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logits_processors)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _logit_bias(value: object) -> dict[int, float] | None:
    # Token ids are checked against the vocabulary when the request reaches an engine (sampling_inputs.py).
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError(f"logit_bias must be a dict of token id to bias, got {value!r}")
    out = {}
    for t, b in value.items():
        if not _is_int(t) or t < 0:
            raise RequestError(f"logit_bias keys must be token ids (integers >= 0), got {t!r}")
        if not _is_number(b) or not -100.0 <= b <= 100.0:
            raise RequestError(f"logit_bias values must be numbers in [-100, 100], got {b!r} for token {t}")
        out[t] = float(b)
    return out or None


def _processors(value: object) -> list | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(callable(f) for f in value):
        raise RequestError(f"logits_processors must be a list of callables f(logits, output_token_ids) -> "
                           f"logits, got {value!r}")
    return list(value) or None


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
