"""One model step: turns a scheduled batch into input tensors and attention metadata, runs the model,
and returns the logits of the rows that sample."""
from __future__ import annotations

import torch

from selfrag_engine.engine.attention import AttentionMetadata, KVCache
from selfrag_engine.engine.kv_cache import copy_blocks
from selfrag_engine.engine.scheduler import Chunk


class ModelRunner:
    def __init__(self, model, kv_caches: list[KVCache], block_manager, device: torch.device,
                 use_kernels: bool = False):
        self.model = model
        self.use_kernels = use_kernels
        self.kv_caches = kv_caches
        self.bm = block_manager
        self.device = device

    def prepare(self, chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        seq_ids = [c.seq.seq_id for c in chunks]
        q_lens = [c.num_tokens for c in chunks]
        context_lens = [c.start + c.num_tokens for c in chunks]
        input_ids: list[int] = []
        positions: list[int] = []
        cu = [0]
        for c, end in zip(chunks, context_lens):
            input_ids.extend(c.seq.token_ids[c.start:end])
            positions.extend(range(c.start, end))
            cu.append(cu[-1] + c.num_tokens)
        slots = self.bm.slot_mapping(seq_ids, q_lens, [c.start for c in chunks])
        tables = self.bm.block_tables(seq_ids, -1)
        dev = self.device
        meta = AttentionMetadata(
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=dev),
            block_tables=torch.from_numpy(tables).to(dev),
            slot_mapping=torch.from_numpy(slots).to(dev),
            max_q_len=max(q_lens),
            max_context_len=max(context_lens),
            q_lens_host=q_lens,
            context_lens_host=context_lens,
            use_kernels=self.use_kernels,
        )
        return (torch.tensor(input_ids, dtype=torch.int64, device=dev),
                torch.tensor(positions, dtype=torch.int64, device=dev), meta)

    @torch.inference_mode()
    def run(self, chunks: list[Chunk], copies: list[tuple[int, int]], all_logits: bool = False) -> torch.Tensor:
        """Computes the chunks' K/V; returns float32 logits [num sampling chunks, vocab] (their last rows),
        or for every token when `all_logits`."""
        copy_blocks(self.kv_caches, copies)
        input_ids, positions, meta = self.prepare(chunks)
        hidden = self.model(input_ids, positions, meta, self.kv_caches)
        if not all_logits:
            last_rows = [int(meta_end) - 1 for meta_end, c in zip(meta.cu_seqlens_q[1:].tolist(), chunks)
                         if c.samples]
            hidden = hidden[torch.tensor(last_rows, dtype=torch.long, device=hidden.device)]
        return self.model.compute_logits(hidden)
