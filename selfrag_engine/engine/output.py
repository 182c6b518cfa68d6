"""The output processor: a sampled token appended to its request (log-probabilities, reflection probabilities),
its text grown incrementally, the stop conditions (EOS, stop tokens, stop strings, length), and what a caller
reads: a `Delta` per request per step (what the step added) and the `RequestOutput` (everything so far).

Text is detokenized one token at a time (`IncrementalDetokenizer`: vLLM's text, the first word's leading space
kept, a character split over byte pieces emitted once whole) and passed through the request's stop strings,
which hold back the end that could still start one. So the deltas of a request, joined, are its final text,
character for character, and no delta is ever taken back. Per token the work is bounded (a window of a few
tokens, a held end shorter than the longest stop string), whatever the length of the answer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from selfrag_engine.detokenizer import IncrementalDetokenizer
from selfrag_engine.engine.prompt_logprobs import entries
from selfrag_engine.engine.sequence import Sequence
from selfrag_engine.engine.stop_strings import StopStrings
from selfrag_engine.layers.sampler import ReflectionGroups, SamplerOutput
from selfrag_engine.tokenizer import Tokenizer


@dataclass
class CompletionOutput:
    """One sample of a request (vLLM's CompletionOutput): RequestOutput.outputs lists n of them."""
    index: int  # its place in RequestOutput.outputs (for best_of > n: its rank by cumulative log-probability)
    text: str
    token_ids: list[int]
    cumulative_logprob: float
    token_logprobs: list[float]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    stop_reason: str | int | None


@dataclass
class RequestOutput:
    """What a request produced so far. The flat fields (token_ids, text, finish_reason, logprobs, ...) are those of
    its first sample; `outputs` lists all n samples (vLLM's shape), one for a request with n = 1. With n > 1
    the samples are those of `best_of` (default n) sequences forked off the prompt's cache: in their order
    when best_of is n, else the n with the highest cumulative log-probability, best first (vLLM's ranking)."""
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop" (EOS, stop string or stop token), "length", or "abort" (released early)
    stop_reason: str | int | None  # the stop string or stop token id that ended it, None for EOS
    cumulative_logprob: float
    token_logprobs: list[float]  # log-probability of each generated token (temperature 1)
    logprobs: list[dict[int, float]] | None  # per step, the top-n and the chosen token, when asked
    reflection_probs: torch.Tensor | None  # [steps, G] group-normalized reflection probabilities
    reflection_logprobs: torch.Tensor | None  # [steps, G] full-vocabulary log-probabilities
    reflection_groups: ReflectionGroups | None
    # vLLM's shape: None for the first prompt token, then per prompt token {its id and the top-k ids: logprob}
    prompt_logprobs: list[dict[int, float] | None] | None = None
    outputs: list[CompletionOutput] = field(default_factory=list)

    def completion(self, index: int = 0) -> CompletionOutput:
        return CompletionOutput(index, self.text, self.token_ids, self.cumulative_logprob, self.token_logprobs,
                                self.logprobs, self.finish_reason, self.stop_reason)


@dataclass
class Delta:
    """What one step added to a request: its new tokens (with their log-probabilities), the text they made final,
    and, on the request's last delta, why it finished. A request's deltas, joined, are its output."""
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # set on the last delta only
    stop_reason: str | int | None = None
    request_id: int = -1
    token_logprobs: list[float] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None  # per new token, the top-n and the chosen token, when asked
    index: int = 0  # which sample of the request (n, best_of > 1); its finish is on the request's last delta

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class TextState:
    """A request's text as it grows: the detokenizer, its stop strings and the final pieces so far."""
    detok: IncrementalDetokenizer
    stops: StopStrings | None
    parts: list[str] = field(default_factory=list)

    def snapshot(self) -> tuple:
        return self.detok.snapshot(), None if self.stops is None else self.stops.held, len(self.parts)

    def restore(self, state: tuple) -> None:
        detok, held, n = state
        self.detok.restore(detok)
        if self.stops is not None:
            self.stops.held = held
        del self.parts[n:]


def text_state(seq: Sequence, tokenizer: Tokenizer) -> TextState:
    """The request's text state, made at its first token: the prompt's last tokens are the decoding context."""
    if seq.text_state is None:
        p = seq.params
        seq.text_state = TextState(
            IncrementalDetokenizer(tokenizer, seq.token_ids[:seq.num_prompt_tokens], p.skip_special_tokens),
            StopStrings(p.stop, p.include_stop_str_in_output) if p.stop else None)
    return seq.text_state


def append_token(seq: Sequence, out: SamplerOutput, row: int, token: int, lp: float, tokenizer: Tokenizer,
                 max_model_len: int) -> bool:
    """Appends the token sampled in `out`'s row for seq; returns whether the request has finished (its
    finish_reason and stop_reason then set)."""
    p = seq.params
    seq.token_ids.append(token)
    seq.token_logprobs.append(lp)
    seq.cumulative_logprob += lp
    if p.logprobs is not None:
        top = {}
        if p.logprobs:
            top = {int(t): float(v) for t, v in zip(out.topn_ids[row, :p.logprobs].tolist(),
                                                   out.topn_logprobs[row, :p.logprobs].tolist())}
        top[token] = lp
        seq.top_logprobs.append(top)
    if p.reflection and out.group_probs is not None:
        seq.reflection.append(out.group_probs[row])
        seq.reflection_logprobs.append(out.group_logprobs[row])

    reason = None
    if seq.grammar is not None and not seq.grammar.accept(token):
        reason = ("abort", "grammar")  # no allowed token had a finite logit: the request cannot go on
    state = text_state(seq, tokenizer) if p.detokenize else None
    if state is not None:
        piece = state.detok.add(token)
        if state.stops is not None:
            piece, hit = state.stops.feed(piece)
            if hit is not None and reason is None:
                reason = ("stop", hit)
        if piece:
            state.parts.append(piece)
    if reason is None:
        if token == tokenizer.eos_id and not p.ignore_eos:
            reason = ("stop", None)
        elif token in p.stop_token_ids:
            reason = ("stop", token)
        elif seq.num_output_tokens >= p.max_tokens or len(seq.token_ids) >= max_model_len:
            reason = ("length", None)
    if reason is None:
        return False
    seq.finish_reason, seq.stop_reason = reason
    if state is not None and state.stops is not None and not isinstance(reason[1], str):
        held = state.stops.flush()  # not a stop string after all: the answer ends with it
        if held:
            state.parts.append(held)
    return True


def take_delta(seq: Sequence) -> Delta | None:
    """What seq gained since its last delta (None if nothing: no token, no text, no news of its finish)."""
    n = seq.num_output_tokens
    parts = seq.text_state.parts if seq.text_state is not None else ()
    finished = seq.finish_reason is not None and not seq.finish_reported
    if n == seq.reported_tokens and len(parts) == seq.reported_parts and not finished:
        return None
    new = seq.token_ids[seq.num_prompt_tokens + seq.reported_tokens:]
    text = "".join(parts[seq.reported_parts:])
    d = Delta(new, text, seq.finish_reason if finished else None, seq.stop_reason if finished else None,
              seq.request_id, seq.token_logprobs[seq.reported_tokens:],
              seq.top_logprobs[seq.reported_tokens:] if seq.params.logprobs is not None else None)
    seq.reported_tokens, seq.reported_parts = n, len(parts)
    seq.finish_reported = seq.finish_reported or finished
    return d


def request_output(seq: Sequence, groups: ReflectionGroups | None) -> RequestOutput:
    out = RequestOutput(
        request_id=seq.request_id,
        prompt_token_ids=seq.token_ids[:seq.num_prompt_tokens],
        token_ids=list(seq.output_token_ids),
        text=seq.text,
        finish_reason=seq.finish_reason,
        stop_reason=seq.stop_reason,
        cumulative_logprob=seq.cumulative_logprob,
        token_logprobs=list(seq.token_logprobs),
        logprobs=list(seq.top_logprobs) if seq.params.logprobs is not None else None,
        reflection_probs=torch.stack(seq.reflection) if seq.reflection else None,
        reflection_logprobs=torch.stack(seq.reflection_logprobs) if seq.reflection else None,
        reflection_groups=groups if seq.reflection else None,
        prompt_logprobs=entries(seq),
    )
    out.outputs = [out.completion()]
    return out
