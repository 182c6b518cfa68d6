"""The KV pool tensors: one [num_blocks, block_size, kv_heads, head_dim] pair per layer, sized from a budget.

The pool's dtype is the model's, or float8 e4m3 (`kv_cache_dtype="fp8"`: one byte per element, so a budget
holds twice the blocks of fp16; the per-layer, per-head scales are a few bytes per layer, not per block, so
copy-on-write and rollback copy bytes only)."""
from __future__ import annotations

import torch

from selfrag_engine.config import LlamaConfig
from selfrag_engine.engine.transfer import to_device
from selfrag_engine.layers.attention import KVCache


# The pool of an engine off CUDA, where no device memory is shared with other engines.
CPU_KV_CACHE_BYTES = 512 << 20


def kv_bytes_per_token(config: LlamaConfig, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take in the pool, over all layers (the one place the pool's element
    size enters the sizing)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * elem


def bytes_per_block(config: LlamaConfig, block_size: int, dtype: torch.dtype) -> int:
    return block_size * kv_bytes_per_token(config, dtype)


def blocks_needed(max_num_seqs: int, max_model_len: int, block_size: int) -> int:
    """Blocks for max_num_seqs sequences all at max_model_len tokens: more can never be in use at once."""
    return max_num_seqs * -(-max_model_len // block_size)


def num_blocks_for_budget(config: LlamaConfig, block_size: int, dtype: torch.dtype, device: torch.device,
                          kv_cache_bytes: int | None, gpu_memory_utilization: float, *,
                          max_num_seqs: int, max_model_len: int) -> int:
    """Blocks of the pool: an explicit byte budget, or by default what the engine can use at most
    (`blocks_needed`), capped on CUDA by gpu_memory_utilization of the device memory free now and elsewhere
    by CPU_KV_CACHE_BYTES.

    Sized from the free memory, not the card's total, and from the need, not the whole card: a second engine
    in the same process (a test, a benchmark comparing two) still finds memory, and a small model does not
    take a card's worth of blocks (and their bookkeeping in the block manager).
    """
    per_block = bytes_per_block(config, block_size, dtype)
    if kv_cache_bytes is None:
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        need = blocks_needed(max_num_seqs, max_model_len, block_size) * per_block
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            cap = int(free * gpu_memory_utilization)
            where = f"{gpu_memory_utilization} of the {free} bytes free on {device}"
        else:
            cap, where = CPU_KV_CACHE_BYTES, "the CPU default"
        if cap < per_block:
            raise ValueError(f"the KV cache budget ({cap} bytes, {where}) holds no block of {per_block} bytes; "
                             "free device memory, or pass kv_cache_bytes or num_blocks")
        kv_cache_bytes = min(need, cap)
    num_blocks = int(kv_cache_bytes) // per_block
    if num_blocks < 1:
        raise ValueError(f"the KV cache budget ({kv_cache_bytes} bytes) holds no block of {per_block} bytes")
    return num_blocks


def allocate_kv_caches(config: LlamaConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device,
                       scales: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> list[KVCache]:
    """One pool per layer; an FP8 pool takes its layer's (k_scale, v_scale) [kv_heads] from `scales`."""
    shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
    caches = []
    for layer in range(config.num_hidden_layers):
        k_scale, v_scale = (None, None) if scales is None else (s.to(device) for s in scales[layer])
        caches.append(KVCache(torch.empty(shape, dtype=dtype, device=device),
                              torch.empty(shape, dtype=dtype, device=device), k_scale, v_scale))
    return caches


def copy_blocks(caches: list[KVCache], copies: list[tuple[int, int]]) -> None:
    """Copy-on-write: block dst of every layer receives block src's keys and values."""
    if not copies:
        return
    device = caches[0].k.device
    src = to_device([s for s, _ in copies], torch.long, device)
    dst = to_device([d for _, d in copies], torch.long, device)
    for cache in caches:
        # As bytes: torch has no CPU index ops for float8, and a copy is the same bytes whatever the dtype.
        for pool in (cache.k.view(torch.uint8), cache.v.view(torch.uint8)):
            pool.index_copy_(0, dst, pool.index_select(0, src))
