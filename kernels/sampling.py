"""One-pass sampling with fused reflection-token scoring: one program per row, the row read in vocab tiles.

Shapes and dtypes
  logits            [B, V]  fp16 / bf16 / fp32 (any row stride; the vocab dim must be contiguous)
  temperature       [B]     fp32; 0 (or less) is greedy
  top_p             [B]     fp32 in (0, 1]; >= 1 disables top-p
  top_k             [B]     int32; 0 or >= V disables top-k
  seeds             [B]     int64; one seed is one draw (callers mix the step into it)
  group_token_ids   [G]     int32, the reflection groups concatenated
  group_offsets     [n+1]   int32, group i is group_token_ids[offsets[i]:offsets[i+1]]
  returns SampleTensors: tokens [B] int64, logprobs [B] fp32, lse [B] fp32, group_logprobs / group_probs
  [B, G] fp32, topn_ids [B, n] int64 / topn_logprobs [B, n] fp32 (descending, ties to the lower id)

Every log-probability, the log-sum-exp and the group values are of the raw logits at temperature 1: the
full-vocabulary log-softmax of the unscaled row, whatever the sampling temperature and truncation. That is
what Self-RAG's critique scores read and what vLLM reports for greedy decoding. group_probs is
p_i / sum of p over its group (0 for a group whose logits are all -inf).

Sampling (temperature T > 0) draws from softmax(logits / T) truncated by top-k, then by top-p over the
top-k-renormalized distribution: the smallest set of highest-probability tokens whose mass reaches top_p
(the top token always kept). Both truncations are a threshold on the logit value, and every token tied
with the threshold value is kept, so top_k=1 keeps all tokens tied at the maximum. The draw is the inverse
CDF of the kept distribution in token-id order at one Philox uniform u = tl.rand(seed, 0): the first kept
token whose running mass exceeds u times the kept mass. It is deterministic for a seed and independent of
the batch; one uniform per row keeps the cost off the vocabulary (a uniform per token, as Gumbel-max needs,
costs a Philox evaluation per logit). Greedy (T == 0) is the argmax with ties to the lowest id, as
torch.argmax.

Thresholds are found without sorting. F(t) = sum over tokens with logit >= t of a weight (1 for a count,
exp((x - max) / T) for probability mass) is non-increasing in t, and the threshold is the largest logit value
with F >= target. Each pass over the row evaluates F at NPIV evenly spaced pivots of the current bracket
[lo, hi] at once (NPIV - 1 sub-brackets) and keeps the sub-bracket that holds the crossing, its lower end
snapped to the smallest logit inside it; the search ends when that sub-bracket holds one distinct value:
after 2-6 passes (mostly 3-4) on random rows at V = 32016 in fp32 and fp16. Tiles
with no logit inside the bracket skip the pivot work, so later passes cost a read of the row. Plain top-p
starts from a bracket whose lower end provably holds mass >= top_p (tokens below it hold less than
1 - top_p in total), which keeps the first pass on the head of the distribution.

Non-finite logits have defined results (the torch path, layers/sampler.py, gives the same): a NaN logit counts
as -inf (never drawn, probability 0, log-probability -inf); +inf counts as the largest finite float32, so a
row's +inf tokens share its mass evenly and its lse stays finite (~3.4e38); a row with no finite logit (all
-inf or NaN) has no distribution: its token is 0, its top-n ids are 0..n-1, its lse is -inf and every
log-probability of the row (token, groups, top-n) is NaN, its group probabilities 0. No id is ever -1.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["SampleTensors", "fused_sample", "check_sample_args", "MAX_TOP_N"]

MAX_TOP_N = 20
_BLOCK_V = 2048    # tile of the streaming passes (log-sum-exp, draw)
_BLOCK_S = 256     # tile of the pivot passes, whose [tile, NPIV] intermediates live in registers
_NPIV = 16         # pivots per search pass, the bracket's upper end included
_MAX_ITERS = 48    # guard for pathological float spacing; a typical search ends in a handful of passes
_NUM_WARPS = 8
# Non-finite logits, as every load reads them: NaN counts as -inf, +inf as the largest finite float32.
_FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)
# Left to itself, ptxas holds this kernel to 128 registers a thread on sm_90 (room for two programs per SM) and
# then spills whenever top-n is asked for: 16-32 bytes stored and 40-56 loaded per thread under triton 3.6 and
# 3.9. A decode batch has fewer rows than the GPU has SMs, so a second resident program buys nothing; without the
# cap the kernel takes about 150 registers and spills nothing (bench/results/aot-sm90-triton*.md, maxnreg=255).
_MAX_REGISTERS = 255


class SampleTensors(NamedTuple):
    """What `fused_sample` returns (the optional fields are None when not asked for)."""
    tokens: torch.Tensor                        # [B] int64
    logprobs: torch.Tensor                      # [B] fp32, of the chosen tokens (temperature 1)
    lse: torch.Tensor                           # [B] fp32, log-sum-exp of the raw row
    group_logprobs: torch.Tensor | None = None  # [B, G] fp32, full-vocabulary log-probabilities
    group_probs: torch.Tensor | None = None     # [B, G] fp32, normalized within each group
    topn_ids: torch.Tensor | None = None        # [B, n] int64
    topn_logprobs: torch.Tensor | None = None   # [B, n] fp32


@triton.jit
def _search_threshold(row_ptr, vocab, lo, hi, f_hi, target, rel_frac, m, inv_t,
                      COUNT: tl.constexpr, BLOCK: tl.constexpr, NPIV: tl.constexpr, MAX_ITERS: tl.constexpr):
    """Largest logit value t of one row with F(t) >= target (see the module docstring).

    lo, hi: fp32 scalars with F(lo) >= target > F(hi) = f_hi; hi is a value of the row. With rel_frac > 0 the
    target is rel_frac * F(lo), measured in the first pass. COUNT weighs tokens 1, else exp((x - m) * inv_t).
    Returns (t, F(t), F(just above t)) as fp32 scalars; the third is exact once the search converged.
    """
    offs = tl.arange(0, BLOCK)
    j = tl.arange(0, NPIV)
    frac = j.to(tl.float32) / (NPIV - 1)
    res = lo
    f_res = f_hi
    f_above = f_hi
    it = tl.zeros([], dtype=tl.int32)
    done = tl.zeros([], dtype=tl.int32)
    while (done == 0) & (it < MAX_ITERS):
        # The last pivot is hi itself, so its column yields F(hi) and the largest logit below hi.
        piv = tl.where(j == NPIV - 1, hi, tl.minimum(lo + (hi - lo) * frac, hi))
        # Per-lane partials, combined once per pass: in-range tiles then cost no cross-thread reduction.
        f2 = tl.zeros([BLOCK, NPIV], dtype=tl.float32)
        nxt2 = tl.full([BLOCK, NPIV], float("inf"), dtype=tl.float32)
        prv2 = tl.full([BLOCK, NPIV], float("-inf"), dtype=tl.float32)
        for start in range(0, vocab, BLOCK):
            cols = start + offs
            x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            x = tl.where(x == x, tl.minimum(x, _FLT_MAX), float("-inf"))
            inr = (x >= lo) & (x < hi)
            if tl.max(inr.to(tl.int32), axis=0) > 0:
                if COUNT:
                    w = inr.to(tl.float32)
                else:
                    w = tl.where(inr, tl.exp((x - m) * inv_t), 0.0)
                ge = inr[:, None] & (x[:, None] >= piv[None, :])
                lt = inr[:, None] & (x[:, None] < piv[None, :])
                f2 += tl.where(ge, w[:, None], 0.0)
                nxt2 = tl.minimum(nxt2, tl.where(ge, x[:, None], float("inf")))
                prv2 = tl.maximum(prv2, tl.where(lt, x[:, None], float("-inf")))
        f = tl.sum(f2, axis=0) + f_hi
        nxt = tl.min(nxt2, axis=0)
        prv = tl.max(prv2, axis=0)
        f_lo_piv = tl.sum(tl.where(j == 0, f, 0.0), axis=0)
        target = tl.where((rel_frac > 0) & (it == 0), rel_frac * f_lo_piv, target)
        # F is non-increasing in the pivot, so the pivots that reach the target are a prefix.
        jstar = tl.max(tl.where(f >= target, j, 0), axis=0)
        nxt_sel = tl.min(tl.where(j == jstar, nxt, float("inf")), axis=0)
        f_sel = tl.sum(tl.where(j == jstar, f, 0.0), axis=0)
        prv_next = tl.max(tl.where(j == jstar + 1, prv, float("-inf")), axis=0)
        f_next = tl.sum(tl.where(j == jstar + 1, f, 0.0), axis=0)
        hi_next = tl.max(tl.where(j == jstar + 1, piv, float("-inf")), axis=0)
        # Only possible in the first pass, where hi is the row maximum and nothing lies above it.
        hit_hi = f_hi >= target
        res = tl.where(hit_hi, hi, nxt_sel)
        f_res = tl.where(hit_hi, f_hi, f_sel)
        f_above = tl.where(hit_hi, 0.0, f_next)
        # Converged when [pivot j*, pivot j*+1) holds a single distinct logit: that logit is the threshold.
        done = (hit_hi | (nxt_sel == prv_next)).to(tl.int32)
        lo = nxt_sel
        hi = hi_next
        f_hi = f_next
        it += 1
    return res, f_res, f_above


# top_n only sizes stores: specializing on its value (1, multiples of 16) would only compile more variants.
@triton.jit(do_not_specialize=["top_n"])
def _fused_sample_kernel(
    logits_ptr, stride_row, vocab,
    temp_ptr, top_p_ptr, top_k_ptr, seed_ptr,
    gids_ptr, goff_ptr, n_gtok, n_groups,
    tok_ptr, lp_ptr, lse_ptr, glp_ptr, gp_ptr, topn_id_ptr, topn_lp_ptr, top_n,
    GPAD: tl.constexpr, NGPAD: tl.constexpr, TOPN_PAD: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr, NPIV: tl.constexpr, MAX_ITERS: tl.constexpr,
):
    """One row per program; shapes and semantics in the module docstring. GPAD / TOPN_PAD are 0 when the
    groups / top-n are not asked for."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    temp = tl.load(temp_ptr + row)
    sampling = temp > 0
    # Greedy rows never use the tempered sums; 1.0 keeps them finite. The cap keeps 0 * inv_t at 0 for
    # temperatures so small that 1/T overflows.
    inv_t = tl.where(sampling, tl.minimum(1.0 / tl.where(sampling, temp, 1.0), 1e30), 1.0)

    # Pass 1: max, log-sum-exp at T=1 and at T, argmax (first index), ties at the max, finite range. Each lane
    # keeps its own running values and the lanes are combined once after the loop, so the loop body has no
    # cross-thread reduction.
    offs_v = tl.arange(0, BLOCK_V)
    m_v = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    s1_v = tl.zeros([BLOCK_V], dtype=tl.float32)
    st_v = tl.zeros([BLOCK_V], dtype=tl.float32)
    nmax_v = tl.zeros([BLOCK_V], dtype=tl.float32)
    arg_v = tl.zeros([BLOCK_V], dtype=tl.int32)
    mn_v = tl.full([BLOCK_V], float("inf"), dtype=tl.float32)
    nfin_v = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + offs_v
        x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        x = tl.where(x == x, tl.minimum(x, _FLT_MAX), float("-inf"))
        up = x > m_v
        m_new = tl.maximum(m_v, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        # One exponential per sum: of the smaller of (x, lane max) against the larger.
        low = tl.minimum(x, m_v) - m_safe
        e1 = tl.exp(low)
        et = tl.exp(low * inv_t)
        s1_v = tl.where(up, s1_v * e1 + 1.0, s1_v + e1)
        st_v = tl.where(up, st_v * et + 1.0, st_v + et)
        nmax_v = tl.where(up, 1.0, tl.where(x == m_v, nmax_v + 1.0, nmax_v))
        arg_v = tl.where(up, cols, arg_v)
        fin = x > float("-inf")
        mn_v = tl.minimum(mn_v, tl.where(fin, x, float("inf")))
        nfin_v += fin.to(tl.float32)
        m_v = m_new
    m = tl.max(m_v, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s1 = tl.sum(s1_v * tl.exp(m_v - m_safe), axis=0)
    s_t = tl.sum(st_v * tl.exp((m_v - m_safe) * inv_t), axis=0)
    at_max = m_v == m
    n_max = tl.sum(tl.where(at_max, nmax_v, 0.0), axis=0)
    # A lane's arg is its first maximum, so the lowest arg among lanes at the row max is torch.argmax's.
    best = tl.min(tl.where(at_max, arg_v, 2147483647), axis=0)
    mn = tl.min(mn_v, axis=0)
    n_fin = tl.sum(nfin_v, axis=0)
    lse = m + tl.log(s1)
    tl.store(lse_ptr + row, lse)

    token = best
    if sampling & (m > float("-inf")):
        thr = tl.full([], float("-inf"), dtype=tl.float32)
        k = tl.load(top_k_ptr + row)
        p = tl.load(top_p_ptr + row)
        use_k = (k > 0) & (k.to(tl.float32) < n_fin)
        z_keep = s_t
        zero = tl.zeros([], dtype=tl.float32)
        if use_k:
            thr, n_k, n_k_above = _search_threshold(row_ptr, vocab, mn, m, n_max, zero + k, zero, m, inv_t,
                                                    True, BLOCK_S, NPIV, MAX_ITERS)
            if p >= 1.0:
                z_keep = zero
                for start in range(0, vocab, BLOCK_V):
                    cols = start + offs_v
                    x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
                    x = tl.where(x == x, tl.minimum(x, _FLT_MAX), float("-inf"))
                    z_keep += tl.sum(tl.where(x >= thr, tl.exp((x - m) * inv_t), 0.0), axis=0)
        if p < 1.0:
            # With top-k, top-p runs over the top-k set: its mass is F(thr), measured in the search's first
            # pass (rel). Without, tokens below `bound` each weigh < (1 - p) * s_t / (2 * n_fin), so together
            # they hold less than 1 - p of the mass and the threshold lies above it.
            bound = tl.maximum(mn, m + tl.log((1.0 - p) * s_t / (2.0 * n_fin)) / inv_t)
            lo = tl.where(use_k, thr, bound)
            target = tl.where(use_k, zero, p * s_t)
            rel = tl.where(use_k, p, zero)
            thr, z_keep, n_p_above = _search_threshold(row_ptr, vocab, lo, m, n_max, target, rel, m, inv_t,
                                                       False, BLOCK_S, NPIV, MAX_ITERS)
        # Inverse CDF in token-id order: the first kept token whose running mass exceeds u * z_keep. One
        # Philox draw per row, and the scan stops at the tile that holds the draw.
        goal = tl.rand(tl.load(seed_ptr + row), tl.full([], 0, dtype=tl.int32)) * z_keep
        acc = zero
        start = tl.zeros([], dtype=tl.int32)
        found = tl.zeros([], dtype=tl.int32)
        while (found == 0) & (start < vocab):
            cols = start + offs_v
            x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            x = tl.where(x == x, tl.minimum(x, _FLT_MAX), float("-inf"))
            w = tl.where(x >= thr, tl.exp((x - m) * inv_t), 0.0)
            t_sum = tl.sum(w, axis=0)
            if acc + t_sum > goal:
                # Only the tile holding the draw pays for the prefix sum.
                first = tl.min(tl.where(acc + tl.cumsum(w, axis=0) > goal, cols, vocab), axis=0)
                if first < vocab:
                    token = first
                    found = found + 1
            acc += t_sum
            start += BLOCK_V
        # If the scan's total rounds below u * z_keep (a ~1e-7 event), the most likely token stands in.
    tl.store(tok_ptr + row, token.to(tl.int64))
    x_tok = tl.load(row_ptr + token).to(tl.float32)
    x_tok = tl.where(x_tok == x_tok, tl.minimum(x_tok, _FLT_MAX), float("-inf"))
    tl.store(lp_ptr + row, x_tok - lse)

    if GPAD > 0:
        g = tl.arange(0, GPAD)
        gmask = g < n_gtok
        gid = tl.load(gids_ptr + g, mask=gmask, other=0)
        gx = tl.load(row_ptr + gid, mask=gmask, other=float("-inf")).to(tl.float32)
        gx = tl.where(gx == gx, tl.minimum(gx, _FLT_MAX), float("-inf"))
        q = tl.arange(0, NGPAD)
        ends = tl.load(goff_ptr + 1 + q, mask=q < n_groups, other=2147483647)
        grp = tl.sum((g[:, None] >= ends[None, :]).to(tl.int32), axis=1)
        same = (grp[:, None] == grp[None, :]) & gmask[None, :]
        # Normalized within the group from its own max, so groups far below the row max do not underflow.
        gmax = tl.max(tl.where(same, gx[None, :], float("-inf")), axis=1)
        gsafe = tl.where(gmax == float("-inf"), 0.0, gmax)
        den = tl.sum(tl.where(same, tl.exp(gx[None, :] - gsafe[:, None]), 0.0), axis=1)
        gp = tl.where(gmax == float("-inf"), 0.0, tl.exp(gx - gsafe) / tl.where(den > 0, den, 1.0))
        tl.store(glp_ptr + row * n_gtok + g, gx - lse, mask=gmask)
        tl.store(gp_ptr + row * n_gtok + g, gp, mask=gmask)

    if TOPN_PAD > 0:
        n_f = tl.zeros([], dtype=tl.float32) + top_n
        if n_f > n_fin:
            t_n = tl.full([], float("-inf"), dtype=tl.float32)
            n_above = n_fin
        else:
            t_n, f_n, n_above = _search_threshold(row_ptr, vocab, mn, m, n_max, n_f, n_f * 0.0, m, inv_t,
                                                  True, BLOCK_S, NPIV, MAX_ITERS)
        # Gather: every logit above t_n, then the lowest ids among those equal to it, into slots 0..n-1.
        s = tl.arange(0, TOPN_PAD)
        cv = tl.full([TOPN_PAD], float("-inf"), dtype=tl.float32)
        ci = tl.zeros([TOPN_PAD], dtype=tl.int32)
        n_gt_before = n_above.to(tl.int32)
        n_eq_take = top_n - n_gt_before
        base_gt = tl.zeros([], dtype=tl.int32)
        base_eq = tl.zeros([], dtype=tl.int32)
        offs_s = tl.arange(0, BLOCK_S)
        for start in range(0, vocab, BLOCK_S):
            cols = start + offs_s
            valid = cols < vocab
            x = tl.load(row_ptr + cols, mask=valid, other=float("-inf")).to(tl.float32)
            x = tl.where(x == x, tl.minimum(x, _FLT_MAX), float("-inf"))
            gt = valid & (x > t_n)
            eq = valid & (x == t_n)
            r_gt = base_gt + tl.cumsum(gt.to(tl.int32), axis=0) - 1
            r_eq = base_eq + tl.cumsum(eq.to(tl.int32), axis=0) - 1
            slot = tl.where(gt, r_gt, tl.where(eq & (r_eq < n_eq_take), n_gt_before + r_eq, -1))
            slot = tl.where(slot < top_n, slot, -1)
            base_gt += tl.sum(gt.to(tl.int32), axis=0)
            base_eq += tl.sum(eq.to(tl.int32), axis=0)
            if tl.max(slot, axis=0) >= 0:
                hit = slot[:, None] == s[None, :]
                has = tl.max(hit.to(tl.int32), axis=0) > 0
                cv = tl.where(has, tl.max(tl.where(hit, x[:, None], float("-inf")), axis=0), cv)
                ci = tl.where(has, tl.max(tl.where(hit, cols[:, None], -1), axis=0), ci)
        # Rank = number of slots ordered before (higher value, or equal value and lower id); place by rank.
        ok = s < top_n
        before = ok[None, :] & ((cv[None, :] > cv[:, None]) | ((cv[None, :] == cv[:, None]) & (ci[None, :] < ci[:, None])))
        rank = tl.sum(before.to(tl.int32), axis=1)
        place = (rank[None, :] == s[:, None]) & ok[None, :]
        out_v = tl.max(tl.where(place, cv[None, :], float("-inf")), axis=1)
        out_i = tl.max(tl.where(place, ci[None, :], -1), axis=1)
        tl.store(topn_id_ptr + row * top_n + s, out_i.to(tl.int64), mask=ok)
        tl.store(topn_lp_ptr + row * top_n + s, out_v - lse, mask=ok)


def _check_vec(name: str, t, batch: int, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.shape != (batch,):
        raise ValueError(f"{name} must have shape [{batch}], got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, logits on {device}")


def check_sample_args(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                      seeds: torch.Tensor, top_n: int) -> None:
    """Raises ValueError unless the arguments have the shapes, dtypes and device of the docstring above."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a [batch, vocab] tensor, got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"logits must be float16, bfloat16 or float32, got {logits.dtype}")
    batch, vocab = logits.shape
    if vocab == 0:
        raise ValueError("logits have an empty vocabulary")
    if vocab >= 2**31 - 1:
        raise ValueError(f"vocabulary of {vocab} does not fit int32 ids")
    dev = logits.device
    _check_vec("temperature", temperature, batch, torch.float32, dev)
    _check_vec("top_p", top_p, batch, torch.float32, dev)
    _check_vec("top_k", top_k, batch, torch.int32, dev)
    _check_vec("seeds", seeds, batch, torch.int64, dev)
    if isinstance(top_n, bool) or not isinstance(top_n, int) or not 0 <= top_n <= MAX_TOP_N:
        raise ValueError(f"top_n must be an int in [0, {MAX_TOP_N}], got {top_n!r}")
    if top_n > vocab:
        raise ValueError(f"top_n={top_n} exceeds the vocabulary size {vocab}")


def fused_sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                 seeds: torch.Tensor, groups: tuple[torch.Tensor, torch.Tensor] | None = None,
                 top_n: int = 0, *, block_v: int = _BLOCK_V, block_s: int = _BLOCK_S) -> SampleTensors:
    """Samples one token per row and scores it, the reflection groups and the top-n in the same pass.

    groups: (group_token_ids [G] int32, group_offsets [n_groups + 1] int32) on the logits' device, or None.
    top_n: 0..20 (at most V). Tensor values (temperatures, ids) are checked only where that needs no device
    sync. block_v / block_s: tile sizes (powers of two) of the streaming and the pivot passes.
    """
    check_sample_args(logits, temperature, top_p, top_k, seeds, top_n)
    for name, blk in (("block_v", block_v), ("block_s", block_s)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {blk}")
    batch, vocab = logits.shape
    dev = logits.device
    temperature, top_p, top_k, seeds = (t.contiguous() for t in (temperature, top_p, top_k, seeds))
    if groups is not None:
        if not (isinstance(groups, (tuple, list)) and len(groups) == 2):
            raise ValueError("groups must be a (group_token_ids, group_offsets) pair of tensors")
        gids, goff = groups
        for name, t in (("group_token_ids", gids), ("group_offsets", goff)):
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.int32:
                raise ValueError(f"{name} must be a 1-D int32 tensor")
            if t.device != dev:
                raise ValueError(f"{name} is on {t.device}, logits on {dev}")
        if gids.numel() == 0 or goff.numel() < 2:
            raise ValueError("groups must hold at least one non-empty group")
        if goff.device.type == "cpu":
            offs = goff.tolist()
            if offs[0] != 0 or offs[-1] != gids.numel() or any(b <= a for a, b in zip(offs, offs[1:])):
                raise ValueError(f"group_offsets {offs} must rise strictly from 0 to {gids.numel()}")
            if int(gids.min()) < 0 or int(gids.max()) >= vocab:
                raise ValueError(f"group token ids must lie in [0, {vocab})")
        gids, goff = gids.contiguous(), goff.contiguous()
    if logits.stride(1) != 1:
        logits = logits.contiguous()

    tokens = torch.empty(batch, dtype=torch.int64, device=dev)
    logprobs = torch.empty(batch, dtype=torch.float32, device=dev)
    lse = torch.empty(batch, dtype=torch.float32, device=dev)
    n_gtok = n_groups = 0
    gpad = ngpad = 0
    glp = gp = tokens  # placeholders, never touched when GPAD == 0
    if groups is not None:
        n_gtok, n_groups = gids.numel(), goff.numel() - 1
        gpad, ngpad = max(2, triton.next_power_of_2(n_gtok)), max(2, triton.next_power_of_2(n_groups))
        glp = torch.empty(batch, n_gtok, dtype=torch.float32, device=dev)
        gp = torch.empty(batch, n_gtok, dtype=torch.float32, device=dev)
    else:
        gids = goff = top_k
    tn_ids = tn_lp = tokens
    if top_n > 0:
        tn_ids = torch.empty(batch, top_n, dtype=torch.int64, device=dev)
        tn_lp = torch.empty(batch, top_n, dtype=torch.float32, device=dev)
    out = SampleTensors(tokens, logprobs, lse, glp if groups is not None else None,
                        gp if groups is not None else None, tn_ids if top_n > 0 else None,
                        tn_lp if top_n > 0 else None)
    if batch == 0:
        return out
    _fused_sample_kernel[(batch,)](
        logits, logits.stride(0), vocab,
        temperature, top_p, top_k, seeds,
        gids, goff, n_gtok, n_groups,
        tokens, logprobs, lse, glp, gp, tn_ids, tn_lp, top_n,
        GPAD=gpad, NGPAD=max(ngpad, 2), TOPN_PAD=max(2, triton.next_power_of_2(top_n)) if top_n > 0 else 0,
        BLOCK_V=block_v, BLOCK_S=block_s, NPIV=_NPIV, MAX_ITERS=_MAX_ITERS, num_warps=_NUM_WARPS,
        maxnreg=_MAX_REGISTERS,
    )
    return out
