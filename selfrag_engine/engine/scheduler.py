"""Continuous batching: which tokens of which sequences the next model step computes.

Every step takes, oldest first, the uncomputed tokens of the running sequences (one token for a sequence
in decode, a chunk of a prompt or of a forked branch's suffix otherwise), then admits waiting sequences
while the token budget and the pool allow. Decode and prefill tokens share one model call. When blocks
run out the newest running sequences are preempted: their blocks are freed and they wait to be
recomputed from their tokens, so their outputs are unchanged.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from selfrag_engine.engine.sequence import Sequence, Status
from selfrag_engine.errors import CacheCapacityError


@dataclass
class Chunk:
    """seq.token_ids[start:start + num_tokens] are computed in this step."""
    seq: Sequence
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last token, so a next token is sampled from it."""
        return self.start + self.num_tokens == len(self.seq.token_ids)


@dataclass
class Batch:
    chunks: list[Chunk] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst) blocks
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, block_manager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence that already holds its blocks (a forked branch)."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, batch: Batch, victim: Sequence) -> None:
        self.running.remove(victim)
        # Only blocks whose K/V were computed may stay in the prefix cache.
        self.bm.free(victim.seq_id, victim.num_computed)
        victim.num_computed = 0
        victim.status = Status.WAITING
        self.waiting.appendleft(victim)
        batch.preempted.append(victim)

    def schedule_ahead(self, seqs: list[Sequence]) -> Batch | None:
        """The decode step after the one in flight, scheduled before that step's sampled tokens reach the host:
        one token per sequence in `seqs`' order, in a slot reserved in the block manager; the engine gives the
        token ids once it has them. None when the step must wait to be scheduled normally: a request is waiting,
        a running sequence is not in `seqs` (it is mid-prompt), or the pool may run short (preempting needs
        the tokens)."""
        if self.waiting or len(seqs) > self.max_num_batched_tokens:
            return None
        if len(seqs) != len(self.running) or {s.seq_id for s in seqs} != {s.seq_id for s in self.running}:
            return None
        # One token needs at most one block per sequence: a new block, or a private copy of a shared one.
        if self.bm.num_free_blocks() < len(seqs):
            return None
        batch = Batch()
        for seq in seqs:
            batch.copies.extend(self.bm.reserve_tokens(seq.seq_id, 1))
            batch.chunks.append(Chunk(seq, len(seq.token_ids), 1))
        return batch

    def schedule(self) -> Batch:
        batch = Batch()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            if n == 0:
                i += 1
                continue
            end = seq.num_computed + n
            held = self.bm.num_tokens(seq.seq_id)
            if end > held:
                # Free blocks by preempting the newest sequences; possibly this one itself.
                while not self.bm.can_append(seq.seq_id, end - held) and self.running[-1] is not seq:
                    self._preempt(batch, self.running[-1])
                if not self.bm.can_append(seq.seq_id, end - held):
                    self._preempt(batch, seq)
                    continue
                batch.copies.extend(self.bm.append_tokens(seq.seq_id, seq.token_ids[held:end]))
            batch.chunks.append(Chunk(seq, seq.num_computed, n))
            budget -= n
            i += 1

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.bm.can_allocate(len(seq.token_ids)):
                if not self.running and not batch.chunks:
                    raise CacheCapacityError(
                        f"sequence {seq.seq_id} needs {len(seq.token_ids)} tokens of KV cache but the pool "
                        f"({self.bm.num_blocks()} blocks of {self.bm.block_size()} tokens) has room for only "
                        f"{self.bm.num_free_blocks() * self.bm.block_size()} while other sequences hold the rest")
                break
            self.waiting.popleft()
            seq.num_computed = self.bm.allocate(seq.seq_id, seq.token_ids)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            batch.chunks.append(Chunk(seq, seq.num_computed, n))
            budget -= n
        return batch
