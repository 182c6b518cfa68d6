"""The sampler's per-row inputs of a step, made from the sampling rows' requests, and the check, when a
request is made, that its parameters can become those inputs."""
from __future__ import annotations

import math

import torch

from selfrag_engine.backend import Backend
from selfrag_engine.engine.logits_processing import process_logits
from selfrag_engine.engine.sampling_params import SamplingParams
from selfrag_engine.engine.sequence import Sequence
from selfrag_engine.engine.structured_output import constrain
from selfrag_engine.engine.transfer import to_device
from selfrag_engine.errors import RequestError
from selfrag_engine.layers.sampler import ReflectionGroups, SamplerOutput, sample
from selfrag_engine.tokenizer import Tokenizer

_MASK64 = (1 << 64) - 1
_INT32_MAX = 2**31 - 1


def step_seed(seed: int, step: int) -> int:
    """A well-mixed non-negative int64 seed for one draw (splitmix64 of the request seed and the step), so
    a sequence's draws do not depend on batching or preemption."""
    z = (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def reflection_groups(tokenizer: Tokenizer) -> ReflectionGroups | None:
    """The Self-RAG reflection token groups of the tokenizer, None when it has no Self-RAG tokens."""
    try:
        ids = tokenizer.reflection_token_ids()
    except (ValueError, KeyError):
        return None
    return ReflectionGroups.from_token_ids(ids.groups())


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_servable(params: SamplingParams, vocab_size: int) -> None:
    """Refuses, when the request is made, parameters the sampler's tensors cannot carry, so that no step
    fails on them later (and stalls the requests batched with them)."""
    if not isinstance(params, SamplingParams):
        raise RequestError(f"sampling params must be SamplingParams, got {type(params).__name__}")
    if not _is_int(params.max_tokens) or params.max_tokens < 1:
        raise RequestError(f"max_tokens must be a positive integer, got {params.max_tokens!r}")
    for name in ("temperature", "top_p"):
        value = getattr(params, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise RequestError(f"{name} must be a finite number, got {value!r}")
    if not _is_int(params.top_k) or not 0 <= params.top_k <= _INT32_MAX:
        raise RequestError(f"top_k must be an integer in [0, {_INT32_MAX}] (0 disables it), got {params.top_k!r}")
    if params.logprobs is not None and (not _is_int(params.logprobs) or not 0 <= params.logprobs <= vocab_size):
        raise RequestError(f"logprobs must be an integer between 0 and the vocabulary size {vocab_size}, "
                           f"got {params.logprobs!r}")
    if params.seed is not None and not _is_int(params.seed):
        raise RequestError(f"seed must be an integer, got {params.seed!r}")
    if not isinstance(params.stop, list) or any(not isinstance(s, str) or not s for s in params.stop):
        raise RequestError(f"stop must be a list of non-empty strings, got {params.stop!r}")
    if any(not _is_int(t) or not 0 <= t < vocab_size for t in params.stop_token_ids):
        raise RequestError(f"stop_token_ids must be token ids of the vocabulary (size {vocab_size}), "
                           f"got {params.stop_token_ids!r}")
    bad = [t for t in (params.logit_bias or ()) if not _is_int(t) or not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"logit_bias keys must be token ids of the vocabulary (size {vocab_size}), "
                           f"got {bad[0]!r}")
    if params.prompt_logprobs is not None and (not _is_int(params.prompt_logprobs)
                                               or not 0 <= params.prompt_logprobs <= vocab_size):
        raise RequestError(f"prompt_logprobs must be an integer between 0 and the vocabulary size {vocab_size}, "
                           f"got {params.prompt_logprobs!r}")


def sample_rows(logits: torch.Tensor, seqs: list[Sequence], groups: ReflectionGroups | None, backend: Backend,
                ahead: bool = False, offsets: list[int] | None = None) -> SamplerOutput:
    """Samples one token per row of logits, row i for seqs[i]. ahead: the rows' previous tokens are not
    appended yet, so each samples the token after the next. offsets[i]: how many tokens past the sequence's
    end row i samples (the positions of a verify step; a sequence then fills several rows)."""
    offsets = offsets or [int(ahead)] * len(seqs)
    dev = logits.device
    params = [s.params for s in seqs]
    top_n = max((p.logprobs or 0) for p in params)
    want_groups = groups is not None and any(p.reflection for p in params)
    temperature = to_device([p.temperature for p in params], torch.float32, dev)
    top_p = to_device([p.top_p for p in params], torch.float32, dev)
    top_k = to_device([p.top_k for p in params], torch.int32, dev)
    seeds = to_device([step_seed(s.seed, s.num_output_tokens + o) for s, o in zip(seqs, offsets)], torch.int64, dev)
    # Drawn from the processed logits (penalties, bias, min-p, logits processors); scored on the raw ones.
    processed = process_logits(logits, seqs, backend, offsets)
    out = sample(logits if processed is None else processed, temperature=temperature, top_p=top_p, top_k=top_k,
                 seeds=seeds, groups=groups if want_groups else None, top_n=top_n, backend=backend,
                 raw_logits=None if processed is None else logits)
    # Structured output: the rows with a grammar redrawn from their masked (processed) logits, scored on the raw
    # ones (no drafts, none ahead).
    return constrain(logits, [s.grammar for s in seqs], out, temperature, top_p, top_k, seeds, backend,
                     draw=processed)
