"""Triton kernels. Each module holds one kernel family with a docstring of shapes and dtypes; its torch
reference lives next to its test in tests/. Kernels take and return tensors only: no engine types.

Installed as `selfrag_engine.kernels` (setup.py maps this folder there).

Launch parameters that depend on the device (split counts, tile sizes, the native-fp8 choice) are computed by
each module's configuration functions from a `Target`, not from a torch device, so that they can be asked about
a GPU that is not there: `bench/aot_compile.py` plans every launch for an H100 on a CPU machine, inside
`planning_for(H100)`, and compiles what the launch functions would launch.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Iterator

import torch

# Read once, when the kernels are first imported: triton reads it when @triton.jit is applied, so a later
# change would not take effect anyway. The launch heuristics that differ in the interpreter ask this.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Compiled GPU math with fused multiply-adds, triton's default up to 3.9 (3.10 turns it off, and 3.9 warns while
# it is unset): pinned, so that the image's triton and a later one compile the same arithmetic, the sm_90a AOT
# tables and a Triton cache compiled ahead of time match what runs, and the GPU tests' tolerances hold. Set
# before any kernel compiles (it is read at compile time and is part of triton's cache key); a value the user
# set stays.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


@dataclass(frozen=True)
class Target:
    """What a launch is planned for: a GPU's streaming multiprocessors and compute capability, or the
    interpreter (which runs programs one by one, so its launches want few, small programs)."""
    num_sms: int
    capability: tuple[int, int]
    interpreter: bool = False


INTERPRETER = Target(num_sms=1, capability=(0, 0), interpreter=True)
H100 = Target(num_sms=132, capability=(9, 0))  # H100 SXM; the H200 has the same SMs

_planned: contextvars.ContextVar[Target | None] = contextvars.ContextVar("planned_target", default=None)


def target_of(device: torch.device | str) -> Target:
    """The target launches on `device` are planned for: the one `planning_for` set, else the CUDA device's
    own, else the interpreter."""
    planned = _planned.get()
    if planned is not None:
        return planned
    device = torch.device(device)
    if INTERPRET or device.type != "cuda":
        return INTERPRETER
    props = torch.cuda.get_device_properties(device)
    return Target(num_sms=props.multi_processor_count, capability=(props.major, props.minor))


def as_target(where: Target | torch.device | str) -> Target:
    """A Target, or the target of a device."""
    return where if isinstance(where, Target) else target_of(where)


@contextlib.contextmanager
def planning_for(target: Target) -> Iterator[Target]:
    """Within the block, every launch function plans for `target` whatever device its tensors are on (meta
    tensors included, so nothing is allocated)."""
    token = _planned.set(target)
    try:
        yield target
    finally:
        _planned.reset(token)
