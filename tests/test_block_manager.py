"""The KV cache block manager (C++, through selfrag_engine._C): sharing, copy-on-write, prefix caching,
eviction and its errors, checked against a model of the K/V data it stands for."""
from __future__ import annotations

from collections import Counter
from math import ceil

import numpy as np
import pytest
from hypothesis import event, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from selfrag_engine.engine.block_manager import (BlockManager, DuplicateSequenceError, OutOfBlocksError,
                                                 UnknownSequenceError)

BS = 4
NUM_BLOCKS = 12
token_lists = st.lists(st.integers(0, 2), min_size=1, max_size=10)  # a tiny vocabulary: prefixes recur


def snapshot(bm: BlockManager) -> tuple:
    """What a failed call must leave untouched."""
    return (bm.num_free_blocks(), bm.num_used_blocks(), bm.num_shared_blocks(), bm.num_cached_blocks(),
            [bm.refcount(b) for b in range(bm.num_blocks())])


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / append / fork / free. `kv` stands in for the K/V tensors: a slot holds the prefix
    its K/V were computed from. Like the engine, the machine writes only the tokens that allocate reports
    as uncached and performs the copies append_tokens reports, so a wrong prefix hit or a missing
    copy-on-write leaves a sequence reading K/V of some other prefix."""

    prefix_caching = True

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BS, self.prefix_caching)
        self.seqs: dict[int, list[int]] = {}
        self.kv: list[tuple | None] = [None] * (NUM_BLOCKS * BS)
        self.history: list[list[int]] = [[]]  # earlier token lists, to build prompts that share a prefix
        self.next_id = 0

    def pick(self, i: int) -> int | None:
        """A live sequence, or None: rules are no-ops without one (preconditions would abort examples)."""
        return sorted(self.seqs)[i % len(self.seqs)] if self.seqs else None

    def compute(self, seq: int, start: int) -> None:
        tokens = self.seqs[seq]
        for i in range(start, len(tokens)):
            self.kv[self.bm.slot(seq, i)] = tuple(tokens[:i + 1])

    @rule(base=st.integers(0, 1 << 16), cut=st.integers(0, 1 << 16), suffix=token_lists, reuse=st.booleans())
    def allocate(self, base, cut, suffix, reuse):
        earlier = self.history[base % len(self.history)]
        prompt = earlier[:cut % (len(earlier) + 1)] + suffix
        seq, before, fits = self.next_id, snapshot(self.bm), self.bm.can_allocate(len(prompt))
        self.next_id += 1
        try:
            cached = self.bm.allocate(seq, prompt, reuse)
        except OutOfBlocksError:
            event("allocate: out of blocks")
            assert not fits, "can_allocate promised room"
            assert snapshot(self.bm) == before and not self.bm.has(seq)
            return
        event("allocate: prefix hit" if cached else "allocate: no hit")
        revived = sum(self.bm.refcount(b) == 1 for b in self.bm.block_table(seq)[:cached // BS])
        if self.bm.num_cached_blocks() + revived < before[3]:
            event("allocate: evicted")
        assert cached % BS == 0 and 0 <= cached < len(prompt)
        assert reuse or cached == 0
        self.seqs[seq] = prompt
        self.history.append(prompt)
        self.compute(seq, cached)

    def grow(self, seq: int, num_tokens: int, what: str, call) -> bool:
        """Runs `call` (append_tokens or reserve_tokens of num_tokens on seq) and performs the copies it reports;
        False if the pool was short, which must leave the manager untouched and agree with can_append."""
        before, fits = snapshot(self.bm), self.bm.can_append(seq, num_tokens)
        old_table, n = self.bm.block_table(seq), len(self.seqs[seq])
        try:
            copies = call()
        except OutOfBlocksError:
            event(f"{what}: out of blocks")
            assert not fits, "can_append promised room"
            assert snapshot(self.bm) == before and self.bm.block_table(seq) == old_table
            return False
        assert fits, "can_append said no, yet it fit"
        if copies:
            event(f"{what}: copy-on-write")
            # Only ever the half-filled last block, swapped for its copy in the table.
            assert copies == [(old_table[-1], self.bm.block_table(seq)[len(old_table) - 1])] and n % BS
        for src, dst in copies:
            self.kv[dst * BS:(dst + 1) * BS] = self.kv[src * BS:(src + 1) * BS]
        return True

    @rule(i=st.integers(0, 1 << 16), tokens=token_lists)
    def append(self, i, tokens):
        seq = self.pick(i)
        if seq is None or not self.grow(seq, len(tokens), "append", lambda: self.bm.append_tokens(seq, tokens)):
            return
        n = len(self.seqs[seq])
        self.seqs[seq] = self.seqs[seq] + tokens
        self.history.append(self.seqs[seq])
        self.compute(seq, n)

    @rule(i=st.integers(0, 1 << 16), tokens=st.lists(st.integers(0, 2), min_size=1, max_size=3),
          keep=st.integers(0, 3))
    def reserve_then_commit_or_cancel(self, i, tokens, keep):
        """A step launched before its input tokens reach the host: slots are reserved, the device writes the
        tokens' K/V, then the host commits the first `keep` ids and cancels the rest (a stopped sequence)."""
        seq = self.pick(i)
        if seq is None or not self.grow(seq, len(tokens), "reserve", lambda: self.bm.reserve_tokens(seq, len(tokens))):
            return
        n = len(self.seqs[seq])
        assert self.bm.num_reserved(seq) == len(tokens) and self.bm.num_tokens(seq) == n + len(tokens)
        full = self.seqs[seq] + tokens
        for t in range(n, len(full)):  # the device knows the ids the host does not have yet
            self.kv[self.bm.slot(seq, t)] = tuple(full[:t + 1])
        keep = min(keep, len(tokens))
        self.bm.commit_reserved(seq, tokens[:keep])
        self.seqs[seq] = self.seqs[seq] + tokens[:keep]
        self.history.append(self.seqs[seq])
        if keep < len(tokens):
            event("reserve: cancelled")
            # Cancelled slots were written in blocks no one else holds: every sequence still reads its own K/V.
            self.bm.cancel_reserved(seq)
        assert self.bm.num_reserved(seq) == 0

    @rule(i=st.integers(0, 1 << 16), drafts=st.lists(st.integers(0, 2), min_size=1, max_size=5),
          accepted=st.integers(0, 5))
    def speculate(self, i, drafts, accepted):
        """A speculative step: slots reserved for draft tokens, their K/V written, the accepted prefix committed
        and the rest truncated away."""
        seq = self.pick(i)
        if seq is None or not self.grow(seq, len(drafts), "speculate",
                                        lambda: self.bm.reserve_tokens(seq, len(drafts))):
            return
        n = len(self.seqs[seq])
        full = self.seqs[seq] + drafts
        for t in range(n, len(full)):
            self.kv[self.bm.slot(seq, t)] = tuple(full[:t + 1])
        accepted = min(accepted, len(drafts))
        self.bm.commit_reserved(seq, drafts[:accepted])
        self.bm.truncate(seq, n + accepted)
        event("speculate: all accepted" if accepted == len(drafts) else "speculate: rolled back")
        self.seqs[seq] = full[:n + accepted]
        self.history.append(self.seqs[seq])
        assert self.bm.num_reserved(seq) == 0

    @rule(i=st.integers(0, 1 << 16), keep=st.integers(0, 1 << 16))
    def truncate(self, i, keep):
        """Any cut, into shared, indexed or private blocks: the slots kept still hold their K/V."""
        seq = self.pick(i)
        if seq is None:
            return
        keep %= len(self.seqs[seq]) + 1
        if keep % BS and self.bm.refcount(self.bm.block_table(seq)[keep // BS]) > 1:
            event("truncate: into a shared block")
        self.bm.truncate(seq, keep)
        self.seqs[seq] = self.seqs[seq][:keep]

    @rule(i=st.integers(0, 1 << 16), n=st.integers(1, 3))
    def fork(self, i, n):
        parent = self.pick(i)
        if parent is None:
            return
        children = list(range(self.next_id, self.next_id + n))
        self.next_id += n
        self.bm.fork(parent, children)
        for c in children:
            self.seqs[c] = list(self.seqs[parent])

    @rule(i=st.integers(0, 1 << 16), computed=st.none() | st.integers(0, 1 << 16))
    def free(self, i, computed):
        seq = self.pick(i)
        if seq is None:
            return
        if computed is None:
            self.bm.free(seq)
        else:  # preempted mid-prefill: slots past `computed` that no one else holds were never written
            computed %= len(self.seqs[seq]) + 1
            for t in range(computed, len(self.seqs[seq])):
                if self.bm.refcount(self.bm.block_table(seq)[t // BS]) == 1:
                    self.kv[self.bm.slot(seq, t)] = None
            self.bm.free(seq, computed)
        del self.seqs[seq]
        assert not self.bm.has(seq)

    @invariant()
    def internal_structures_agree(self):
        self.bm.check_invariants()

    @invariant()
    def refcounts_count_holders(self):
        holders = Counter(b for s in self.seqs for b in self.bm.block_table(s))
        refs = [self.bm.refcount(b) for b in range(NUM_BLOCKS)]
        assert refs == [holders[b] for b in range(NUM_BLOCKS)]
        used = sum(r > 0 for r in refs)
        assert self.bm.num_used_blocks() == used
        assert self.bm.num_shared_blocks() == sum(r > 1 for r in refs)
        # Free (evictable included) and referenced blocks partition the pool.
        assert self.bm.num_free_blocks() == NUM_BLOCKS - used
        assert 0 <= self.bm.num_cached_blocks() <= self.bm.num_free_blocks()
        if not self.prefix_caching:
            assert self.bm.num_cached_blocks() == 0

    @invariant()
    def sequences_read_their_own_kv(self):
        ids = sorted(self.seqs)
        assert self.bm.num_seqs() == len(ids)
        for s in ids:
            tokens, table = self.seqs[s], self.bm.block_table(s)
            assert self.bm.tokens(s) == tokens and self.bm.num_tokens(s) == len(tokens)
            assert len(table) == ceil(len(tokens) / BS)
            assert [self.kv[table[i // BS] * BS + i % BS] for i in range(len(tokens))] == \
                [tuple(tokens[:i + 1]) for i in range(len(tokens))]
        if ids:  # the batched queries agree with the per-sequence ones
            lens = [len(self.seqs[s]) for s in ids]
            slots = self.bm.slot_mapping(ids, lens, [0] * len(ids))
            assert slots.tolist() == [self.bm.slot(s, i) for s in ids for i in range(len(self.seqs[s]))]
            tables = self.bm.block_tables(ids)
            assert tables.shape == (len(ids), max(ceil(n / BS) for n in lens))
            for row, s in zip(tables.tolist(), ids):
                table = self.bm.block_table(s)
                assert row == table + [-1] * (len(row) - len(table))

    def teardown(self):
        for s in list(self.seqs):
            self.bm.free(s)
        self.bm.check_invariants()
        assert self.bm.num_used_blocks() == 0 and self.bm.num_shared_blocks() == 0
        assert self.bm.num_free_blocks() == NUM_BLOCKS  # plain free and cached together
        assert all(self.bm.refcount(b) == 0 for b in range(NUM_BLOCKS))


class NoPrefixCachingMachine(BlockManagerMachine):
    prefix_caching = False


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
TestNoPrefixCachingMachine = NoPrefixCachingMachine.TestCase
TestNoPrefixCachingMachine.settings = settings(max_examples=40, stateful_step_count=50, deadline=None)


# ---- Self-RAG branches ------------------------------------------------------------------------------

@pytest.mark.parametrize("one_call", [False, True], ids=["token_by_token", "one_call"])
def test_branches_store_the_shared_prompt_once(one_call):
    k, prompt_len, suffix_len, bs = 5, 1000, 200, 16
    bm = BlockManager(200, bs)
    assert bm.allocate(0, list(range(prompt_len))) == 0
    branches = list(range(1, k + 1))
    bm.fork(0, branches)
    copies = []
    if one_call:
        for b in branches:
            copies += bm.append_tokens(b, [b * 1000 + t for t in range(suffix_len)])
    else:
        for t in range(suffix_len):
            for b in branches:
                copies += bm.append_tokens(b, [b * 1000 + t])
    assert bm.num_used_blocks() <= ceil(prompt_len / bs) + k * ceil(suffix_len / bs) + k
    # Every branch copied the prompt's half-filled last block once; the full blocks stay shared.
    assert [src for src, _ in copies] == [prompt_len // bs] * k
    assert bm.num_shared_blocks() == prompt_len // bs
    for b in branches:
        assert bm.block_table(b)[:prompt_len // bs] == bm.block_table(0)[:prompt_len // bs]
        assert bm.num_tokens(b) == prompt_len + suffix_len
    bm.check_invariants()


# ---- prefix caching ---------------------------------------------------------------------------------

def test_second_request_reuses_the_cached_prefix():
    bm = BlockManager(16, 16)
    first = list(range(40))
    assert bm.allocate(1, first) == 0
    assert bm.allocate(2, first + [7, 8, 9]) == 32
    assert bm.block_table(2)[:2] == bm.block_table(1)[:2]
    assert bm.block_table(2)[2] != bm.block_table(1)[2]
    assert [bm.refcount(b) for b in bm.block_table(1)] == [2, 2, 1]
    assert bm.num_shared_blocks() == 2 and bm.num_used_blocks() == 4
    bm.free(1)
    bm.free(2)
    assert bm.num_cached_blocks() == 2 and bm.num_free_blocks() == 16
    assert bm.allocate(3, first) == 32  # still cached after both were freed


def test_a_fully_cached_prompt_leaves_its_last_token_to_compute():
    bm = BlockManager(16, 16)
    bm.allocate(1, list(range(32)))
    assert bm.allocate(2, list(range(32))) == 16
    assert bm.allocate(3, list(range(33))) == 32


def test_blocks_filled_by_decoding_are_cached():
    # Long-form Self-RAG continues from a branch's tokens: its decoded blocks must be found again.
    bm = BlockManager(32, 4)
    bm.allocate(0, list(range(10)))
    bm.fork(0, [1, 2])
    bm.append_tokens(1, [50, 51, 52])
    for t in range(9):
        bm.append_tokens(2, [60 + t])
    next_segment = bm.tokens(2) + [99]  # branch 2 filled 4 blocks (2 of them while decoding)
    for s in (0, 1, 2):
        bm.free(s)
    assert bm.allocate(3, next_segment) == 16
    assert bm.allocate(4, bm.tokens(3)[:10] + [50, 51, 52, 7]) == 12  # branch 1's copied block


def test_a_sequence_freed_mid_prefill_caches_only_its_computed_blocks():
    bm = BlockManager(8, 4)
    bm.allocate(1, list(range(13)))
    bm.free(1, computed_tokens=9)  # preempted after computing 9 of 13 tokens
    assert bm.num_cached_blocks() == 2
    assert bm.allocate(2, list(range(13))) == 8


def test_reuse_prefix_false_computes_everything():
    bm = BlockManager(16, 16)
    bm.allocate(1, list(range(40)))
    assert bm.allocate(2, list(range(40)), False) == 0
    assert bm.num_shared_blocks() == 0


def test_prefix_caching_disabled():
    bm = BlockManager(16, 16, enable_prefix_caching=False)
    assert not bm.prefix_caching()
    bm.allocate(1, list(range(40)))
    bm.free(1)
    assert bm.num_cached_blocks() == 0 and bm.allocate(2, list(range(40))) == 0


def test_eviction_is_least_recently_used_first():
    bm = BlockManager(8, 16)
    a, c = list(range(40)), list(range(100, 140))
    bm.allocate(1, a)
    assert bm.allocate(2, a + [7] * 5) == 32
    bm.allocate(3, c)
    a_blocks, c_blocks = bm.block_table(1)[:2], bm.block_table(3)[:2]
    for s in (1, 2, 3):
        bm.free(s)
    assert bm.num_cached_blocks() == 4 and bm.num_free_blocks() == 8
    # Plain free blocks go first (4 of them); then a's blocks, freed before c's, its deeper block first.
    bm.allocate(4, list(range(1000, 1000 + 16 * 5)))
    assert bm.block_table(4)[-1] == a_blocks[1] and bm.num_cached_blocks() == 3
    # c is still cached; its last token needs one fresh block, which evicts a's first block.
    assert bm.allocate(5, c) == 32
    assert bm.block_table(5) == c_blocks + [a_blocks[0]]
    bm.free(4)
    bm.free(5)
    assert bm.allocate(6, a) == 0


def test_a_cache_hit_refreshes_recency():
    bm = BlockManager(4, 2)
    bm.allocate(1, [1, 1, 0])
    bm.allocate(2, [2, 2, 0])
    ones, twos = bm.block_table(1)[0], bm.block_table(2)[0]
    bm.free(1)
    bm.free(2)
    assert bm.allocate(3, [1, 1, 5]) == 2  # [1 1] is now more recent than [2 2]
    bm.free(3)
    bm.allocate(4, list(range(10, 16)))  # the two free blocks and one eviction
    assert twos in bm.block_table(4) and ones not in bm.block_table(4)
    bm.free(4)
    assert bm.allocate(5, [2, 2, 0]) == 0


# ---- batched queries --------------------------------------------------------------------------------

def test_batched_slot_mapping_and_block_tables():
    bm = BlockManager(16, 4)
    bm.allocate(1, list(range(6)))
    bm.allocate(2, list(range(100, 113)))
    bm.allocate(3, [200])
    slots = bm.slot_mapping([1, 2, 3], [2, 3, 1])
    assert slots.dtype == np.int64 and slots.tolist() == [4, 5, 18, 19, 20, 24]
    assert bm.slot_mapping([2, 1], [2, 2], starts=[3, 0]).tolist() == [11, 12, 0, 1]
    tables = bm.block_tables([3, 1, 2], pad=-7)
    assert tables.dtype == np.int32 and tables.shape == (3, 4)
    assert tables.tolist() == [[6, -7, -7, -7], [0, 1, -7, -7], [2, 3, 4, 5]]
    assert bm.block_tables([]).shape == (0, 0)
    assert bm.slot_mapping([], []).shape == (0,)
    assert bm.slot(2, 12) == 20


# ---- errors -----------------------------------------------------------------------------------------

def test_bad_sizes():
    with pytest.raises(ValueError, match="block_size must be positive, got 0"):
        BlockManager(8, 0)
    with pytest.raises(ValueError, match="num_blocks must be positive, got -1"):
        BlockManager(-1, 16)


def test_unknown_and_duplicate_sequences():
    bm = BlockManager(8, 4)
    bm.allocate(1, [1, 2, 3])
    with pytest.raises(DuplicateSequenceError, match="sequence id 1 already exists") as err:
        bm.allocate(1, [4])
    assert isinstance(err.value, ValueError)
    for call in (lambda: bm.free(7), lambda: bm.append_tokens(7, [1]), lambda: bm.fork(7, [8]),
                 lambda: bm.block_table(7), lambda: bm.tokens(7), lambda: bm.num_tokens(7),
                 lambda: bm.slot(7, 0), lambda: bm.can_append(7, 1), lambda: bm.slot_mapping([1, 7], [1, 1]),
                 lambda: bm.block_tables([7])):
        with pytest.raises(UnknownSequenceError, match="unknown sequence id 7") as err:
            call()
        assert isinstance(err.value, KeyError)
    with pytest.raises(DuplicateSequenceError, match="sequence id 2 already exists"):
        bm.fork(1, [2, 3, 2])
    with pytest.raises(DuplicateSequenceError, match="sequence id 1 already exists"):
        bm.fork(1, [1])
    assert not bm.has(2) and not bm.has(3) and bm.refcount(0) == 1
    bm.check_invariants()


def test_out_of_blocks_leaves_state_unchanged():
    bm = BlockManager(4, 4)
    bm.allocate(1, list(range(6)))
    bm.fork(1, [2])
    before = snapshot(bm), bm.block_table(2), bm.tokens(2)
    with pytest.raises(OutOfBlocksError, match=r"out of KV cache blocks: need 4, only 2 free") as err:
        bm.allocate(3, list(range(100, 113)))
    assert isinstance(err.value, RuntimeError) and (err.value.needed, err.value.available) == (4, 2)
    with pytest.raises(OutOfBlocksError, match=r"need 3, only 2 free"):  # a copy-on-write and 2 new blocks
        bm.append_tokens(2, list(range(10)))
    assert (snapshot(bm), bm.block_table(2), bm.tokens(2)) == before and not bm.has(3)
    assert not bm.can_allocate(13) and not bm.can_append(2, 10) and bm.can_append(2, 6)


def test_bad_indices():
    bm = BlockManager(8, 4)
    bm.allocate(1, list(range(5)))
    with pytest.raises(IndexError, match="token index 5 is outside sequence 1 of 5 tokens"):
        bm.slot(1, 5)
    with pytest.raises(IndexError, match="outside sequence 1 of 5 tokens"):
        bm.slot_mapping([1], [6])
    with pytest.raises(ValueError, match="2 sequences but 1 counts"):
        bm.slot_mapping([1, 1], [1])
    with pytest.raises(IndexError, match="block 8 is outside the pool of 8"):
        bm.refcount(8)
    with pytest.raises(TypeError):
        bm.allocate(2, [1 << 40])


# ---- truncation (rolling back rejected draft tokens) -------------------------------------------------

def test_truncating_into_a_shared_block_copies_it_on_the_next_write():
    bm = BlockManager(8, BS)
    bm.allocate(0, list(range(6)))
    bm.fork(0, [1])
    bm.truncate(1, 3)
    shared = bm.block_table(0)[0]
    assert bm.block_table(1) == [shared] and bm.refcount(shared) == 2 and bm.num_shared_blocks() == 1
    assert bm.tokens(0) == list(range(6)) and bm.tokens(1) == [0, 1, 2]
    copies = bm.append_tokens(1, [9])
    assert copies == [(shared, bm.block_table(1)[0])] and bm.refcount(shared) == 1
    assert bm.tokens(0) == list(range(6))
    bm.check_invariants()


def test_truncating_into_a_cached_block_keeps_the_cache_entry():
    bm = BlockManager(8, BS)
    bm.allocate(0, list(range(9)))
    table = bm.block_table(0)
    bm.truncate(0, 6)
    assert bm.block_table(0) == table[:2] and bm.num_used_blocks() == 2
    # The block held tokens 4..7 when it was indexed: writing 6 and 7 anew goes to a copy.
    assert bm.append_tokens(0, [60, 70]) == [(table[1], bm.block_table(0)[1])]
    assert bm.allocate(1, list(range(9))) == 8 and bm.block_table(1)[:2] == table[:2]
    bm.check_invariants()


def test_truncate_rejects_bad_lengths():
    bm = BlockManager(8, BS)
    bm.allocate(0, list(range(5)))
    with pytest.raises(IndexError, match="cannot truncate sequence 0 of 5 tokens to 6"):
        bm.truncate(0, 6)
    with pytest.raises(IndexError, match="to -1"):
        bm.truncate(0, -1)
    with pytest.raises(UnknownSequenceError):
        bm.truncate(3, 0)
    assert bm.tokens(0) == list(range(5))
