"""Next-token sampling with Self-RAG reflection-token scoring, in one pass over each row of logits.

`sample` runs the fused Triton kernel (selfrag_engine.kernels.sampling) when its backend runs kernels and
`sample_torch`, a float32 torch implementation, otherwise. Both have the semantics below; only the random draws differ
between them (greedy results are identical).

- temperature 0 is greedy: argmax, ties to the lowest id (torch.argmax).
- temperature T > 0 samples from softmax(logits / T), truncated by top-k (0 or >= vocab disables it), then
  by top-p over the top-k-renormalized distribution (the smallest set of highest-probability tokens whose
  mass reaches top_p; 1.0 disables it). Both truncations are thresholds on the logit value and tokens tied
  with the threshold are kept, so top_k=1 keeps every token tied at the maximum.
- One seed is one draw: the same (logits, parameters, seed) gives the same token on a backend.
- logprobs, lse, group_logprobs and topn_logprobs are of the raw logits at temperature 1 (full-vocabulary
  log-softmax), whatever the temperature and truncation: what Self-RAG's scores read and what vLLM reports
  for greedy decoding. group_probs are p_i / sum of p over the token's group (0 if the whole group is -inf).
- top_n may be anything up to the vocabulary. Up to MAX_TOP_N the fused kernel returns it in its pass; beyond,
  a device top-k over the raw logits does (`top_n_logprobs`), the kernel then asked for none. Either way the
  order is descending with ties to the lower id.
- Non-finite logits: a NaN logit counts as -inf (never drawn, probability 0); +inf counts as the largest
  finite float32 (a row's +inf tokens share its mass, its lse stays finite); a row with no finite logit (all
  -inf or NaN) has no distribution: token 0, top-n ids 0..n-1, lse -inf, every log-probability of the row NaN
  and its group probabilities 0. No id is ever -1, on either backend.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from selfrag_engine.backend import TORCH, Backend, as_backend
from selfrag_engine.kernels.sampling import MAX_TOP_N, check_sample_args, fused_sample

__all__ = ["ReflectionGroups", "SamplerOutput", "sample", "sample_torch", "score_tokens", "top_n_logprobs",
           "MAX_TOP_N"]


@dataclass
class SamplerOutput:
    """One sampled token per row and its scores; the optional fields are None when not asked for."""
    tokens: torch.Tensor                        # [B] int64
    logprobs: torch.Tensor                      # [B] fp32, of the chosen tokens (temperature 1)
    lse: torch.Tensor                           # [B] fp32, log-sum-exp of the raw row
    group_logprobs: torch.Tensor | None = None  # [B, G] fp32, full-vocabulary log-probabilities
    group_probs: torch.Tensor | None = None     # [B, G] fp32, normalized within each group
    topn_ids: torch.Tensor | None = None        # [B, n] int64
    topn_logprobs: torch.Tensor | None = None   # [B, n] fp32


@dataclass(frozen=True)
class ReflectionGroups:
    """Named groups of reflection-token ids (e.g. retrieval, relevance, grounding, utility), laid out
    concatenated in group order along the G axis of SamplerOutput.group_probs / group_logprobs."""
    names: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]
    _tensors: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        names = tuple(self.names)
        ids = tuple(tuple(int(t) for t in g) for g in self.ids)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "ids", ids)
        if len(names) != len(ids):
            raise ValueError(f"{len(names)} group names but {len(ids)} groups of ids")
        if not names:
            raise ValueError("at least one reflection group is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"group names must be unique, got {names}")
        for name, group in zip(names, ids):
            if not group:
                raise ValueError(f"reflection group {name!r} is empty")
            if any(t < 0 for t in group):
                raise ValueError(f"reflection group {name!r} has a negative token id: {group}")

    @classmethod
    def from_token_ids(cls, groups: Mapping[str, Sequence[int]]) -> "ReflectionGroups":
        """From {group name: token ids}, in the mapping's order."""
        return cls(tuple(groups), tuple(tuple(v) for v in groups.values()))

    @property
    def flat_ids(self) -> tuple[int, ...]:
        return tuple(t for g in self.ids for t in g)

    @property
    def num_tokens(self) -> int:
        return sum(len(g) for g in self.ids)

    def span(self, name: str) -> slice:
        """The columns of group `name` along the G axis."""
        start = 0
        for n, g in zip(self.names, self.ids):
            if n == name:
                return slice(start, start + len(g))
            start += len(g)
        raise KeyError(f"no reflection group {name!r}; groups are {self.names}")

    def _cached(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        if device not in self._tensors:
            sizes = [len(g) for g in self.ids]
            offsets = [0]
            for n in sizes:
                offsets.append(offsets[-1] + n)
            self._tensors[device] = (torch.tensor(self.flat_ids, dtype=torch.int32, device=device),
                                     torch.tensor(offsets, dtype=torch.int32, device=device))
        return self._tensors[device]

    def token_ids(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[G] int32, cached per device."""
        return self._cached(device)[0]

    def offsets(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[n_groups + 1] int32 (group i spans offsets[i]:offsets[i+1]), cached per device."""
        return self._cached(device)[1]


def _check_groups(groups: ReflectionGroups | None, vocab: int) -> None:
    if groups is None:
        return
    if not isinstance(groups, ReflectionGroups):
        raise ValueError(f"groups must be ReflectionGroups or None, got {type(groups).__name__}")
    top = max(groups.flat_ids)
    if top >= vocab:
        raise ValueError(f"reflection token id {top} is outside the vocabulary (size {vocab})")


def _check_args(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                seeds: torch.Tensor, top_n: int) -> None:
    # The kernel's own check caps top_n at what its pass returns; here any n up to the vocabulary is served.
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0:
        raise ValueError(f"top_n must be an int >= 0, got {top_n!r}")
    check_sample_args(logits, temperature, top_p, top_k, seeds, min(top_n, MAX_TOP_N))
    if top_n > logits.shape[1]:
        raise ValueError(f"top_n={top_n} exceeds the vocabulary size {logits.shape[1]}")


def finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """logits in float32 as the sampler reads them: NaN as -inf, +inf as the largest finite float32."""
    return torch.nan_to_num(logits.float(), nan=float("-inf"), posinf=torch.finfo(torch.float32).max,
                            neginf=float("-inf"))


def top_n_logprobs(logits: torch.Tensor, lse: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, n] int64, log-probabilities [B, n] fp32) of each row's n largest raw logits, descending with
    ties to the lower id, on the logits' device and without a host sync. lse: [B] the rows' log-sum-exp.

    torch.topk finds the n-th largest value but orders ties arbitrarily, so the set is rebuilt from it: every
    token above that value, then the lowest ids equal to it until there are n; the final order is a stable
    sort of those ids (taken in id order) by value."""
    x = finite_logits(logits)
    batch, vocab = x.shape
    if n == 0 or batch == 0:
        return (torch.empty(batch, n, dtype=torch.int64, device=x.device),
                torch.empty(batch, n, dtype=torch.float32, device=x.device))
    kth = torch.topk(x, n, dim=-1, largest=True, sorted=False).values.min(dim=-1, keepdim=True).values
    above = x > kth
    tied = x == kth
    room = n - above.sum(dim=-1, keepdim=True)
    keep = above | (tied & (tied.cumsum(dim=-1) <= room))
    col = torch.arange(vocab, device=x.device).expand(batch, vocab)
    ids = torch.topk(torch.where(keep, col, vocab), n, dim=-1, largest=False, sorted=True).values
    vals = x.gather(1, ids)
    vals, order = torch.sort(vals, dim=-1, descending=True, stable=True)
    return ids.gather(1, order), vals - lse.unsqueeze(-1)


def score_tokens(raw_logits: torch.Tensor, tokens: torch.Tensor, groups: ReflectionGroups | None = None,
                 top_n: int = 0) -> SamplerOutput:
    """The sampler's output for tokens [B] chosen elsewhere, every score of raw_logits [B, V]: what `sample`
    returns when the tokens are drawn from processed logits (penalties, bias, min-p, logits processors) while
    the log-probabilities stay those of the model's logits (vLLM v1's default, raw log-probabilities)."""
    x = finite_logits(raw_logits)
    lse = torch.logsumexp(x, dim=-1)
    return _scores(x, tokens, lse, groups, top_n)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           seeds: torch.Tensor, groups: ReflectionGroups | None = None, top_n: int = 0,
           backend: Backend | str = TORCH, raw_logits: torch.Tensor | None = None) -> SamplerOutput:
    """Samples one token per row of logits [B, V] (fp16 / bf16 / fp32) and scores it.

    temperature [B] f32, top_p [B] f32, top_k [B] int32, seeds [B] int64, all on the logits' device.
    top_n: 0 to V. backend: the engine's (or its name, "torch" or "triton"); the kernel on a CPU needs
    TRITON_INTERPRET=1. raw_logits [B, V]: when the tokens are drawn from processed logits, the model's logits,
    which every log-probability and reflection score is then of (`score_tokens`).
    """
    backend = as_backend(backend)
    _check_args(logits, temperature, top_p, top_k, seeds, top_n)
    _check_groups(groups, logits.shape[1])
    if raw_logits is not None:
        if raw_logits.shape != logits.shape:
            raise ValueError(f"raw_logits {tuple(raw_logits.shape)} must have the logits' shape {tuple(logits.shape)}")
        tokens = sample(logits, temperature, top_p, top_k, seeds, backend=backend).tokens
        return score_tokens(raw_logits, tokens, groups, top_n)
    if not backend.kernels:
        return sample_torch(logits, temperature, top_p, top_k, seeds, groups, top_n)
    dev = logits.device
    pair = (groups.token_ids(dev), groups.offsets(dev)) if groups is not None else None
    fused_n = top_n if top_n <= MAX_TOP_N else 0
    out = SamplerOutput(*fused_sample(logits, temperature, top_p, top_k, seeds, pair, fused_n))
    if top_n > MAX_TOP_N:
        out.topn_ids, out.topn_logprobs = top_n_logprobs(logits, out.lse, top_n)
    return out


def sample_torch(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                 seeds: torch.Tensor, groups: ReflectionGroups | None = None, top_n: int = 0) -> SamplerOutput:
    """The torch implementation of `sample` (float32, sort-based truncation, one torch.Generator per
    sampled row seeded with its seed)."""
    _check_args(logits, temperature, top_p, top_k, seeds, top_n)
    _check_groups(groups, logits.shape[1])
    x = finite_logits(logits)
    batch, vocab = x.shape
    lse = torch.logsumexp(x, dim=-1)
    tokens = x.argmax(dim=-1)
    rows = (temperature > 0).nonzero().flatten()
    if rows.numel():
        xs = x[rows]
        m = xs.max(dim=-1, keepdim=True).values
        t = temperature[rows].unsqueeze(-1)
        sorted_x, order = torch.sort(xs, dim=-1, descending=True, stable=True)
        w = torch.exp((sorted_x - m) / t)
        k = top_k[rows].long()
        k = torch.where((k > 0) & (k < vocab), k, vocab)
        thr = sorted_x.gather(1, (k - 1).unsqueeze(-1))
        w = torch.where(sorted_x >= thr, w, 0.0)
        # The first sorted position whose running mass reaches top_p of the (top-k) total sets the threshold.
        cum = w.cumsum(dim=-1)
        p = top_p[rows].unsqueeze(-1)
        first = (cum < p * cum[:, -1:]).sum(dim=-1, keepdim=True).clamp(max=vocab - 1)
        thr_p = torch.where(p < 1.0, sorted_x.gather(1, first), torch.full_like(thr, float("-inf")))
        thr = torch.maximum(thr, thr_p)
        keep = (xs >= thr) & (xs > float("-inf"))
        probs = torch.where(keep, torch.exp((xs - m) / t), 0.0)
        cdf = probs.cumsum(dim=-1)
        u = torch.empty(rows.numel(), dtype=torch.float32)
        for i, seed in enumerate(seeds[rows].tolist()):
            u[i] = torch.rand((), generator=torch.Generator().manual_seed(seed))
        goal = u.to(x.device).unsqueeze(-1) * cdf[:, -1:]
        drawn = (cdf <= goal).sum(dim=-1)
        # Rounding can put the goal at the very top of the range: the most likely token stands in.
        drawn = torch.where(drawn < vocab, drawn, order[:, 0])
        tokens[rows] = drawn
    return _scores(x, tokens, lse, groups, top_n)


def _scores(x: torch.Tensor, tokens: torch.Tensor, lse: torch.Tensor, groups: ReflectionGroups | None,
            top_n: int) -> SamplerOutput:
    """The sampler's output for the chosen tokens of the finite float32 logits x, whose rows' log-sum-exp is lse."""
    logprobs = x.gather(1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    out = SamplerOutput(tokens, logprobs, lse)
    if groups is not None:
        ids = groups.token_ids(x.device).long()
        gx = x[:, ids]
        out.group_logprobs = gx - lse.unsqueeze(-1)
        probs = torch.zeros_like(gx)
        for name in groups.names:
            s = groups.span(name)
            seg = gx[:, s]
            gmax = seg.max(dim=-1, keepdim=True).values
            e = torch.exp(seg - torch.where(gmax > float("-inf"), gmax, 0.0))
            den = e.sum(dim=-1, keepdim=True)
            probs[:, s] = torch.where(den > 0, e / torch.where(den > 0, den, 1.0), 0.0)
        out.group_probs = probs
    if 0 < top_n <= MAX_TOP_N:
        vals, ids = torch.sort(x, dim=-1, descending=True, stable=True)
        out.topn_ids = ids[:, :top_n].contiguous()
        out.topn_logprobs = vals[:, :top_n] - lse.unsqueeze(-1)
    elif top_n > MAX_TOP_N:
        out.topn_ids, out.topn_logprobs = top_n_logprobs(x, lse, top_n)
    return out
