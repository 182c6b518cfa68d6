"""Where a model step runs: the torch reference, the Triton kernels on CUDA, or the same kernels in Triton's
interpreter on the CPU (how the CPU test suite checks them).

Decided once, by `choose_backend` when an engine is built; the model's layers and the sampler ask the one
`Backend` they are given (`Llama.set_backend`) and never look at devices themselves.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from selfrag_engine.errors import DeviceError
from selfrag_engine.kernels import INTERPRET


@dataclass(frozen=True)
class Backend:
    name: str  # "torch", "triton" or "triton-interpreted"

    @property
    def kernels(self) -> bool:
        """Whether the Triton kernels run (compiled or interpreted) instead of the torch reference."""
        return self.name != "torch"

    @property
    def interpreted(self) -> bool:
        return self.name == "triton-interpreted"


TORCH = Backend("torch")
TRITON = Backend("triton")
TRITON_INTERPRETED = Backend("triton-interpreted")
BACKENDS = {b.name: b for b in (TORCH, TRITON, TRITON_INTERPRETED)}


AUTO = "auto"


def auto_device() -> torch.device:
    """The device rule of every command and of the API: CUDA when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_of(device: torch.device | str | None = AUTO) -> torch.device:
    """The device asked for ("auto" or None: `auto_device()`), refused with a DeviceError when it is unknown
    or not on this machine."""
    if device is None or device == AUTO:
        return auto_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} asked for, but CUDA is not available on this machine")
    return dev


def choose_backend(device: torch.device | str, use_kernels: bool | None = None) -> Backend:
    """use_kernels None: the kernels on CUDA, the torch reference elsewhere. True asks for the kernels: on a
    CPU that needs TRITON_INTERPRET=1 set before the kernels were imported. False: the torch reference."""
    device = torch.device(device)
    if use_kernels is None:
        use_kernels = device.type == "cuda"
    if not use_kernels:
        return TORCH
    if INTERPRET:
        return TRITON_INTERPRETED
    if device.type != "cuda":
        raise ValueError("use_kernels needs a CUDA device, or TRITON_INTERPRET=1 to run the kernels on the CPU "
                         "(the CPU path is otherwise the torch reference)")
    return TRITON


def as_backend(backend: Backend | str) -> Backend:
    """A Backend, or its name."""
    if isinstance(backend, Backend):
        return backend
    if backend == "triton" and INTERPRET:
        return TRITON_INTERPRETED
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    return BACKENDS[backend]
