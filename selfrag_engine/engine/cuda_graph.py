"""Decode steps replayed from CUDA graphs.

A batch-1 decode step of a 7B model runs ~350 kernels in ~2 ms of weight reads; launched one by one from
Python, the launch gaps cost as much as the work. So the model's decode forward (embedding to logits) is
captured once per batch size of a ladder (1, 2, 4, 8, 16, 32, ...) over static input buffers, and a step
copies its inputs into the buffers and replays the smallest graph that holds its batch. Prefill, the
copy-on-write block copies and sampling stay eager.

Padding rows of a graph write no K/V (slot -1) and attend to nothing (context 0); their logits are dropped.
The decode kernel is captured with the split count it picks for the longest context the engine allows, so
one graph serves every context length (splits past a short context are empty and merge away).

Static buffers, for the largest captured batch Bmax and M = ceil(max_model_len / block_size):
  input_ids, positions  int64 [Bmax]     slot_mapping int64 [Bmax]
  context_lens          int32 [Bmax]     block_tables int32 [Bmax, M]
  logits                fp32  [Bmax, vocab] (output)
"""
from __future__ import annotations

import warnings

import torch

from selfrag_engine.layers.attention import AttentionMetadata, KVCache


def batch_size_ladder(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_batch (and max_batch itself)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch] + list(range(16, max_batch + 1, 16))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[KVCache], max_batch: int, max_model_len: int, block_size: int,
                 device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = batch_size_ladder(max_batch)
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.device = device
        bmax = self.sizes[-1]
        self.input_ids = torch.zeros(bmax, dtype=torch.int64, device=device)
        self.positions = torch.zeros(bmax, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((bmax,), -1, dtype=torch.int64, device=device)
        self.context_lens = torch.zeros(bmax, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((bmax, self.max_blocks), dtype=torch.int32, device=device)
        self.cu_seqlens = torch.arange(bmax + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def _meta(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            cu_seqlens_q=self.cu_seqlens[:batch + 1], context_lens=self.context_lens[:batch],
            block_tables=self.block_tables[:batch], slot_mapping=self.slot_mapping[:batch], max_q_len=1,
            max_context_len=self.max_model_len, q_lens_host=[1] * batch, context_lens_host=[0] * batch)

    def _forward(self, batch: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:batch], self.positions[:batch], self._meta(batch), self.kv_caches)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures every batch size, largest first so that the smaller graphs reuse its memory pool."""
        for batch in reversed(self.sizes):
            # A run outside the graph first: Triton compiles (and autotunes) its kernels there.
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._forward(batch)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits[batch] = self._forward(batch)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[batch] = graph
        torch.cuda.synchronize(self.device)

    def fits(self, batch: int, num_blocks: int) -> bool:
        return batch <= self.sizes[-1] and num_blocks <= self.max_blocks

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Logits [B, vocab] (fp32) of one decode step of B sequences. The result is a view into the graph's
        output: read it before the next replay."""
        batch = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= batch)
        tables = meta.block_tables
        self.input_ids[:batch].copy_(input_ids)
        self.positions[:batch].copy_(positions)
        self.slot_mapping[:batch].copy_(meta.slot_mapping)
        self.slot_mapping[batch:size].fill_(-1)
        self.context_lens[:batch].copy_(meta.context_lens)
        self.context_lens[batch:size].fill_(0)
        # Columns past a table's width are never read: every sequence attends only within its context.
        self.block_tables[:batch, :tables.shape[1]].copy_(tables)
        self.graphs[size].replay()
        return self.logits[size][:batch]


def capture_decode_graphs(model, kv_caches: list[KVCache], max_batch: int, max_model_len: int, block_size: int,
                          device: torch.device, graphs_type: type = DecodeGraphs) -> DecodeGraphs | None:
    """Captured decode graphs, or None (eager decode, with a warning) when capture fails on this setup.

    Any exception counts as a failed capture, not only CUDA's RuntimeError: the warm-up run compiles the
    kernels and plans their launches, so a kernel's ValueError, a Triton compile error or an out-of-memory
    error surfaces here too, and an engine that decodes eagerly beats one that dies in its constructor (the
    eager path raises the same error again at the first step if it is real). `graphs_type` lets a test drive
    this decision on the CPU with a fake.
    """
    graphs = graphs_type(model, kv_caches, max_batch, max_model_len, block_size, device)
    try:
        graphs.capture()
    except Exception as e:  # noqa: BLE001 - see the docstring
        warnings.warn(f"CUDA graph capture of the decode step failed, decoding eagerly: "
                      f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
        # Drop what was captured: the graphs and their memory pool go with the object.
        graphs.graphs.clear()
        graphs.logits.clear()
        return None
    return graphs
