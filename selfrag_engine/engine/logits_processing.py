"""The rows' logits changed before the sampler draws from them: a request's `logits_processors`, `logit_bias`,
`repetition_penalty`, `frequency_penalty`, `presence_penalty` and `min_p` (SamplingParams).

Everything runs over the whole step's batch on the device: each distinct logits processor is called once per
step with all the rows that carry it; the bias and the token counts the penalties read are built as dense
[R, V] tensors by one scatter over the batch from the rows' token ids, and one launch
(layers/penalties.py: the Triton kernel, or its torch reference) applies them and min-p. The sampler then
draws from the processed logits, while every log-probability it returns stays that of the raw logits
(vLLM v1's default): `sample(..., raw_logits=)`.

The steps that cannot see a row's latest tokens step aside for rows whose processing reads them
(SamplingParams.reads_history): a speculative verify step (its later positions would need the drafts) and a
decode step launched ahead of the previous one's read-back (engine/stepping.py, engine/speculative.py).
"""
from __future__ import annotations

from typing import Protocol, Sequence as Seq

import numpy as np
import torch

from selfrag_engine.backend import Backend
from selfrag_engine.engine.sampling_params import SamplingParams
from selfrag_engine.engine.sequence import Sequence
from selfrag_engine.engine.transfer import to_device
from selfrag_engine.errors import RequestError
from selfrag_engine.layers.penalties import apply_penalties


class LogitsProcessor(Protocol):
    """A batched logits hook (SamplingParams.logits_processors): called once per step with the logits of every
    row that carries it, float32 [R, V] on the model's device (a copy: changing it in place is allowed), and
    those rows' generated token ids so far (R lists, in the same order); returns the new logits, [R, V]. Each
    request's processors run in its list's order, before logit_bias and the penalties."""

    def __call__(self, logits: torch.Tensor, output_token_ids: list[list[int]]) -> torch.Tensor: ...


def wants_processing(params: Seq[SamplingParams]) -> bool:
    return any(p.processes_logits for p in params)


def processor_calls(lists: Seq[Seq[LogitsProcessor]]) -> list[tuple[LogitsProcessor, list[int]]]:
    """The calls of one step, in order: (processor, the rows it runs on). Each distinct processor is called once,
    with all its rows, when one order of the processors keeps every row's own order (the usual case: one shared
    list, or lists that agree); otherwise (a row that lists a processor twice, or two rows that order two
    processors differently) one call per processor per position in the lists."""
    order: dict[int, LogitsProcessor] = {}
    for j in range(max(map(len, lists), default=0)):
        for procs in lists:
            if j < len(procs):
                order.setdefault(id(procs[j]), procs[j])
    rank = {k: i for i, k in enumerate(order)}
    if all(len({id(f) for f in procs}) == len(procs) and
           all(rank[id(a)] < rank[id(b)] for a, b in zip(procs, procs[1:])) for procs in lists):
        return [(f, [r for r, procs in enumerate(lists) if any(g is f for g in procs)]) for f in order.values()]
    calls = []
    for j in range(max(map(len, lists), default=0)):
        at: dict[int, tuple[LogitsProcessor, list[int]]] = {}
        for row, procs in enumerate(lists):
            if j < len(procs):
                at.setdefault(id(procs[j]), (procs[j], []))[1].append(row)
        calls.extend(at.values())
    return calls


def run_processors(x: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
    """Applies the rows' logits processors (processor_calls), each to the rows that carry it at once."""
    for proc, rows in processor_calls([s.params.logits_processors or () for s in seqs]):
        every = len(rows) == x.shape[0]
        idx = None if every else to_device(rows, torch.long, x.device)
        sub = x if every else x[idx]
        out = proc(sub, [list(seqs[r].output_token_ids) for r in rows])
        if not isinstance(out, torch.Tensor) or out.shape != sub.shape:
            raise RequestError(f"logits processor {proc!r} must return a tensor of shape {tuple(sub.shape)}, "
                               f"got {getattr(out, 'shape', type(out).__name__)}")
        out = out.to(device=x.device, dtype=torch.float32)
        if every:
            x = out
        else:
            x[idx] = out
    return x


def token_counts(ids: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """int32 [R, V]: how often each token occurs in each row's ids, by one scatter on the device."""
    width = max(1, max(map(len, ids), default=0))
    # Padding adds 0 to token 0: the counts stay one contiguous [R, V] tensor.
    padded = np.zeros((len(ids), 2, width), dtype=np.int64)
    for row, toks in enumerate(ids):
        padded[row, 0, :len(toks)] = toks
        padded[row, 1, :len(toks)] = 1
    both = to_device(padded, torch.int64, device)
    counts = torch.zeros(len(ids), vocab, dtype=torch.int32, device=device)
    counts.scatter_add_(1, both[:, 0], both[:, 1].to(torch.int32))
    return counts


def logit_bias_rows(params: Seq[SamplingParams], vocab: int, device: torch.device) -> torch.Tensor:
    """float32 [R, V]: each row's logit_bias as a dense row (zeros elsewhere), by one scatter on the device."""
    rows, cols, vals = [], [], []
    for row, p in enumerate(params):
        for t, b in (p.logit_bias or {}).items():
            rows.append(row)
            cols.append(t)
            vals.append(b)
    bias = torch.zeros(len(params), vocab, dtype=torch.float32, device=device)
    bias[to_device(rows, torch.long, device), to_device(cols, torch.long, device)] = to_device(vals, torch.float32,
                                                                                                device)
    return bias


def process_logits(logits: torch.Tensor, seqs: Seq[Sequence], backend: Backend,
                   offsets: Seq[int] | None = None) -> torch.Tensor | None:
    """The rows' processed logits (float32 [R, V], a new tensor), or None when no row asks for processing.
    offsets[i] > 0 (a row past its known tokens) is refused for a row whose processing reads its tokens."""
    params = [s.params for s in seqs]
    if not wants_processing(params):
        return None
    if offsets is not None and any(o and p.reads_history for o, p in zip(offsets, params)):
        raise RuntimeError("a step past a row's known tokens cannot apply penalties or logits processors to it")
    rows, vocab = logits.shape
    dev = logits.device
    x = logits.float().clone()
    if any(p.logits_processors for p in params):
        x = run_processors(x, seqs)
    bias = logit_bias_rows(params, vocab, dev) if any(p.logit_bias for p in params) else None
    counts = seen = None
    if any(p.presence_penalty or p.frequency_penalty for p in params):
        counts = token_counts([s.output_token_ids if (p.presence_penalty or p.frequency_penalty) else []
                               for s, p in zip(seqs, params)], vocab, dev)
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = token_counts([s.token_ids if p.repetition_penalty != 1.0 else [] for s, p in zip(seqs, params)],
                            vocab, dev) > 0
    use_min_p = any(p.min_p > 0 and not p.greedy for p in params)
    if bias is None and counts is None and seen is None and not use_min_p:
        return x
    per_row = [[p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p, p.temperature]
               for p in params]
    pres, freq, rep, min_p, temp = to_device(per_row, torch.float32, dev).T.contiguous()
    return apply_penalties(x, counts, seen, bias, pres, freq, rep, min_p, temp, use_min_p, backend)
