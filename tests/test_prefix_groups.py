"""Grouping decode rows by shared leading KV blocks, against a brute force over every split of the rows."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfrag_engine.engine.block_manager import BlockManager
from selfrag_engine.engine.prefix_groups import shared_prefix_groups


# ----------------------------------------------------------------------------------------- references


def brute_written(ctx: int, block_size: int) -> int:
    """Blocks wholly before the newest token (position ctx - 1), counted one token at a time."""
    return sum(1 for b in range(ctx) if (b + 1) * block_size <= ctx - 1)


def brute_lcp(tables, ctx, block_size, rows) -> int:
    """Leading blocks that every listed row has written and holds under the same id."""
    limit = min(brute_written(ctx[r], block_size) for r in rows)
    n = 0
    while n < limit and len({int(tables[r][n]) for r in rows}) == 1:
        n += 1
    return n


def set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in set_partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1:]
        yield [[first]] + part


def brute_best_saving(tables, ctx, block_size, min_prefix) -> int:
    best = 0
    for part in set_partitions(list(range(len(ctx)))):
        total = 0
        for g in part:
            if len(g) > 1:
                p = brute_lcp(tables, ctx, block_size, g)
                total += (len(g) - 1) * p if p >= min_prefix else 0
        best = max(best, total)
    return best


def classes_saving(tables, ctx, block_size, min_prefix) -> int:
    """Saving of the plain rule: rows with the same first min_prefix written blocks form one group."""
    buckets: dict[tuple, list[int]] = {}
    for r in range(len(ctx)):
        if brute_written(ctx[r], block_size) >= min_prefix:
            buckets.setdefault(tuple(int(x) for x in tables[r][:min_prefix]), []).append(r)
    return sum((len(g) - 1) * brute_lcp(tables, ctx, block_size, g) for g in buckets.values() if len(g) > 1)


def check_valid(groups, tables, ctx, block_size, min_prefix):
    """The layout is a permutation in contiguous groups, each with exactly its members' common prefix."""
    n = len(ctx)
    assert sorted(groups.order.tolist()) == list(range(n))
    gs = groups.group_start.tolist()
    assert gs[0] == 0 and gs[-1] == n and all(a < b for a, b in zip(gs, gs[1:]))
    assert groups.group_start.dtype == np.int32 and groups.prefix_blocks.dtype == np.int32
    for g, p in enumerate(groups.prefix_blocks.tolist()):
        rows = groups.order[gs[g]:gs[g + 1]].tolist()
        if len(rows) == 1:
            assert p == 0
        else:
            assert p == brute_lcp(tables, ctx, block_size, rows) and p >= min_prefix


# ----------------------------------------------------------------------------------------- random inputs


def random_forest(rng: np.random.Generator, num_rows: int, block_size: int):
    """Block tables of rows that copy a random leading run of an earlier row's table (any of its blocks, the
    partly filled last one included) and then continue with fresh ids; padding past each context holds ids
    drawn from a small range, so that it collides with real ids."""
    next_id = 0
    tables, ctx = [], []
    for _ in range(num_rows):
        table: list[int] = []
        if tables and rng.random() < 0.75:
            src = tables[int(rng.integers(len(tables)))]
            table = src[:int(rng.integers(0, len(src) + 1))]
        length = len(table) + int(rng.integers(0 if table else 1, 4))
        while len(table) < length:
            table.append(next_id)
            next_id += 1
        tables.append(table)
        # Any context that needs exactly this many blocks: full or partial last block.
        ctx.append(int(rng.integers((len(table) - 1) * block_size + 1, len(table) * block_size + 1)))
    width = max(len(t) for t in tables) + int(rng.integers(0, 3))
    out = np.full((num_rows, width), -1, dtype=np.int32)
    for r, t in enumerate(tables):
        out[r, :len(t)] = t
        pad = width - len(t)
        if pad and rng.random() < 0.5:
            out[r, len(t):] = rng.integers(0, 4, pad)
    return out, ctx


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_rows=st.integers(1, 7), block_size=st.sampled_from([1, 2, 4]),
       min_prefix=st.integers(1, 3))
def test_small_batches_match_brute_force_optimum(seed, num_rows, block_size, min_prefix):
    rng = np.random.default_rng(seed)
    tables, ctx = random_forest(rng, num_rows, block_size)
    groups = shared_prefix_groups(tables, ctx, block_size, min_prefix)
    check_valid(groups, tables, ctx, block_size, min_prefix)
    assert groups.saved_blocks == brute_best_saving(tables, ctx, block_size, min_prefix)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), min_prefix=st.integers(1, 3))
def test_large_batches_valid_and_no_worse_than_grouping_by_leading_blocks(seed, min_prefix):
    rng = np.random.default_rng(seed)
    tables, ctx = random_forest(rng, int(rng.integers(20, 80)), 2)
    groups = shared_prefix_groups(tables, ctx, 2, min_prefix)
    check_valid(groups, tables, ctx, 2, min_prefix)
    assert groups.saved_blocks >= classes_saving(tables, ctx, 2, min_prefix)


def test_nested_forks_split_where_a_deeper_group_saves_more():
    """Two families below a common template: one group over the template would save less than one group per
    family, and two unrelated rows still join the template group."""
    rng = np.random.default_rng(132)
    ids = rng.permutation(1000)
    template, fam_a, fam_b = ids[:3].tolist(), ids[3:13].tolist(), ids[13:23].tolist()
    rows = [template + fam_a + [ids[30 + i]] for i in range(3)] + [template + fam_b + [ids[40 + i]] for i in range(3)]
    rows += [template + [ids[50]], template + [ids[51]]]
    order = rng.permutation(len(rows))
    tables = np.full((len(rows), 14), -1, dtype=np.int32)
    for r, i in enumerate(order):
        tables[r, :len(rows[i])] = rows[i]
    ctx = [len(rows[i]) * 4 for i in order]  # full last blocks, which hold the new token and do not count
    groups = shared_prefix_groups(tables, ctx, 4, 2)
    check_valid(groups, tables, ctx, 4, 2)
    sizes_prefix = sorted(zip(groups.group_sizes.tolist(), groups.prefix_blocks.tolist()))
    assert sizes_prefix == [(2, 3), (3, 13), (3, 13)]


def test_unrelated_rows_are_singletons_in_a_stable_layout():
    rng = np.random.default_rng(149)
    n = int(rng.integers(2, 30))
    tables = rng.permutation(n * 6)[:n * 5].reshape(n, 5).astype(np.int32)
    ctx = rng.integers(1, 5 * 8 + 1, n).tolist()
    groups = shared_prefix_groups(tables, ctx, 8)
    assert not groups.shares and groups.saved_blocks == 0
    assert groups.group_sizes.tolist() == [1] * n and groups.prefix_blocks.tolist() == [0] * n


def test_empty_batch_and_bad_inputs():
    groups = shared_prefix_groups(np.zeros((0, 3), np.int32), [], 16)
    assert groups.order.shape == (0,) and groups.group_start.tolist() == [0] and not groups.shares
    with pytest.raises(ValueError, match="holds only 2 blocks"):
        shared_prefix_groups(np.zeros((1, 2), np.int32), [40], 16)
    with pytest.raises(ValueError, match="negative block id"):
        shared_prefix_groups(np.asarray([[3, -1, 5]], np.int32), [40], 16)
    with pytest.raises(ValueError, match="block_tables must be"):
        shared_prefix_groups(np.zeros((2, 2), np.int32), [4], 16)
    with pytest.raises(ValueError, match="min_prefix_blocks"):
        shared_prefix_groups(np.zeros((1, 2), np.int32), [4], 16, 0)


# ------------------------------------------------------------------------------- the real block manager


def test_block_manager_forks_and_copy_on_write():
    """Tables from the C++ block manager: forked branches share the parent's full blocks; their copy-on-write'd
    partial block and everything after it are their own; a repeated prompt shares through the prefix cache."""
    rng = np.random.default_rng(177)
    bs = 4
    bm = BlockManager(200, bs, True)
    prompt_len = int(rng.integers(9, 30)) | 1  # odd: the last block is partly filled
    prompt = rng.integers(3, 1000, prompt_len).tolist()
    bm.allocate(0, prompt)
    kids = [1, 2, 3]
    bm.fork(0, kids)
    bm.free(0)
    copies = []
    for k in kids:
        copies += bm.append_tokens(k, rng.integers(3, 1000, int(rng.integers(1, 9))).tolist())
    assert copies, "appending into the shared partial block copies it"
    # A grandchild forked from branch 1 after it grew, then one more token each.
    bm.fork(1, [4])
    for k in (1, 4):
        bm.append_tokens(k, rng.integers(3, 1000, 1 + int(rng.integers(0, 6))).tolist())
    # An unrelated prompt, and a second copy of it that the prefix cache serves.
    other = rng.integers(3, 1000, 13).tolist()
    bm.allocate(5, other)
    bm.allocate(6, other + [7])
    bm.check_invariants()
    seqs = [3, 5, 1, 6, 4, 2]
    tables = bm.block_tables(seqs, -1)
    ctx = [bm.num_tokens(s) for s in seqs]
    groups = shared_prefix_groups(tables, ctx, bs, 2)
    check_valid(groups, tables, ctx, bs, 2)
    assert groups.saved_blocks == brute_best_saving(tables, ctx, bs, 2)
    gs = groups.group_start.tolist()
    members = {frozenset(seqs[r] for r in groups.order[a:b].tolist()): int(p)
               for a, b, p in zip(gs, gs[1:], groups.prefix_blocks.tolist())}
    # The forked family shares at least the prompt's full blocks (written before fork: prompt_len // bs).
    family = next(m for m in members if 2 in m)
    assert {1, 2, 3} <= family and members[family] >= prompt_len // bs
    assert frozenset({5, 6}) in members and members[frozenset({5, 6})] == 3  # 13 tokens -> 3 full blocks
