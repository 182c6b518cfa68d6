"""What a request has produced: appending a sampled token (log-probabilities, reflection probabilities),
stop conditions (EOS, stop tokens, stop strings, length), detokenizing, and the `RequestOutput` a caller reads."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from selfrag_engine.engine.sequence import Sequence
from selfrag_engine.layers.sampler import ReflectionGroups, SamplerOutput
from selfrag_engine.tokenizer import Tokenizer


@dataclass
class RequestOutput:
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


def decode_output(tokenizer: Tokenizer, seq: Sequence) -> str:
    return tokenizer.decode(seq.output_token_ids, skip_special_tokens=seq.params.skip_special_tokens)


def append_token(seq: Sequence, out: SamplerOutput, row: int, token: int, lp: float, tokenizer: Tokenizer,
                 max_model_len: int) -> bool:
    """Appends the token sampled in `out`'s row for seq; returns whether the request has finished (its
    finish_reason, stop_reason and text then set)."""
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
    if token == tokenizer.eos_id and not p.ignore_eos:
        reason = ("stop", None)
    elif token in p.stop_token_ids:
        reason = ("stop", token)
    elif p.stop:
        text = decode_output(tokenizer, seq)
        for s in p.stop:
            at = text.find(s, max(0, len(seq.text) - len(s)))
            if at >= 0:
                seq.text = text[:at + len(s)] if p.include_stop_str_in_output else text[:at]
                reason = ("stop", s)
                break
        else:
            seq.text = text
    if reason is None and (seq.num_output_tokens >= p.max_tokens or len(seq.token_ids) >= max_model_len):
        reason = ("length", None)
    if reason is None:
        return False
    seq.finish_reason, seq.stop_reason = reason
    if p.detokenize and not (p.stop and reason[1] in p.stop):
        seq.text = decode_output(tokenizer, seq)
    return True


def request_output(seq: Sequence, groups: ReflectionGroups | None) -> RequestOutput:
    return RequestOutput(
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
    )
