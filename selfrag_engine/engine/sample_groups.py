"""Requests sampled several times (SamplingParams.n, best_of): the prompt computed once, its samples forked off
its KV blocks.

The request's id names a prefill-only sequence over the prompt but its last token: computed into the cache
(chunked, with prompt log-probabilities if asked) and paused there, sampling nothing. The step that completes it
forks best_of samples off its blocks (copy-on-write, refcounted in the block manager), each continuing with the
prompt's last token (so each computes one token of its own and samples from it, with its own seed), and frees
the prompt's own hold on the blocks. The samples are engine requests of their own, hidden behind the request's
id: it is done when all are, its output lists them (vLLM's RequestOutput.outputs), releasing or forgetting it
does so to all of them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from selfrag_engine.engine.output import Delta, RequestOutput, request_output
from selfrag_engine.engine.prompt_logprobs import entries
from selfrag_engine.engine.sampling_params import SamplingParams
from selfrag_engine.engine.sequence import Sequence, Status
from selfrag_engine.layers.sampler import ReflectionGroups

_SEED_MASK = (1 << 62) - 1


@dataclass
class SampleGroup:
    prompt: Sequence  # prefill-only, over the prompt but its last token (lookahead); its id is the request's
    params: SamplingParams
    samples: list[Sequence] = field(default_factory=list)
    finish_reported: bool = False

    @property
    def request_id(self) -> int:
        return self.prompt.request_id

    @property
    def forked(self) -> bool:
        return bool(self.samples)

    @property
    def done(self) -> bool:
        if not self.forked:
            return self.prompt.status == Status.FINISHED  # released before its prompt was computed
        return all(s.status in (Status.PAUSED, Status.FINISHED) for s in self.samples)


def prompt_params(params: SamplingParams) -> SamplingParams:
    """The prompt's own parameters: it samples nothing; max_tokens sizes the fit checks."""
    return SamplingParams(max_tokens=params.max_tokens, prompt_logprobs=params.prompt_logprobs)


def sample_params(params: SamplingParams) -> list[SamplingParams]:
    """Each sample's parameters: one sample, no prompt log-probabilities (the prompt has them); with a seed,
    seed + i for sample i, so the samples differ and the request stays reproducible."""
    out = []
    for i in range(params.num_samples):
        seed = None if params.seed is None else (params.seed + i) & _SEED_MASK
        out.append(dataclasses.replace(params, n=1, best_of=None, prompt_logprobs=None, seed=seed))
    return out


def group_output(group: SampleGroup, reflection: ReflectionGroups | None) -> RequestOutput:
    p = group.prompt
    prompt_ids = p.token_ids[:p.num_prompt_tokens] + p.lookahead
    if not group.forked:
        return RequestOutput(group.request_id, prompt_ids, [], "", "abort" if p.status == Status.FINISHED else None,
                             None, 0.0, [], [] if group.params.logprobs is not None else None, None, None, None,
                             entries(p), [])
    outs = [request_output(s, reflection) for s in group.samples]
    if group.params.best_of is not None and group.params.best_of > group.params.n:
        outs = sorted(outs, key=lambda o: o.cumulative_logprob, reverse=True)[:group.params.n]
    first = outs[0]
    return dataclasses.replace(first, request_id=group.request_id, prompt_token_ids=prompt_ids,
                               prompt_logprobs=entries(p), outputs=[o.completion(i) for i, o in enumerate(outs)])


def relabel(deltas: list[Delta], owner: dict[int, SampleGroup]) -> list[Delta]:
    """A step's deltas as callers see them: a sample's delta under its request's id with its index, its finish
    held back until the whole request's, which comes as a last delta (with the first output's reason)."""
    out, touched = [], {}
    for d in deltas:
        group = owner.get(d.request_id)
        if group is None:
            out.append(d)
            continue
        d.index = next(i for i, s in enumerate(group.samples) if s.request_id == d.request_id)
        d.request_id = group.request_id
        d.finish_reason = d.stop_reason = None
        touched[group.request_id] = group
        if d.token_ids or d.text:
            out.append(d)
    for group in touched.values():
        if group.done and not group.finish_reported:
            group.finish_reported = True
            final = group_output(group, None)
            out.append(Delta([], "", final.finish_reason or "abort", final.stop_reason, group.request_id))
    return out
