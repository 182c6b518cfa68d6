"""One model step: turns a scheduled batch into input tensors and attention metadata, runs the model,
and returns the logits of the rows that sample, in the order of the scheduled chunks.

A decode step that runs the Triton kernels looks for rows sharing leading KV blocks (branches forked from one
prompt, prompts served by the prefix cache; engine/prefix_groups.py). When some group of rows shares at least
`MIN_SHARED_PREFIX_BLOCKS` blocks, the batch is built group by group and attention reads each shared prefix
once (cascade decode); the logits are put back in chunk order. Otherwise rows keep the chunks' order and the
plain split-K decode runs. The torch path never regroups: it is the reference the kernels are checked against.

Decode steps replay a captured CUDA graph (engine/cuda_graph.py, plain decode) when `graphs` is set and holds
the batch. A graph saves the launch gaps of the whole step, a cascade only the repeated prefix reads, so with
graphs the cascade (run eagerly) is taken only when the prefix reads it saves exceed `cascade_min_saved_bytes`
(the engine sets half the weight bytes: about what the launch gaps of an eager 7B step cost in reads at
Hopper bandwidth; an estimate, to be tuned with bench/decode.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from selfrag_engine.backend import TORCH, Backend
from selfrag_engine.engine.cuda_graph import capture_decode_graphs
from selfrag_engine.engine.kv_cache import copy_blocks
from selfrag_engine.engine.prefix_groups import PrefixGroups, shared_prefix_groups
from selfrag_engine.engine.prompt_logprobs import wants_rows
from selfrag_engine.engine.scheduler import Batch
from selfrag_engine.engine.transfer import to_device
from selfrag_engine.layers.attention import AttentionMetadata, CascadeMetadata, KVCache

# Shared blocks below which the plain split-K decode is as good. A cascade saves (rows - 1) * prefix_blocks
# block reads per kv head, but writes every row's output as float32 partials and merges them in a second
# launch, which plain decode of short contexts skips. One shared 16-token block of Llama-2-7B K/V is 256 KiB
# per layer, about what the partials of a few rows cost, so a single block is not worth it; from two blocks
# on the saving grows with every block and branch. An estimate, not a measurement: bench/attention.py
# (cascade vs plain) is where to tune it.
MIN_SHARED_PREFIX_BLOCKS = 2


@dataclass
class StepInputs:
    """The model's inputs for one step. The batch may list the chunks in another order than the scheduler's:
    chunk_rows[i] are the rows of the batch that hold chunk i's tokens."""
    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    meta: AttentionMetadata
    chunk_rows: list[range]
    reordered: bool = False


def cascade_metadata(groups: PrefixGroups, context_lens: list[int], block_size: int,
                     device: torch.device) -> CascadeMetadata:
    """Cascade fields of a decode batch already laid out in `groups`' order (context_lens in batch order)."""
    prefix_tokens = np.repeat(groups.prefix_blocks.astype(np.int64) * block_size, groups.group_sizes)
    return CascadeMetadata(
        group_start=to_device(groups.group_start, torch.int32, device),
        prefix_blocks=to_device(groups.prefix_blocks, torch.int32, device),
        max_group_size=groups.max_group_size,
        max_suffix_len=int((np.asarray(context_lens, dtype=np.int64) - prefix_tokens).max()),
    )


def decode_metadata(block_tables: np.ndarray, context_lens: list[int], slot_mapping: np.ndarray,
                    device: torch.device, cascade: CascadeMetadata | None = None) -> AttentionMetadata:
    """Attention metadata of a decode step (one new token per row), every argument in batch order:
    block_tables int32 [B, max_blocks] padded with -1, context_lens including the new token, slot_mapping
    int64 [B] where each new token's K/V goes."""
    batch = len(context_lens)
    return AttentionMetadata(
        cu_seqlens_q=torch.arange(batch + 1, dtype=torch.int32, device=device),
        context_lens=to_device(context_lens, torch.int32, device),
        block_tables=to_device(block_tables, torch.int32, device),
        slot_mapping=to_device(slot_mapping, torch.int64, device),
        max_q_len=1,
        max_context_len=max(context_lens),
        q_lens_host=[1] * batch,
        context_lens_host=list(context_lens),
        cascade=cascade,
    )


class ModelRunner:
    """Runs scheduled batches; the block tables and slots come with the batch (the scheduler owns the pool)."""

    def __init__(self, model, kv_caches: list[KVCache], block_size: int, device: torch.device,
                 backend: Backend = TORCH, min_shared_prefix_blocks: int = MIN_SHARED_PREFIX_BLOCKS):
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.min_shared_prefix_blocks = min_shared_prefix_blocks
        self.graphs = None  # DecodeGraphs, once captured
        self.cascade_min_saved_bytes = 0  # with graphs: the least saved prefix bytes worth an eager cascade step
        self.kv_bytes_per_token = sum(2 * c.k[0, 0].numel() * c.k.element_size() for c in kv_caches)

    def capture_graphs(self, max_batch: int, max_model_len: int) -> None:
        """Decode steps replay CUDA graphs from now on (unless capture fails here, with a warning)."""
        self.graphs = capture_decode_graphs(self.model, self.kv_caches, max_batch, max_model_len, self.block_size,
                                            self.device)
        weight_bytes = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        self.cascade_min_saved_bytes = weight_bytes // 2

    def prepare(self, batch: Batch, next_tokens: torch.Tensor | None = None) -> StepInputs:
        if next_tokens is not None or (batch.chunks and all(c.num_tokens == 1 for c in batch.chunks)):
            return self.prepare_decode(batch, next_tokens)
        return self.prepare_mixed(batch)

    def prepare_decode(self, batch: Batch, next_tokens: torch.Tensor | None = None) -> StepInputs:
        """One new token per chunk; with the kernels, rows sharing a prefix are laid out group by group.
        next_tokens (int64 [len(chunks)], on the device): the chunks' input tokens, when the host does not have
        them yet (a step scheduled ahead); otherwise they are read from the sequences."""
        chunks = batch.chunks
        tables, slots = batch.block_tables, batch.slot_mapping
        context_lens = [c.start + 1 for c in chunks]
        order: list[int] | None = None
        groups = None
        if self.backend.kernels and len(chunks) > 1:
            groups = shared_prefix_groups(tables, context_lens, self.block_size, self.min_shared_prefix_blocks)
            if groups.shares and self.graphs is not None and self.graphs.fits(len(chunks), tables.shape[1]):
                saved = groups.saved_blocks * self.block_size * self.kv_bytes_per_token
                if saved < self.cascade_min_saved_bytes:
                    groups = None  # the graph replay is worth more than the prefix reads saved
            if groups is not None and groups.shares:
                order = groups.order.tolist()
            else:
                groups = None
        if order is not None:
            chunks = [chunks[i] for i in order]
            context_lens = [context_lens[i] for i in order]
            tables = tables[order]
            slots = slots[order]
        starts = [c.start for c in chunks]
        cascade = None if groups is None else cascade_metadata(groups, context_lens, self.block_size, self.device)
        meta = decode_metadata(tables, context_lens, slots, self.device, cascade)
        if order is None:
            chunk_rows = [range(i, i + 1) for i in range(len(chunks))]
        else:
            chunk_rows = [range(0)] * len(chunks)
            for row, i in enumerate(order):
                chunk_rows[i] = range(row, row + 1)
        dev = self.device
        if next_tokens is None:
            input_ids = to_device([c.seq.token_ids[c.start] for c in chunks], torch.int64, dev)
        else:
            input_ids = next_tokens.to(torch.int64)
            if order is not None:
                input_ids = input_ids[to_device(order, torch.long, input_ids.device)]
        return StepInputs(
            input_ids=input_ids,
            positions=to_device(starts, torch.int64, dev),
            meta=meta, chunk_rows=chunk_rows, reordered=order is not None,
        )

    def prepare_mixed(self, batch: Batch) -> StepInputs:
        """Prompt chunks (and decode rows batched with them), in the chunks' order."""
        chunks = batch.chunks
        q_lens = [c.num_tokens for c in chunks]
        context_lens = [c.start + c.num_tokens for c in chunks]
        input_ids: list[int] = []
        positions: list[int] = []
        cu = [0]
        for c, end in zip(chunks, context_lens):
            input_ids.extend(c.input_ids())
            positions.extend(range(c.start, end))
            cu.append(cu[-1] + c.num_tokens)
        dev = self.device
        meta = AttentionMetadata(
            cu_seqlens_q=to_device(cu, torch.int32, dev),
            context_lens=to_device(context_lens, torch.int32, dev),
            block_tables=to_device(batch.block_tables, torch.int32, dev),
            slot_mapping=to_device(batch.slot_mapping, torch.int64, dev),
            max_q_len=max(q_lens),
            max_context_len=max(context_lens),
            q_lens_host=q_lens,
            context_lens_host=context_lens,
        )
        return StepInputs(to_device(input_ids, torch.int64, dev), to_device(positions, torch.int64, dev), meta,
                          [range(a, b) for a, b in zip(cu, cu[1:])])

    @torch.inference_mode()
    def run(self, batch: Batch, next_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Computes the chunks' K/V; returns float32 logits, in chunk order: every row of a scored sequence's
        chunk, of a chunk with draft tokens and of a chunk whose prompt log-probabilities are asked for, the last
        row of each other chunk that samples. With next_tokens (a decode step scheduled ahead,
        see prepare_decode) every chunk samples."""
        chunks = batch.chunks
        copy_blocks(self.kv_caches, batch.copies)
        inputs = self.prepare(batch, next_tokens)
        meta = inputs.meta
        rows: list[int] = []
        for rs, c in zip(inputs.chunk_rows, chunks):
            # A drafted chunk samples at every position to verify its drafts; a prompt chunk of a request that
            # asks for prompt log-probabilities returns every position's (engine/prompt_logprobs.py).
            if c.seq.scores or c.draft or (next_tokens is None and wants_rows(c)):
                rows.extend(rs)
            elif next_tokens is not None or (c.samples and not c.seq.prefill_only):
                rows.append(rs[-1])
        if (self.graphs is not None and meta.is_decode and meta.cascade is None
                and self.graphs.fits(len(chunks), meta.block_tables.shape[1])):
            logits = self.graphs.run(inputs.input_ids, inputs.positions, meta)
            # Indexing copies the rows out of the graph's output buffer, which the next replay overwrites.
            return logits[to_device(rows, torch.long, logits.device)]
        hidden = self.model(inputs.input_ids, inputs.positions, meta, self.kv_caches)
        if inputs.reordered or len(rows) != hidden.shape[0]:  # otherwise rows is every row, in order
            hidden = hidden[to_device(rows, torch.long, hidden.device)]
        return self.model.compute_logits(hidden)
