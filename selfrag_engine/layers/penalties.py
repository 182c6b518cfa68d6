"""Penalties, logit bias and min-p over a batch of logits rows, before the sampler.

`apply_penalties` runs the Triton kernel (selfrag_engine.kernels.logit_penalties, whose docstring has the
shapes and the formulas) when its backend runs kernels, and `apply_penalties_torch`, the same in float32 torch
ops, otherwise. Both take dense per-row tensors that the engine builds on the device in one scatter over the
batch (engine/logits_processing.py).
"""
from __future__ import annotations

import math

import torch

from selfrag_engine.backend import TORCH, Backend, as_backend
from selfrag_engine.kernels.logit_penalties import apply_penalties as apply_penalties_kernel
from selfrag_engine.layers.sampler import finite_logits

__all__ = ["apply_penalties", "apply_penalties_torch"]


def apply_penalties_torch(logits: torch.Tensor, counts: torch.Tensor | None, seen: torch.Tensor | None,
                          bias: torch.Tensor | None, presence: torch.Tensor, frequency: torch.Tensor,
                          repetition: torch.Tensor, min_p: torch.Tensor, temperature: torch.Tensor,
                          use_min_p: bool = True) -> torch.Tensor:
    """The torch implementation of `apply_penalties` (in the logits' precision, at least float32)."""
    x = finite_logits(logits) if logits.dtype != torch.float64 else logits.clone()
    if bias is not None:
        x = x + bias.to(x.dtype)
    if seen is not None:
        r = repetition.to(x.dtype).unsqueeze(-1)
        x = torch.where(seen.bool(), torch.where(x > 0, x / r, x * r), x)
    if counts is not None:
        c = counts.to(x.dtype)
        x = x - frequency.to(x.dtype).unsqueeze(-1) * c - torch.where(c > 0, presence.to(x.dtype).unsqueeze(-1),
                                                                        torch.zeros((), dtype=x.dtype))
    if use_min_p:
        on = (min_p > 0) & (temperature > 0)
        if bool(on.any()):
            m = x.max(dim=-1, keepdim=True).values
            log_min_p = torch.where(on, min_p.to(x.dtype), torch.ones((), dtype=x.dtype)).log()
            cut = m + temperature.to(x.dtype).unsqueeze(-1) * log_min_p.unsqueeze(-1)
            x = torch.where(on.unsqueeze(-1) & (x < cut), torch.full((), -math.inf, dtype=x.dtype), x)
    return x


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor | None, seen: torch.Tensor | None,
                    bias: torch.Tensor | None, presence: torch.Tensor, frequency: torch.Tensor,
                    repetition: torch.Tensor, min_p: torch.Tensor, temperature: torch.Tensor,
                    use_min_p: bool = True, backend: Backend | str = TORCH) -> torch.Tensor:
    """The processed logits, float32 [R, V]; the Triton kernel when `backend` runs kernels."""
    if as_backend(backend).kernels:
        return apply_penalties_kernel(logits, counts, seen, bias, presence, frequency, repetition, min_p,
                                      temperature, use_min_p)
    return apply_penalties_torch(logits, counts, seen, bias, presence, frequency, repetition, min_p, temperature,
                                 use_min_p)
