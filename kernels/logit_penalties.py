"""Penalties, bias and min-p applied to a batch of logits rows in one launch, before the sampler: one program per
row, the row read in vocab tiles (twice when min-p is asked for: the processed row's maximum first).

Shapes and dtypes
  logits        [R, V]  fp16 / bf16 / fp32 (any row stride; the vocab dim contiguous)
  counts        [R, V]  int32, how often each token occurs in the row's generated tokens (or None)
  seen          [R, V]  int8 / bool, 1 where the token occurs in the row's prompt or generated tokens (or None)
  bias          [R, V]  fp32, added to the logits (or None)
  presence      [R]     fp32   frequency [R] fp32   repetition [R] fp32 (> 0; 1 is off)
  min_p         [R]     fp32 in [0, 1] (0 is off)  temperature [R] fp32 (min-p is skipped on rows with T <= 0)
  returns       [R, V]  fp32, the processed logits

Per row, in vLLM's order (bias, then the penalties, then min-p at the sampling temperature):
  x = logits + bias
  x = where(seen, where(x > 0, x / repetition, x * repetition), x)      transformers' / vLLM's repetition penalty
  x = x - frequency * counts - presence * (counts > 0)                  OpenAI's presence and frequency penalties
  x = where((x - max(x)) / T < log(min_p), -inf, x)                     p < min_p * p_max at temperature T
NaN logits count as -inf and +inf as the largest finite float32, as the sampler reads them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["apply_penalties"]

_BLOCK_V = 1024
_FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _process_tile(row_ptr, cols, vocab, row, stride_c, stride_s, stride_b, counts_ptr, seen_ptr, bias_ptr,
                  pres, freq, rep, HAS_COUNTS: tl.constexpr, HAS_SEEN: tl.constexpr, HAS_BIAS: tl.constexpr):
    inb = cols < vocab
    x = tl.load(row_ptr + cols, mask=inb, other=float("-inf")).to(tl.float32)
    x = tl.where(x == x, tl.minimum(x, _FLT_MAX), float("-inf"))
    if HAS_BIAS:
        x += tl.load(bias_ptr + row * stride_b + cols, mask=inb, other=0.0)
    if HAS_SEEN:
        seen = tl.load(seen_ptr + row * stride_s + cols, mask=inb, other=0) != 0
        x = tl.where(seen, tl.where(x > 0, x / rep, x * rep), x)
    if HAS_COUNTS:
        c = tl.load(counts_ptr + row * stride_c + cols, mask=inb, other=0).to(tl.float32)
        x = x - freq * c - tl.where(c > 0, pres, 0.0)
    return x


@triton.jit
def _penalties_kernel(logits_ptr, stride_row, out_ptr, vocab, counts_ptr, stride_c, seen_ptr, stride_s,
                      bias_ptr, stride_b, pres_ptr, freq_ptr, rep_ptr, min_p_ptr, temp_ptr,
                      HAS_COUNTS: tl.constexpr, HAS_SEEN: tl.constexpr, HAS_BIAS: tl.constexpr,
                      HAS_MIN_P: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    out_row = out_ptr + row * vocab
    pres = tl.load(pres_ptr + row)
    freq = tl.load(freq_ptr + row)
    rep = tl.load(rep_ptr + row)
    offs = tl.arange(0, BLOCK_V)
    m_v = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + offs
        x = _process_tile(row_ptr, cols, vocab, row, stride_c, stride_s, stride_b, counts_ptr, seen_ptr, bias_ptr,
                          pres, freq, rep, HAS_COUNTS, HAS_SEEN, HAS_BIAS)
        m_v = tl.maximum(m_v, x)
        tl.store(out_row + cols, x, mask=cols < vocab)
    if HAS_MIN_P:
        min_p = tl.load(min_p_ptr + row)
        temp = tl.load(temp_ptr + row)
        if (min_p > 0) & (temp > 0):
            m = tl.max(m_v, axis=0)
            # p_i / p_max = exp((x_i - max) / T) < min_p, in log space: no underflow for far tails.
            cut = m + temp * tl.log(min_p)
            for start in range(0, vocab, BLOCK_V):
                cols = start + offs
                x = tl.load(out_row + cols, mask=cols < vocab, other=float("-inf"))
                tl.store(out_row + cols, tl.where(x < cut, float("-inf"), x), mask=cols < vocab)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor | None, seen: torch.Tensor | None,
                    bias: torch.Tensor | None, presence: torch.Tensor, frequency: torch.Tensor,
                    repetition: torch.Tensor, min_p: torch.Tensor, temperature: torch.Tensor,
                    use_min_p: bool = True) -> torch.Tensor:
    """The processed logits, fp32 [R, V] (see the module docstring); `use_min_p` False skips the second pass."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits must be contiguous along the vocabulary")
    for name, t in (("counts", counts), ("seen", seen), ("bias", bias)):
        if t is not None and (t.shape != logits.shape or t.stride(1) != 1):
            raise ValueError(f"{name} must be [R, V] like the logits, contiguous along V; got {tuple(t.shape)}")
    for name, t in (("presence", presence), ("frequency", frequency), ("repetition", repetition),
                    ("min_p", min_p), ("temperature", temperature)):
        if t.shape != (rows,) or t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 [R]; got {t.dtype} {tuple(t.shape)}")
    out = torch.empty(rows, vocab, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return out
    dummy = out
    if seen is not None and seen.dtype == torch.bool:
        seen = seen.view(torch.int8)
    _penalties_kernel[(rows,)](
        logits, logits.stride(0), out, vocab,
        dummy if counts is None else counts, 0 if counts is None else counts.stride(0),
        dummy if seen is None else seen, 0 if seen is None else seen.stride(0),
        dummy if bias is None else bias, 0 if bias is None else bias.stride(0),
        presence, frequency, repetition, min_p, temperature,
        HAS_COUNTS=counts is not None, HAS_SEEN=seen is not None, HAS_BIAS=bias is not None,
        HAS_MIN_P=use_min_p, BLOCK_V=_BLOCK_V,
    )
    return out
