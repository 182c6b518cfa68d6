"""Continuous batching: which tokens of which sequences the next model step computes.

Every step takes, oldest first, the uncomputed tokens of the running sequences (one token for a sequence
in decode, a chunk of a prompt or of a forked branch's suffix otherwise), then admits waiting sequences
while the token budget and the pool allow. Decode and prefill tokens share one model call. When blocks
run out the newest running sequences are preempted: their blocks are freed and they wait to be
recomputed from their tokens, so their outputs are unchanged.

The scheduler is the only owner of the block manager: a scheduled `Batch` carries the block tables and
cache slots the model step needs, and the engine forks, pauses, frees and commits reserved slots through
the methods here.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from selfrag_engine.engine.sequence import Sequence, Status
from selfrag_engine.errors import CacheCapacityError, RequestError

_NO_TABLES = np.zeros((0, 0), dtype=np.int32)
_NO_SLOTS = np.zeros(0, dtype=np.int64)


@dataclass
class Chunk:
    """seq.token_ids[start:start + num_tokens] are computed in this step; with `draft`, the chunk's last
    len(draft) tokens are guesses past the sequence's end (engine/speculative.py), in reserved slots."""
    seq: Sequence
    start: int
    num_tokens: int
    draft: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last token, so a next token is sampled from it (a scored
        sequence ends there instead)."""
        return self.start + self.num_tokens - len(self.draft) == len(self.seq.token_ids)

    def input_ids(self) -> list[int]:
        known = self.seq.token_ids[self.start:self.start + self.num_tokens - len(self.draft)]
        return known + self.draft if self.draft else known


@dataclass
class Batch:
    chunks: list[Chunk] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst) blocks
    preempted: list[Sequence] = field(default_factory=list)
    block_tables: np.ndarray = field(default_factory=lambda: _NO_TABLES)  # int32 [chunks, widest], -1 padded
    slot_mapping: np.ndarray = field(default_factory=lambda: _NO_SLOTS)  # int64: each chunk's slots, in order

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, block_manager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    # ---- the pool -------------------------------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self.block_manager.block_size()

    @property
    def capacity_tokens(self) -> int:
        return self.block_manager.num_blocks() * self.block_manager.block_size()

    def cache_stats(self) -> dict[str, int]:
        bm = self.block_manager
        return {"num_blocks": bm.num_blocks(), "block_size": bm.block_size(), "free": bm.num_free_blocks(),
                "used": bm.num_used_blocks(), "shared": bm.num_shared_blocks(), "cached": bm.num_cached_blocks()}

    def holds(self, seq: Sequence) -> bool:
        return self.block_manager.has(seq.request_id)

    # ---- sequences coming and going -------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def fork(self, parent: Sequence, children: list[Sequence]) -> None:
        """Children that share the parent's cached blocks and run from the parent's computed tokens on."""
        held = self.block_manager.num_tokens(parent.request_id)
        if held > parent.num_computed:
            # The pool holds room for the rest of the prompt, not its K/V: a child would share blocks that
            # the parent and the child would both write later, without copy-on-write.
            raise RequestError(f"request {parent.request_id} is still being prefilled ({parent.num_computed} of "
                               f"{held} prompt tokens computed); fork it once its prompt is computed")
        self.block_manager.fork(parent.request_id, [c.request_id for c in children])
        for c in children:
            c.num_computed = parent.num_computed
            c.status = Status.RUNNING
            self.running.append(c)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def finish(self, seq: Sequence, keep_cache: bool) -> None:
        """Takes a sequence out of the batch; with keep_cache it keeps its blocks (paused, to be forked)."""
        self.remove(seq)
        if keep_cache:
            seq.status = Status.PAUSED
        else:
            self.free(seq)
            seq.status = Status.FINISHED

    def free(self, seq: Sequence) -> None:
        """Frees the sequence's blocks, if it holds any. Only blocks whose K/V were computed may stay in the
        prefix cache."""
        if self.block_manager.has(seq.request_id):
            self.block_manager.free(seq.request_id, seq.num_computed)

    def requeue(self, seq: Sequence) -> None:
        """Back to the front of the queue without blocks, to be recomputed from its tokens (as preempted)."""
        self.remove(seq)
        self.free(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- slots reserved by a step scheduled ahead -----------------------------------------------

    def commit_reserved(self, seq: Sequence, token: int) -> None:
        self.block_manager.commit_reserved(seq.request_id, [token])

    def cancel_reserved(self, seq: Sequence) -> None:
        if self.block_manager.has(seq.request_id):
            self.block_manager.cancel_reserved(seq.request_id)

    # ---- draft tokens of a speculative step -----------------------------------------------------

    def add_drafts(self, batch: Batch, drafts: list[list[int]]) -> int:
        """Extends the batch's decode chunks by their drafts (drafts[i] for chunk i), each in slots reserved
        past the sequence's tokens, as far as the token budget and the pool allow without preempting (a
        draft is only a guess); returns how many draft tokens were added. Reserved slots are neither hashed
        nor indexed until `settle_drafts` commits the accepted ones."""
        bm = self.block_manager
        budget = self.max_num_batched_tokens - batch.num_tokens
        added = 0
        for chunk, draft in zip(batch.chunks, drafts):
            draft = draft[:budget]
            if not draft or not bm.can_append(chunk.seq.request_id, len(draft)):
                continue
            batch.copies.extend(bm.reserve_tokens(chunk.seq.request_id, len(draft)))
            chunk.draft = list(draft)
            chunk.num_tokens += len(draft)
            budget -= len(draft)
            added += len(draft)
        if added:
            self._with_tables(batch)
        return added

    def settle_drafts(self, seq: Sequence, accepted: list[int], num_tokens: int) -> None:
        """After a verify step: commits the accepted draft tokens and rolls the sequence's slots back to its
        first `num_tokens` tokens (the rejected drafts' K/V were written in private reserved slots)."""
        bm = self.block_manager
        if accepted:
            bm.commit_reserved(seq.request_id, accepted)
        bm.truncate(seq.request_id, num_tokens)

    # ---- scheduling -----------------------------------------------------------------------------

    def _preempt(self, batch: Batch, victim: Sequence) -> None:
        self.requeue(victim)
        batch.preempted.append(victim)

    def _with_tables(self, batch: Batch) -> Batch:
        """The batch's block tables and the slots its tokens' K/V go to, in chunk order."""
        if batch.chunks:
            ids = [c.seq.request_id for c in batch.chunks]
            batch.block_tables = self.block_manager.block_tables(ids, -1)
            batch.slot_mapping = self.block_manager.slot_mapping(ids, [c.num_tokens for c in batch.chunks],
                                                                 [c.start for c in batch.chunks])
        return batch

    def schedule_ahead(self, seqs: list[Sequence]) -> Batch | None:
        """The decode step after the one in flight, scheduled before that step's sampled tokens reach the host:
        one token per sequence in `seqs`' order, in a slot reserved in the block manager; the engine gives the
        token ids once it has them. None when the step must wait to be scheduled normally: a request is waiting,
        a running sequence is not in `seqs` (it is mid-prompt), or the pool may run short (preempting needs
        the tokens)."""
        if self.waiting or len(seqs) > self.max_num_batched_tokens:
            return None
        if len(seqs) != len(self.running) or {s.request_id for s in seqs} != {s.request_id for s in self.running}:
            return None
        # One token needs at most one block per sequence: a new block, or a private copy of a shared one.
        if self.block_manager.num_free_blocks() < len(seqs):
            return None
        batch = Batch()
        for seq in seqs:
            batch.copies.extend(self.block_manager.reserve_tokens(seq.request_id, 1))
            batch.chunks.append(Chunk(seq, len(seq.token_ids), 1))
        return self._with_tables(batch)

    def schedule(self) -> Batch:
        bm = self.block_manager
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
            held = bm.num_tokens(seq.request_id)
            if end > held:
                # Free blocks by preempting the newest sequences; possibly this one itself.
                while not bm.can_append(seq.request_id, end - held) and self.running[-1] is not seq:
                    self._preempt(batch, self.running[-1])
                if not bm.can_append(seq.request_id, end - held):
                    self._preempt(batch, seq)
                    continue
                batch.copies.extend(bm.append_tokens(seq.request_id, seq.token_ids[held:end]))
            batch.chunks.append(Chunk(seq, seq.num_computed, n))
            budget -= n
            i += 1

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not bm.can_allocate(len(seq.token_ids)):
                if not self.running and not batch.chunks:
                    raise CacheCapacityError(
                        f"request {seq.request_id} needs {len(seq.token_ids)} tokens of KV cache but the pool "
                        f"({bm.num_blocks()} blocks of {bm.block_size()} tokens) has room for only "
                        f"{bm.num_free_blocks() * bm.block_size()} while other requests hold the rest")
                break
            self.waiting.popleft()
            # A scored sequence needs the logits of every position, and so does one whose prompt
            # log-probabilities are asked for (until they are computed): the prefix cache must not skip any.
            seq.num_computed = bm.allocate(seq.request_id, seq.token_ids, not (seq.scores or seq.needs_all_rows))
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            batch.chunks.append(Chunk(seq, seq.num_computed, n))
            budget -= n
        return self._with_tables(batch)
