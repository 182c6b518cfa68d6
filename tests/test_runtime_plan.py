"""The decisions an engine takes only on CUDA, driven here on the CPU: the backend, graph capture, overlap,
speculation's default and pinned transfers (engine/runtime_plan.py, backend.py, engine/transfer.py). The graph
bookkeeping (static buffers, padding rows, the ladder) is driven by tests/test_cuda_graph.py with an eager
stand-in for replay, and a failed capture of any kind by a fake capture there.

What remains GPU-only, exercised by the `-m gpu` tests alone: torch.cuda.CUDAGraph capture and replay and its
memory pool; pin_memory() and non_blocking copies; torch.cuda.Event record and synchronize; the compiled
Triton kernels (their numerics: fp fusion pinned on, tf32 dots, bf16); torch.cuda.mem_get_info on a real card
(faked in tests/test_kv_budget.py).
"""
from __future__ import annotations

import pytest
import torch

import selfrag_engine.backend as backend_module
from selfrag_engine.backend import TORCH, TRITON, TRITON_INTERPRETED, choose_backend
from selfrag_engine.engine.runtime_plan import plan_runtime
from selfrag_engine.engine.speculative import DEFAULT_NUM_DRAFT_TOKENS
from selfrag_engine.engine.transfer import copy_to_host, to_device, uses_pinned_transfers
from selfrag_engine.errors import EngineConfigError

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")


@pytest.fixture
def compiled(monkeypatch):
    """The backend decision as a machine without TRITON_INTERPRET takes it."""
    monkeypatch.setattr(backend_module, "INTERPRET", False)


def test_backend_choice_on_a_gpu_machine(compiled):
    assert choose_backend(CUDA) is TRITON  # the kernels by default on CUDA
    assert choose_backend(CUDA, use_kernels=False) is TORCH
    assert choose_backend(CPU) is TORCH
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        choose_backend(CPU, use_kernels=True)


def test_backend_choice_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(backend_module, "INTERPRET", True)
    assert choose_backend(CPU, use_kernels=True) is TRITON_INTERPRETED
    assert choose_backend(CUDA) is TRITON_INTERPRETED


def test_default_gpu_engine_captures_graphs_and_speculates():
    plan = plan_runtime(CUDA, TRITON, max_num_seqs=256, cuda_graph_max_batch=64)
    assert plan.capture_graphs and plan.graph_max_batch == 64
    assert plan.num_draft_tokens == DEFAULT_NUM_DRAFT_TOKENS
    # A speculating engine does not overlap its steps: the plan says so rather than the stepper deciding it.
    assert not plan.overlap
    assert plan.pinned_transfers
    assert plan_runtime(CUDA, TRITON, max_num_seqs=6).graph_max_batch == 6


def test_gpu_engine_without_speculation_overlaps():
    assert plan_runtime(CUDA, TRITON, num_draft_tokens=0).overlap
    # Asking for overlap turns speculation's default off, so that the engine does what it was asked.
    plan = plan_runtime(CUDA, TRITON, overlap=True)
    assert plan.overlap and plan.num_draft_tokens == 0
    # Both asked for: speculation, whose steps are not overlapped.
    plan = plan_runtime(CUDA, TRITON, overlap=True, num_draft_tokens=3)
    assert plan.num_draft_tokens == 3 and not plan.overlap
    assert not plan_runtime(CUDA, TRITON, overlap=False, num_draft_tokens=0).overlap


@pytest.mark.parametrize("backend", [TORCH, TRITON_INTERPRETED])
def test_no_graphs_without_the_compiled_kernels(backend):
    assert not plan_runtime(CUDA, backend).capture_graphs
    assert not plan_runtime(CPU, backend).capture_graphs
    assert not plan_runtime(CUDA, TRITON, enforce_eager=True).capture_graphs


def test_cpu_engine_plan():
    plan = plan_runtime(CPU, TORCH)
    assert (plan.capture_graphs, plan.overlap, plan.num_draft_tokens, plan.pinned_transfers) == (False, False, 0, False)
    assert plan_runtime(CPU, TORCH, overlap=True).overlap  # asked for: done, though it gains nothing here
    with pytest.raises(EngineConfigError, match="num_draft_tokens"):
        plan_runtime(CUDA, TRITON, num_draft_tokens=-1)


def test_pinned_transfers_only_on_cuda():
    assert uses_pinned_transfers(CUDA) and uses_pinned_transfers("cuda")
    assert not uses_pinned_transfers(CPU) and not uses_pinned_transfers("meta")
    # The CPU path of the same functions: synchronous, no event to wait on.
    t = to_device([1, 2, 3], torch.int32, CPU)
    assert t.dtype == torch.int32 and t.tolist() == [1, 2, 3]
    from selfrag_engine.layers.sampler import SamplerOutput
    out = SamplerOutput(torch.tensor([1]), torch.tensor([0.0]), torch.tensor([0.0]))
    assert copy_to_host(out) == (out, None)


def test_engine_follows_the_plan():
    from selfrag_engine import Engine
    from tests.helpers import tiny_checkpoint
    path = tiny_checkpoint(seed=1)
    engine = Engine.from_pretrained(path, progress=False, overlap=True)
    assert engine.overlap and engine.num_draft_tokens == 0 and engine.runner.graphs is None
    engine = Engine.from_pretrained(path, progress=False, overlap=True, num_draft_tokens=2)
    assert not engine.overlap and engine.num_draft_tokens == 2
