"""Rows of a decode batch that share leading KV blocks, grouped for cascade decode attention.

Branches forked from one prompt (`Engine.fork`), and prompts whose leading blocks came from the prefix cache,
hold the same physical block ids at the start of their block tables. Cascade decode reads such a shared prefix
once per group instead of once per row, so the batch is laid out group by group.

Only blocks wholly written before this step count: a row's new token sits at position context_len - 1, and the
block holding it (even when that token fills it) is the row's own. A block counts for a group only when every
member has it at the same index of its table.

The grouping maximizes the block reads saved, sum over groups of (rows - 1) * prefix_blocks, over every way of
splitting the rows into groups, where a group whose common prefix is shorter than `min_prefix_blocks` saves
nothing. Sorted by their block ids the rows form a trie; the best split has at most one group per trie node,
and each row joins the deepest group above it, which a dynamic programme over the trie finds exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class PrefixGroups:
    """Batch row j is input row order[j]; rows group_start[g]:group_start[g+1] of the batch form group g, whose
    first prefix_blocks[g] blocks are the same physical blocks for every member. A row that shares nothing is
    a group of its own with prefix 0."""
    order: np.ndarray          # int64 [B]
    group_start: np.ndarray    # int32 [G+1]
    prefix_blocks: np.ndarray  # int32 [G]

    @property
    def group_sizes(self) -> np.ndarray:
        return np.diff(self.group_start)

    @property
    def max_group_size(self) -> int:
        return int(self.group_sizes.max(initial=0))

    @property
    def shares(self) -> bool:
        """Whether some group has two or more rows (and so a prefix of at least min_prefix_blocks)."""
        return self.max_group_size >= 2

    @property
    def saved_blocks(self) -> int:
        """Block reads (per kv head) that reading each group's prefix once saves."""
        return int(((self.group_sizes - 1) * self.prefix_blocks).sum())


def written_blocks(context_lens: np.ndarray, block_size: int) -> np.ndarray:
    """Blocks of each row wholly before its newest token (context_lens include that token)."""
    return np.maximum(np.asarray(context_lens, dtype=np.int64) - 1, 0) // block_size


def shared_prefix_groups(block_tables: np.ndarray, context_lens: Sequence[int] | np.ndarray, block_size: int,
                         min_prefix_blocks: int = 1) -> PrefixGroups:
    """Groups decode rows by shared leading blocks. block_tables [B, W] (entries past a row's context are never
    read, -1 padding allowed there), context_lens [B] including each row's new token."""
    tables = np.asarray(block_tables)
    ctx = np.asarray(context_lens, dtype=np.int64)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if min_prefix_blocks < 1:
        raise ValueError(f"min_prefix_blocks must be >= 1, got {min_prefix_blocks}")
    if ctx.ndim != 1:
        raise ValueError(f"context_lens must be one-dimensional, got shape {ctx.shape}")
    n = ctx.shape[0]
    if tables.ndim != 2 or tables.shape[0] != n:
        raise ValueError(f"block_tables must be [{n}, max_blocks] for {n} context lengths, got shape {tables.shape}")
    if n and ctx.min() < 0:
        raise ValueError(f"context length {int(ctx.min())} is negative")
    needed = -(-ctx // block_size)
    if n and needed.max() > tables.shape[1]:
        row = int(needed.argmax())
        raise ValueError(f"row {row} has {int(ctx[row])} tokens in context but its block table holds only "
                         f"{tables.shape[1]} blocks of {block_size}")
    full = written_blocks(ctx, block_size)
    width = int(full.max(initial=0))
    # Keys: each row's written block ids, then -1, which sorts a row before every row it is a prefix of.
    inside = np.arange(width)[None, :] < full[:, None]
    written = tables[:, :width]
    bad = inside & (written < 0)
    if bad.any():
        raise ValueError(f"row {int(np.nonzero(bad)[0][0])}'s block table has a negative block id inside its context")
    keys = np.where(inside, written, -1)

    if n == 0:
        return PrefixGroups(np.zeros(0, np.int64), np.zeros(1, np.int32), np.zeros(0, np.int32))
    sorted_rows = _lexicographic_order(keys)
    # lcp[i]: leading blocks shared by sorted rows i and i + 1.
    s = keys[sorted_rows]
    if width:
        differ = s[1:] != s[:-1]
        first_diff = np.where(differ.any(axis=1), differ.argmax(axis=1), width)
    else:
        first_diff = np.zeros(n - 1, dtype=np.int64)
    lcp = np.minimum(first_diff, np.minimum(full[sorted_rows][1:], full[sorted_rows][:-1]))

    if not (lcp >= min_prefix_blocks).any():
        return PrefixGroups(np.arange(n, dtype=np.int64), np.arange(n + 1, dtype=np.int32), np.zeros(n, np.int32))
    groups = _best_groups(lcp, min_prefix_blocks)
    order = sorted_rows[[p for g in groups for p in g]].astype(np.int64)
    starts = np.zeros(len(groups) + 1, dtype=np.int32)
    np.cumsum([len(g) for g in groups], out=starts[1:])
    # The members' common prefix: that of the first and last of them in sorted order.
    prefix = np.asarray([lcp[g[0]:g[-1]].min() if len(g) > 1 else 0 for g in groups], dtype=np.int32)
    return PrefixGroups(order, starts, prefix)


def _lexicographic_order(keys: np.ndarray) -> np.ndarray:
    """Stable lexicographic order of the rows of keys [n, w] (entries >= -1)."""
    if keys.shape[1] == 0:
        return np.arange(keys.shape[0])
    # Big-endian unsigned bytes compare as the numbers do, so each row sorts as one byte string: a single
    # argsort instead of np.lexsort's pass per column (30x faster at 256 rows of 128 blocks).
    as_bytes = np.ascontiguousarray((keys + 1).astype(">u4"))
    return np.argsort(as_bytes.view(np.dtype((np.void, 4 * keys.shape[1]))).ravel(), kind="stable")


def _best_groups(lcp: np.ndarray, min_prefix: int) -> list[list[int]]:
    """Groups of sorted positions 0..len(lcp), each ascending, ordered by first position."""
    # A group across a pair sharing fewer than min_prefix blocks saves nothing, so each run between such
    # pairs is solved on its own. Plain lists: the runs are short, and numpy calls on them cost more.
    shared = lcp.tolist()
    bounds = [0, *(np.flatnonzero(lcp < min_prefix) + 1).tolist(), len(shared) + 1]
    groups: list[list[int]] = []
    for lo, hi in zip(bounds, bounds[1:]):
        if hi - lo == 1:
            groups.append([lo])
        elif min(shared[lo:hi - 1]) == max(shared[lo:hi - 1]):
            groups.append(list(range(lo, hi)))  # all rows share the same blocks (branches of one fork)
        else:
            groups.extend(_best_groups_in_run(shared, lo, hi))
    return sorted(groups, key=lambda g: g[0])


def _best_groups_in_run(lcp: list[int], lo: int, hi: int) -> list[list[int]]:
    """Best groups of sorted positions lo..hi-1, whose neighbours all share at least min_prefix blocks."""
    # The trie of the run: node v spans rows a..b-1 sharing depth = min lcp of the span; its children are the
    # spans between the positions where lcp equals that depth. Spans of one row are leaves, kept as lists of
    # positions per node. Parents precede children.
    spans, depth, parent = [(lo, hi)], [], [-1]
    kids: list[list[int]] = [[]]
    leaves: list[list[int]] = [[]]
    v = 0
    while v < len(spans):
        a0, b0 = spans[v]
        m = min(lcp[a0:b0 - 1])
        depth.append(m)
        cuts = [a0, *(i + 1 for i in range(a0, b0 - 1) if lcp[i] == m), b0]
        for a, b in zip(cuts, cuts[1:]):
            if b - a == 1:
                leaves[v].append(a)
            else:
                kids[v].append(len(spans))
                spans.append((a, b))
                parent.append(v)
                kids.append([])
                leaves.append([])
        v += 1
    num_nodes = len(spans)
    # best[v][a]: the most saved in v's subtree when the deepest group above v sits at depth a (0: none); a row
    # joining that group gains a, and a group pays its depth once. grouped[v][a]: whether v hosts a group then.
    levels: list[list[int]] = [[0]]
    for v in range(1, num_nodes):
        levels.append(levels[parent[v]] + [depth[parent[v]]])
    best: list[dict[int, int]] = [{} for _ in range(num_nodes)]
    grouped: list[dict[int, bool]] = [{} for _ in range(num_nodes)]
    for v in range(num_nodes - 1, -1, -1):
        d = depth[v]
        with_group = -d + len(leaves[v]) * d + sum(best[c][d] for c in kids[v])
        for a in levels[v]:
            without = len(leaves[v]) * a + sum(best[c][a] for c in kids[v])
            # Ties keep fewer groups: each costs the kernel a set of prefix programs.
            grouped[v][a] = with_group > without
            best[v][a] = max(with_group, without)
    # Walk down with the group each row would join.
    members: dict[int, list[int]] = {}
    singles: list[int] = []
    todo = [(0, 0, -1)]
    while todo:
        v, a, host = todo.pop()
        if grouped[v][a]:
            a, host = depth[v], v
        (members.setdefault(host, []) if host >= 0 else singles).extend(leaves[v])
        todo.extend((c, a, host) for c in kids[v])
    return [sorted(m) for m in members.values()] + [[p] for p in singles]
