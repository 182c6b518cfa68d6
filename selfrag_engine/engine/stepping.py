"""Stepping: one model step over the scheduled batch, launched, sampled and finished; with `overlap`, each
decode step launched before the previous one's tokens reach the host.

With overlap, a decode step is followed at once by the next one, scheduled and launched before the first
one's sampled tokens reach the host (they are the next step's inputs, on the device): the host's share of
each step (scheduling, metadata, reading the tokens, stop checks) runs while the device computes the
following one. A step then returns with that next step in flight; it finishes in the next call. Every
sequence gets the tokens it gets without overlap; one that stops (EOS, a stop string) has one more row
computed and dropped.

With num_draft_tokens > 0, a step whose rows are all decode rows drafts and verifies several tokens per row
in one model call (engine/speculative.py); such steps are not overlapped, and a plain decode step launches
no step ahead, so that the next one can speculate.

A step is a transaction: if anything in it raises (a failing kernel, an interrupt while sampling), every
request it touched is put back as it was before the step, holding no blocks and waiting to be recomputed
from its tokens (as a preempted one), and the step in flight is dropped; the exception then propagates.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from selfrag_engine.backend import Backend
from selfrag_engine.engine.model_runner import ModelRunner
from selfrag_engine.engine.output import append_token
from selfrag_engine.engine import prompt_logprobs
from selfrag_engine.engine.sampling_inputs import sample_rows
from selfrag_engine.engine.scheduler import Batch, Scheduler
from selfrag_engine.engine.sequence import Sequence, Status
from selfrag_engine.engine.speculative import MAX_NGRAM, DraftPool, SpeculationStats, add_drafts, speculable, verify
from selfrag_engine.engine.transfer import copy_to_host, to_device
from selfrag_engine.layers.sampler import ReflectionGroups, SamplerOutput
from selfrag_engine.tokenizer import Tokenizer


@dataclass
class Launched:
    """A model step whose sampled tokens may still be on their way to the host."""
    seqs: list[Sequence]  # the sampling rows, in order
    starts: list[int]  # the position each row computes
    host: SamplerOutput  # the sampler's output on the host, complete once `ready` has been waited on
    ready: torch.cuda.Event | None  # None when the output was computed on the CPU
    ahead: bool  # scheduled before its input tokens were on the host: its slots are reserved, not committed
    tokens: torch.Tensor  # the sampled tokens on the model's device: the inputs of a step launched after it
    dropped: set[int] = field(default_factory=set)  # requests that finished before this step did


@dataclass
class _Saved:
    """What a step may change in a sequence, as it was before the step."""
    seq: Sequence
    status: Status
    num_tokens: int
    text: tuple | None
    finish_reason: str | None
    stop_reason: str | int | None
    cumulative_logprob: float
    num_top: int
    num_reflection: int
    logits: dict[int, torch.Tensor]
    prompt_logprobs: dict

    @classmethod
    def of(cls, s: Sequence) -> "_Saved":
        text = None if s.text_state is None else s.text_state.snapshot()
        return cls(s, s.status, len(s.token_ids), text, s.finish_reason, s.stop_reason, s.cumulative_logprob,
                   len(s.top_logprobs), len(s.reflection), dict(s.logits), dict(s.prompt_logprobs))

    def restore(self) -> None:
        s = self.seq
        del s.token_ids[self.num_tokens:]
        del s.token_logprobs[max(0, self.num_tokens - s.num_prompt_tokens):]
        del s.top_logprobs[self.num_top:]
        del s.reflection[self.num_reflection:]
        del s.reflection_logprobs[self.num_reflection:]
        s.status, s.finish_reason, s.stop_reason = self.status, self.finish_reason, self.stop_reason
        if self.text is None:
            s.text_state = None
        else:
            s.text_state.restore(self.text)
        s.cumulative_logprob, s.logits = self.cumulative_logprob, self.logits
        s.prompt_logprobs = self.prompt_logprobs
        if s.grammar is not None:
            s.grammar.rollback_to(self.num_tokens - s.num_prompt_tokens)


class Stepper:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner, tokenizer: Tokenizer, max_model_len: int,
                 groups: ReflectionGroups | None, backend: Backend, overlap: bool, num_draft_tokens: int = 0):
        self.scheduler = scheduler
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.groups = groups
        self.backend = backend
        self.overlap = overlap
        self.num_draft_tokens = num_draft_tokens
        self.stats = SpeculationStats()
        self.pool = DraftPool(num_draft_tokens) if num_draft_tokens else None
        self.in_flight: Launched | None = None
        self.touched: list[Sequence] = []  # the sequences the last step appended a token to, or finished

    def step(self) -> tuple[list[Sequence], bool]:
        """One step; returns the sequences that finished in it and whether it computed anything at all.
        `touched` then lists every sequence it appended to or finished (the output processor's input)."""
        sched = self.scheduler
        self.touched = []
        saved = [_Saved.of(s) for s in [*sched.running, *sched.waiting]]
        try:
            finished, progressed = self._step()
        except BaseException:
            self.in_flight = None
            for s in reversed(saved):
                s.restore()
                sched.requeue(s.seq)
            self.touched = []
            raise
        if self.pool is not None:
            for s in finished:
                self.pool.add(s.token_ids[max(0, s.num_prompt_tokens - MAX_NGRAM):])
        return finished, progressed

    def _step(self) -> tuple[list[Sequence], bool]:
        cur, self.in_flight = self.in_flight, None
        finished: list[Sequence] = []
        if cur is None:
            batch = self.scheduler.schedule()
            if not batch.chunks:
                return [], False
            if (self.num_draft_tokens and speculable(batch)
                    and add_drafts(self.scheduler, batch, self.num_draft_tokens, self.max_model_len, self.pool)):
                self.touched = [c.seq for c in batch.chunks]
                return verify(batch, self.scheduler, self.runner, self.tokenizer, self.max_model_len, self.groups,
                              self.backend, self.stats), True
            cur = self._launch(batch, finished)
            if cur is None:
                return finished, True
        if self.overlap and not self.num_draft_tokens:
            self.in_flight = self._launch_ahead(cur)
        finished += self._finish(cur, self.in_flight)
        if self.in_flight is not None and len(self.in_flight.dropped) == len(self.in_flight.seqs):
            self.in_flight = None
        return finished, True

    def _launch(self, batch: Batch, finished: list[Sequence] | None = None,
                next_tokens: torch.Tensor | None = None) -> Launched | None:
        """Queues the model step and the sampling of its rows (None if no row samples); the host copies of the
        result are queued too, not waited for. A scored sequence keeps its chunk's logits, and is put in
        `finished` once its last chunk is computed."""
        logits = self.runner.run(batch, next_tokens=next_tokens)
        ahead = next_tokens is not None
        chunks = batch.chunks
        if not ahead:
            rows, at = [], 0
            for c in chunks:
                c.seq.num_computed = c.start + c.num_tokens
                if c.seq.scores:
                    # A preempted scored sequence is computed again from its first token.
                    c.seq.logits = {k: v for k, v in c.seq.logits.items() if k < c.start}
                    c.seq.logits[c.start] = logits[at:at + c.num_tokens]
                    at += c.num_tokens
                    if c.samples:
                        self.scheduler.finish(c.seq, keep_cache=False)
                        c.seq.finish_reason = "length"  # every position scored: its whole length
                        finished.append(c.seq)
                        self.touched.append(c.seq)
                elif prompt_logprobs.wants_rows(c):
                    prompt_logprobs.record(c, logits[at:at + c.num_tokens])
                    at += c.num_tokens
                    if c.samples and not c.seq.prefill_only:
                        rows.append(at - 1)
                elif c.samples and not c.seq.prefill_only:
                    rows.append(at)
                    at += 1
                if c.seq.prefill_only and c.samples:
                    # The shared prompt of a sampled group, computed: paused with its cache for its samples to fork.
                    self.scheduler.finish(c.seq, keep_cache=True)
                    finished.append(c.seq)
            chunks = [c for c in chunks if c.samples and not c.seq.scores and not c.seq.prefill_only]
            if not chunks:
                return None
            if len(rows) < logits.shape[0]:
                logits = logits[to_device(rows, torch.long, logits.device)]
        seqs = [c.seq for c in chunks]
        out = sample_rows(logits, seqs, self.groups, self.backend, ahead)
        host, ready = copy_to_host(out)
        return Launched(seqs, [c.start for c in chunks], host, ready, ahead, out.tokens)

    def _launch_ahead(self, cur: Launched) -> Launched | None:
        """The decode step after `cur`, launched before cur's tokens are on the host; None when it cannot be
        (see Scheduler.schedule_ahead), or when some sequence reaches its length limit with cur's token."""
        rows = [i for i, s in enumerate(cur.seqs) if s.request_id not in cur.dropped]
        seqs = [cur.seqs[i] for i in rows]
        # A row with a grammar needs cur's token on the host to mask its next one (structured_output.py);
        # penalties and logits processors read it too: such rows step aside.
        if not seqs or any(s.num_output_tokens + 1 >= s.params.max_tokens or s.grammar is not None
                           or len(s.token_ids) + 1 >= self.max_model_len or s.params.reads_history for s in seqs):
            return None
        batch = self.scheduler.schedule_ahead(seqs)
        if batch is None:
            return None
        tokens = cur.tokens
        if len(rows) < len(cur.seqs):
            tokens = tokens[to_device(rows, torch.long, tokens.device)]
        try:
            return self._launch(batch, next_tokens=tokens)
        except BaseException:
            for s in seqs:
                self.scheduler.cancel_reserved(s)
            raise

    def _finish(self, cur: Launched, nxt: Launched | None) -> list[Sequence]:
        """Appends cur's sampled tokens once they are on the host; returns the sequences that finished. A
        sequence that finished drops its row of `nxt`, the step launched after cur."""
        if cur.ready is not None:
            cur.ready.synchronize()
        out = cur.host
        tokens, logprobs = out.tokens.tolist(), out.logprobs.tolist()
        in_next = set() if nxt is None else {s.request_id for s in nxt.seqs}
        finished = []
        self.stats.forward_passes += 1
        for i, seq in enumerate(cur.seqs):
            if seq.request_id in cur.dropped:
                continue
            self.stats.row_passes += 1
            self.stats.tokens += 1
            self.touched.append(seq)
            if cur.ahead:
                # The step computed the K/V of the token it was launched without; the cache learns its id now.
                self.scheduler.commit_reserved(seq, seq.token_ids[cur.starts[i]])
                seq.num_computed = cur.starts[i] + 1
            if append_token(seq, out, i, tokens[i], logprobs[i], self.tokenizer, self.max_model_len):
                self.scheduler.finish(seq, seq.keep_cache)
                finished.append(seq)
                if seq.request_id in in_next:
                    nxt.dropped.add(seq.request_id)
                    self.scheduler.cancel_reserved(seq)  # paused: keeps its blocks, not nxt's slot
        return finished

    def cancel_in_flight(self, seq: Sequence) -> None:
        """If the step launched ahead computes a row of `seq`, drops that step, leaving every sequence as a
        plain step leaves it, so the request can be forked or released as between plain steps. The step's
        device work is wasted; its slots were reserved in private blocks (Scheduler.schedule_ahead), so its
        late K/V writes touch no other sequence."""
        nxt = self.in_flight
        if nxt is None or seq.request_id in nxt.dropped or all(s is not seq for s in nxt.seqs):
            return
        self.in_flight = None
        for s in nxt.seqs:
            if s.request_id not in nxt.dropped:
                self.scheduler.cancel_reserved(s)
