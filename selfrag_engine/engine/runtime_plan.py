"""What an engine does differently on CUDA, decided once when it is built, as plain values.

The paths that exist only on CUDA (graph capture and replay, a decode step launched ahead of the previous
one's read-back, speculation's default, copies through pinned memory) are chosen here from the device, the
backend and the options, so that a CPU test can ask what a GPU engine would do (`plan_runtime` with a CUDA
device) and the engine only follows the plan. What stays GPU-only is the CUDA calls themselves: capturing and
replaying a graph, pinning memory, recording and waiting on events (tests/test_runtime_plan.py names them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from selfrag_engine.backend import TRITON, Backend
from selfrag_engine.engine.speculative import draft_tokens_option
from selfrag_engine.engine.transfer import uses_pinned_transfers


@dataclass(frozen=True)
class RuntimePlan:
    backend: Backend
    capture_graphs: bool  # decode steps replay CUDA graphs, captured for batches up to graph_max_batch
    graph_max_batch: int
    overlap: bool  # a plain decode step is launched before the previous step's tokens are read back
    num_draft_tokens: int  # exact speculative decoding (0: off)
    pinned_transfers: bool  # host/device copies queued through pinned memory, waited on by an event


def plan_runtime(device: torch.device, backend: Backend, *, enforce_eager: bool = False, overlap: bool | None = None,
                 num_draft_tokens: int | None = None, max_num_seqs: int = 256,
                 cuda_graph_max_batch: int = 64) -> RuntimePlan:
    """The plan of an engine on `device` running `backend` (see choose_backend).

    - Graphs: with the compiled kernels (CUDA) unless enforce_eager; the torch path and the interpreter have none.
    - Speculation: num_draft_tokens, or by default on CUDA (where a verify step costs about one decode step's
      weight reads) and off elsewhere; an explicit overlap=True turns the default off, since a speculating
      engine does not overlap its steps (a verify step's tokens decide the next step's inputs).
    - Overlap: asked for, or by default on CUDA; never while speculating.
    """
    cuda = device.type == "cuda"
    if num_draft_tokens is None and overlap:
        num_draft_tokens = 0
    drafts = draft_tokens_option(num_draft_tokens, device)
    wants_overlap = cuda if overlap is None else bool(overlap)
    return RuntimePlan(
        backend=backend,
        capture_graphs=backend == TRITON and not enforce_eager,
        graph_max_batch=min(max_num_seqs, cuda_graph_max_batch),
        overlap=wants_overlap and drafts == 0,
        num_draft_tokens=drafts,
        pinned_transfers=uses_pinned_transfers(device),
    )
