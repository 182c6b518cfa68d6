"""Prompt log-probabilities (SamplingParams.prompt_logprobs, vLLM's): each prompt token's log-probability
given the tokens before it, and the top-k at its position.

A prefill chunk of such a request returns the logits of all its rows (not only the last), and its rows are
turned into log-probabilities on the device as the chunk is computed; the host keeps k + 1 numbers per prompt
token, never a vocabulary-sized row. The logits row at position p predicts token p + 1, so the chunk computing
positions [start, start + n) gives the entries of prompt tokens start + 1 .. start + n (those that are prompt
tokens). Every prompt position is computed for such a request: it does not read the prefix cache (which would
skip positions) until its entries are complete, as vLLM skips the prefix cache for it; chunked prefill gives
each chunk's share.

Log-probabilities are of the raw logits (full-vocabulary log-softmax at temperature 1), as the sampler's are.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from selfrag_engine.engine.scheduler import Chunk
from selfrag_engine.engine.sequence import Sequence
from selfrag_engine.layers.sampler import finite_logits, top_n_logprobs


@dataclass
class PromptChunk:
    """The entries of prompt tokens first .. first + len(token_logprobs) - 1, on the host."""
    first: int
    token_logprobs: torch.Tensor  # [n] fp32
    top_ids: torch.Tensor  # [n, k] int64
    top_logprobs: torch.Tensor  # [n, k] fp32


def wants_rows(chunk: Chunk) -> bool:
    """Whether the chunk returns the logits of every row: it computes positions whose next token is a prompt
    token of a request that asks for them."""
    return chunk.seq.needs_all_rows and chunk.start < chunk.seq.num_prompt_tokens - 1 + len(chunk.seq.lookahead)


def record(chunk: Chunk, logits: torch.Tensor) -> None:
    """Keeps the entries the chunk's logits (float32 [num_tokens, V], one row per position) give."""
    seq = chunk.seq
    prompt = seq.token_ids[:seq.num_prompt_tokens] + seq.lookahead
    n = min(chunk.num_tokens, len(prompt) - 1 - chunk.start)
    x = finite_logits(logits[:n])
    lse = torch.logsumexp(x, dim=-1)
    nxt = torch.tensor(prompt[chunk.start + 1:chunk.start + 1 + n], dtype=torch.long).to(x.device)
    token_lp = x.gather(1, nxt.unsqueeze(-1)).squeeze(-1) - lse
    ids, top_lp = top_n_logprobs(x, lse, seq.params.prompt_logprobs)
    # A chunk computed again (after a preemption) replaces what it had given.
    seq.prompt_logprobs = {k: v for k, v in seq.prompt_logprobs.items() if k < chunk.start}
    seq.prompt_logprobs[chunk.start] = PromptChunk(chunk.start + 1, token_lp.cpu(), ids.cpu(), top_lp.cpu())


def entries(seq: Sequence) -> list[dict[int, float] | None] | None:
    """vLLM's RequestOutput.prompt_logprobs: None for the first prompt token, then for each prompt token a
    dict of the top-k ids and the token's own id to their log-probabilities (None if not asked for)."""
    if seq.params.prompt_logprobs is None:
        return None
    out: list[dict[int, float] | None] = [None]
    prompt = seq.token_ids[:seq.num_prompt_tokens] + seq.lookahead
    for start in sorted(seq.prompt_logprobs):
        c = seq.prompt_logprobs[start]
        for j, (lp, ids, tops) in enumerate(zip(c.token_logprobs.tolist(), c.top_ids.tolist(),
                                                c.top_logprobs.tolist())):
            entry = dict(zip(ids, tops))
            entry[prompt[c.first + j]] = lp
            out.append(entry)
    return out
