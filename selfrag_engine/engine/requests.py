"""Requests: their prompts checked and encoded, their size checked against the context and the pool, and
the table of live requests by id."""
from __future__ import annotations

import itertools
import operator
from typing import Iterable
from typing import Sequence as Seq

import numpy as np
import torch

from selfrag_engine.engine.sampling_inputs import check_servable
from selfrag_engine.engine.sampling_params import SamplingParams
from selfrag_engine.engine.sequence import Sequence
from selfrag_engine.engine.structured_output import Grammars, StructuredOutput
from selfrag_engine.errors import CacheCapacityError, ContextLengthError, RequestError
from selfrag_engine.tokenizer import Tokenizer


def _token_id(t: object) -> int:
    # operator.index takes ints of every kind (Python, numpy, integer tensors) and refuses floats; a bool is
    # an int to Python but never a token id.
    if isinstance(t, bool) or getattr(t, "dtype", None) in (torch.bool, np.bool_):
        raise RequestError(f"token ids must be integers, got {t!r}")
    try:
        return operator.index(t)
    except TypeError:
        raise RequestError(f"token ids must be integers, got {t!r}") from None


def token_ids(tokens: str | Seq[int], tokenizer: Tokenizer, vocab_size: int, add_bos: bool = True) -> list[int]:
    """A prompt or suffix as token ids: text is encoded (with BOS when add_bos), ids are checked."""
    if isinstance(tokens, str):
        return tokenizer.encode(tokens, add_bos=add_bos)
    if not isinstance(tokens, (Seq, torch.Tensor, np.ndarray)):
        raise RequestError(f"a prompt is text or a sequence of token ids, got {type(tokens).__name__}")
    ids = [_token_id(t) for t in tokens]
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"token id {bad[0]} is outside the vocabulary (size {vocab_size})")
    return ids


def _is_one_prompt(prompts: object) -> bool:
    if isinstance(prompts, str):
        return True
    if isinstance(prompts, (torch.Tensor, np.ndarray)):
        return prompts.ndim == 1
    return len(prompts) > 0 and not isinstance(prompts[0], (str, Seq, torch.Tensor, np.ndarray))


def batch_of(prompts: str | Seq[int] | Seq[str | Seq[int]],
             params: SamplingParams | Seq[SamplingParams] | None) -> tuple[list, list[SamplingParams]]:
    """`generate`'s arguments as one list of prompts and one of their params (a lone prompt, text or ids,
    is a batch of one; one SamplingParams serves every prompt)."""
    if _is_one_prompt(prompts):
        prompts = [prompts]
    params = SamplingParams() if params is None else params
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(params) != len(prompts):
        raise RequestError(f"{len(prompts)} prompts but {len(params)} sampling params")
    return list(prompts), params


class Requests:
    """The live requests by id, with what every request is checked against."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_model_len: int, pool_blocks: int,
                 block_size: int, seed: int):
        if tokenizer.vocab_size > vocab_size:
            raise RequestError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                               f"{vocab_size}")
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.pool_blocks = pool_blocks
        self.block_size = block_size
        self.seqs: dict[int, Sequence] = {}
        self._ids = itertools.count()
        self._seed_rng = torch.Generator().manual_seed(seed)
        self.grammars = Grammars(tokenizer, vocab_size)

    def prompt_ids(self, prompt: str | Seq[int]) -> list[int]:
        """A prompt's token ids: text is encoded with BOS, which alone is no prompt."""
        ids = token_ids(prompt, self.tokenizer, self.vocab_size)
        if len(ids) <= isinstance(prompt, str):
            raise RequestError("empty prompt")
        return ids

    def suffix_ids(self, suffix: str | Seq[int]) -> list[int]:
        """A forked branch's suffix: text is encoded without BOS."""
        return token_ids(suffix, self.tokenizer, self.vocab_size, add_bos=False)

    def check_fits(self, num_tokens: int, max_new_tokens: int, what: str) -> None:
        if num_tokens >= self.max_model_len:
            raise ContextLengthError(f"{what} has {num_tokens} tokens, which leaves no room to generate within the "
                                     f"model's context of {self.max_model_len} tokens")
        needed = min(num_tokens + max_new_tokens, self.max_model_len)
        capacity = self.pool_blocks * self.block_size
        if needed > capacity:
            raise CacheCapacityError(f"{what} of {num_tokens} tokens with max_tokens={max_new_tokens} needs "
                                     f"{needed} tokens of KV cache but the whole pool holds {capacity} "
                                     f"({self.pool_blocks} blocks of {self.block_size})")

    def reserve_id(self) -> int:
        """A request id no request has (itertools.count's next is atomic, so any thread may reserve one)."""
        return next(self._ids)

    def _take_id(self, request_id: int | None) -> int:
        if request_id is None:
            request_id = next(self._ids)
            while request_id in self.seqs:  # a caller may have picked it
                request_id = next(self._ids)
            return request_id
        if isinstance(request_id, bool) or not isinstance(request_id, int) or request_id < 0:
            raise RequestError(f"a request id is an integer >= 0, got {request_id!r}")
        if request_id in self.seqs:
            raise RequestError(f"request id {request_id} is already in use")
        return request_id

    def check_servable(self, params: SamplingParams) -> None:
        check_servable(params, self.vocab_size)

    def new(self, token_ids: list[int], params: SamplingParams, keep_cache: bool, scores: bool = False,
            request_id: int | None = None) -> Sequence:
        """A new request, in the table (the caller hands it to the scheduler)."""
        check_servable(params, self.vocab_size)
        if scores and len(token_ids) > self.max_model_len:
            raise ContextLengthError(f"{len(token_ids)} tokens exceed the model's context of {self.max_model_len}")
        self.check_fits(len(token_ids) - scores, params.max_tokens, "scored sequence" if scores else "prompt")
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,),
                                                                             generator=self._seed_rng))
        grammar = None
        if params.structured is not None and not scores:
            if not isinstance(params.structured, StructuredOutput):
                raise RequestError(f"structured must be a StructuredOutput, got {type(params.structured).__name__}")
            if params.ignore_eos:
                raise RequestError("ignore_eos cannot be combined with structured output: EOS is how a grammar ends")
            grammar = self.grammars.state(params.structured)
        seq = Sequence(self._take_id(request_id), token_ids, len(token_ids), params, seed, keep_cache, scores=scores,
                       grammar=grammar)
        self.seqs[seq.request_id] = seq
        return seq

    def branches(self, parent: Sequence, suffixes: Iterable[str | Seq[int]],
                 params: SamplingParams | Seq[SamplingParams], prefix_len: int | None,
                 keep_cache: bool, request_ids: Seq[int] | None = None) -> list[Sequence]:
        """New requests continuing parent's first prefix_len tokens (default: all) with their suffixes. Every
        branch is checked before any is made, so a bad one leaves no half-made siblings behind."""
        prefix_len = len(parent.token_ids) if prefix_len is None else prefix_len
        if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or not (
                parent.num_computed <= prefix_len <= len(parent.token_ids)):
            raise RequestError(f"prefix_len {prefix_len!r} must lie between the request's computed tokens "
                               f"({parent.num_computed}) and its length ({len(parent.token_ids)})")
        if isinstance(suffixes, str):
            raise RequestError("suffixes must be a list of suffixes (text or token ids), not one string")
        suffix_ids = [self.suffix_ids(s) for s in suffixes]
        params = [params] * len(suffix_ids) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(suffix_ids):
            raise RequestError(f"{len(suffix_ids)} suffixes but {len(params)} sampling params")
        for suffix, prm in zip(suffix_ids, params):
            check_servable(prm, self.vocab_size)
            if prm.prompt_logprobs is not None:
                raise RequestError("prompt_logprobs is not served on a forked branch (its prefix is the parent's "
                                   "cache, not computed again); ask for it on the parent's request")
            if prefix_len + len(suffix) == parent.num_computed:
                raise RequestError("a forked branch needs at least one token after the parent's computed prefix")
            self.check_fits(prefix_len + len(suffix), prm.max_tokens, "forked branch")
        if request_ids is None:
            request_ids = [None] * len(suffix_ids)
        elif len(request_ids) != len(suffix_ids) or len(set(request_ids)) != len(request_ids):
            raise RequestError(f"{len(suffix_ids)} suffixes need as many distinct request ids, got {request_ids!r}")
        for rid in request_ids:
            if rid is not None and rid in self.seqs:
                raise RequestError(f"request id {rid} is already in use")
        return [self.new(parent.token_ids[:prefix_len] + suffix, prm, keep_cache, request_id=rid)
                for suffix, prm, rid in zip(suffix_ids, params, request_ids)]

    def get(self, request_id: int) -> Sequence:
        if isinstance(request_id, bool) or not isinstance(request_id, int) or request_id not in self.seqs:
            raise RequestError(f"unknown request id {request_id!r}")
        return self.seqs[request_id]
