"""Copies between the host and the device that do not make the host wait for the device.

A plain `torch.tensor(values, device="cuda")` or `.to("cuda")` synchronizes the stream: the host waits until
every queued kernel has run. With a decode step launched ahead (Engine(overlap=True)) that would wait for the
step in flight, so the host could no longer prepare the next step while the device computes. Host-to-device
copies here are queued instead, from pinned memory; device-to-host copies are queued into pinned memory with an
event to wait on.
"""
from __future__ import annotations

from dataclasses import fields

import numpy as np
import torch

from selfrag_engine.layers.sampler import SamplerOutput


def uses_pinned_transfers(device: torch.device | str) -> bool:
    """Whether copies between the host and `device` go through pinned memory without a sync (CUDA only:
    elsewhere a copy is synchronous anyway). The decision; the copies themselves are CUDA's."""
    return torch.device(device).type == "cuda"


def to_device(values: list | np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """values (a list of numbers or a numpy array) as a tensor of `dtype` on `device`, without a sync."""
    host = torch.from_numpy(np.ascontiguousarray(values)) if isinstance(values, np.ndarray) else \
        torch.tensor(values, dtype=dtype)
    if not uses_pinned_transfers(device):
        return host.to(device=device, dtype=dtype)
    # From pinned memory the copy is a plain DMA queued on the stream; torch's pinned-memory cache keeps the
    # buffer until the copy has run.
    return host.to(dtype).pin_memory().to(device, non_blocking=True)


def copy_to_host(out: SamplerOutput) -> tuple[SamplerOutput, torch.cuda.Event | None]:
    """The sampler's output copied to the host behind the work queued so far (into pinned memory), and an
    event marking the copies done: the host waits once per step, not once per row and field, and not for the
    steps queued after this one. On the CPU: `out` itself and no event."""
    if not uses_pinned_transfers(out.tokens.device):
        return out, None
    moved = {f.name: None if getattr(out, f.name) is None else getattr(out, f.name).to("cpu", non_blocking=True)
             for f in fields(out)}
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(out.tokens.device))
    return SamplerOutput(**moved), ready
