"""Passage-copy speculative decoding, exact for greedy and sampling rows alike.

Self-RAG branches copy spans of their own passage into their answers, so a row's next tokens are often
predictable for free: the tokens that followed the latest occurrence of its last few tokens earlier in its own
context (passage, prompt, its output so far; prompt-lookup decoding, `propose`), or in the engine's earlier
outputs (`DraftPool`: the reflection-token scaffolding every answer shares). A verify step computes each
row's last token and its draft in one model call over the paged cache (several query tokens per row, the path
prompt chunks take), samples at every position, and keeps the longest prefix of the draft that plain
decoding reproduces plus the token after it: each accepted position's token, log-probabilities, top-n and
reflection probabilities are the sampler's output for that position, as plain decoding would produce them.

Sampling rows are exact too, because a draw is keyed by the request's seed and the token's position
(`sampling_inputs.step_seed`), not by the step that makes it: position i of a verify step draws with the
seed plain decoding uses for token i, from the same distribution (temperature, top-k, top-p). So the tokens
kept are the very ones plain sampling draws. In distribution this is the standard speculative rejection
rule for a draft that proposes one token with certainty: the draw equals the draft token x with probability
p(x) (accept), and otherwise is a draw from p without x, renormalized (the rule's residual distribution).
The rejected drafts' slots are rolled back in the block manager; they were reserved, never hashed, so the
prefix cache never sees them.

A row with a grammar (structured output) takes part with no draft: its token mask at each position depends
on the tokens before it, so it advances one token per step while the other rows speculate.

A step speculates only when every row of its batch is a decode row and some row has a draft; otherwise it
runs as a plain step (prompt chunks, scored prompts). Verify steps run eagerly
(no CUDA graph) and are not overlapped with the next step, whose input is their outcome.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from selfrag_engine.backend import Backend
from selfrag_engine.engine.model_runner import ModelRunner
from selfrag_engine.engine.output import append_token
from selfrag_engine.engine.sampling_inputs import sample_rows
from selfrag_engine.engine.scheduler import Batch, Scheduler
from selfrag_engine.engine.sequence import Sequence
from selfrag_engine.engine.transfer import copy_to_host
from selfrag_engine.errors import EngineConfigError
from selfrag_engine.layers.sampler import ReflectionGroups
from selfrag_engine.tokenizer import Tokenizer

# Drafts per row and step where speculation is on by default (CUDA): a verify step of K rows with 1 + 4
# tokens each reads the weights once, like a decode step, while a copied span gives up to 5 tokens.
DEFAULT_NUM_DRAFT_TOKENS = 4
# The longest suffix looked up first: longer matches predict better, shorter ones match more often.
MAX_NGRAM = 3


def draft_tokens_option(num_draft_tokens: int | None, device: torch.device) -> int:
    """The engine option: None is on where a model call is dear (CUDA: a verify step costs about one weight
    read, like a decode step), off on the CPU, where a call costs about its tokens' work."""
    if num_draft_tokens is None:
        return DEFAULT_NUM_DRAFT_TOKENS if device.type == "cuda" else 0
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 0:
        raise EngineConfigError(f"num_draft_tokens must be an integer >= 0 (0 turns speculation off), "
                                f"got {num_draft_tokens!r}")
    return num_draft_tokens


@dataclass
class SpeculationStats:
    """Counters over the engine's life. row_passes / tokens is the model forward passes each generated
    token cost its sequence (1.0 without speculation)."""
    forward_passes: int = 0  # model calls that sampled
    verify_passes: int = 0  # of which verify steps
    row_passes: int = 0  # sequences sampling in a model call, summed over calls
    tokens: int = 0  # tokens appended to sequences
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # draft tokens plain decoding reproduced

    def as_dict(self) -> dict[str, float]:
        d = {k: float(v) for k, v in vars(self).items()}
        d["passes_per_token"] = self.row_passes / self.tokens if self.tokens else 0.0
        d["acceptance_rate"] = self.accepted / self.drafted if self.drafted else 0.0
        return d


def lookup(token_ids: list[int], n: int, num_draft_tokens: int) -> list[int]:
    """Up to num_draft_tokens tokens that followed the latest earlier occurrence of the last n tokens."""
    n_tokens = len(token_ids)
    if n >= n_tokens:
        return []
    suffix = token_ids[n_tokens - n:]
    first = suffix[0]
    for start in range(n_tokens - n - 1, -1, -1):
        if token_ids[start] == first and token_ids[start:start + n] == suffix:
            return token_ids[start + n:start + n + num_draft_tokens]
    return []


class DraftPool:
    """What followed each n-gram (n = 2 and 3) in the engine's finished outputs, latest first: Self-RAG's
    answers share their reflection-token scaffolding ("[Irrelevant] ... [Utility:1]") across branches and
    questions, which a row's own context does not hold yet. Bounded, least recently written out first."""

    def __init__(self, width: int, capacity: int = 1 << 16):
        self.width = width
        self.capacity = capacity
        self.table: OrderedDict[tuple[int, ...], list[int]] = OrderedDict()

    def add(self, token_ids: list[int]) -> None:
        for n in (2, MAX_NGRAM):
            for i in range(len(token_ids) - n):
                key = tuple(token_ids[i:i + n])
                self.table[key] = token_ids[i + n:i + n + self.width]
                self.table.move_to_end(key)
        while len(self.table) > self.capacity:
            self.table.popitem(last=False)

    def get(self, token_ids: list[int], n: int, num_draft_tokens: int) -> list[int]:
        if n > len(token_ids):
            return []
        return self.table.get(tuple(token_ids[len(token_ids) - n:]), [])[:num_draft_tokens]


def propose(token_ids: list[int], num_draft_tokens: int, pool: DraftPool | None = None) -> list[int]:
    """A draft of up to num_draft_tokens tokens: what followed the sequence's last n tokens earlier in its own
    context, else in the pool's outputs, for n = 3 then 2; then what followed its last token; [] if nothing."""
    if num_draft_tokens <= 0:
        return []
    for n in range(MAX_NGRAM, 1, -1):
        draft = lookup(token_ids, n, num_draft_tokens)
        if not draft and pool is not None:
            draft = pool.get(token_ids, n, num_draft_tokens)
        if draft:
            return draft
    return lookup(token_ids, 1, num_draft_tokens)


def draft_limit(seq: Sequence, num_draft_tokens: int, max_model_len: int) -> int:
    """Drafts worth verifying for seq: the step yields at most drafts + 1 tokens, and none past the request's
    max_tokens or the model length."""
    left = min(seq.params.max_tokens - seq.num_output_tokens, max_model_len - len(seq.token_ids))
    return max(0, min(num_draft_tokens, left - 1))


def speculable(batch: Batch) -> bool:
    """Every chunk is a decode row: one known token, sampling the next; and no row's logits processing reads
    its generated tokens (penalties, logits processors: a drafted position would need the drafts before it),
    nor returns every prompt position (engine/prompt_logprobs.py). Otherwise the step runs plainly."""
    return bool(batch.chunks) and all(c.num_tokens == 1 and c.samples and not c.seq.scores
                                      and not c.seq.needs_all_rows and not c.seq.params.reads_history
                                      and not c.seq.prefill_only
                                      for c in batch.chunks)


def add_drafts(scheduler: Scheduler, batch: Batch, num_draft_tokens: int, max_model_len: int,
               pool: DraftPool | None = None) -> int:
    """Drafts the batch's rows in place (see Scheduler.add_drafts); returns how many tokens were drafted. A row
    with a grammar gets no draft: its mask at each position depends on the tokens before it."""
    drafts = [[] if c.seq.grammar is not None else
              propose(c.seq.token_ids, draft_limit(c.seq, num_draft_tokens, max_model_len), pool)
              for c in batch.chunks]
    if not any(drafts):
        return 0
    return scheduler.add_drafts(batch, drafts)


def verify(batch: Batch, scheduler: Scheduler, runner: ModelRunner, tokenizer: Tokenizer, max_model_len: int,
           groups: ReflectionGroups | None, backend: Backend, stats: SpeculationStats) -> list[Sequence]:
    """Runs a drafted batch and appends each row's accepted tokens, stopping at the first stop condition as
    plain decoding would; returns the sequences that finished."""
    logits = runner.run(batch)
    seqs, offsets = [], []
    for c in batch.chunks:
        for j in range(1 + len(c.draft)):
            seqs.append(c.seq)
            offsets.append(j)
    host, ready = copy_to_host(sample_rows(logits, seqs, groups, backend, offsets=offsets))
    if ready is not None:
        ready.synchronize()
    tokens, logprobs = host.tokens.tolist(), host.logprobs.tolist()
    stats.forward_passes += 1
    stats.verify_passes += 1
    finished = []
    row = 0
    for c in batch.chunks:
        seq, draft = c.seq, c.draft
        appended, done = 0, False
        for j in range(1 + len(draft)):
            token = tokens[row + j]
            done = append_token(seq, host, row + j, token, logprobs[row + j], tokenizer, max_model_len)
            appended += 1
            if done or j == len(draft) or token != draft[j]:
                break
        row += 1 + len(draft)
        # The step computed K/V for the row's last token and its accepted drafts; the token appended last is
        # computed by the next step, as after a plain decode step.
        scheduler.settle_drafts(seq, draft[:appended - 1], c.start + appended)
        seq.num_computed = c.start + appended
        stats.row_passes += 1
        stats.tokens += appended
        stats.drafted += len(draft)
        stats.accepted += appended - 1
        if done:
            scheduler.finish(seq, seq.keep_cache)
            finished.append(seq)
    return finished
