"""The KV pool tensors: one [num_blocks, block_size, kv_heads, head_dim] pair per layer, sized from a budget.

The pool's dtype is the model's, or float8 e4m3 (`kv_cache_dtype="fp8"`: one byte per element, so a budget
holds twice the blocks of fp16; the per-layer, per-head scales are a few bytes per layer, not per block, so
copy-on-write and rollback copy bytes only)."""
from __future__ import annotations

import torch

from selfrag_engine.config import LlamaConfig
from selfrag_engine.engine.transfer import to_device
from selfrag_engine.layers.attention import KVCache


def bytes_per_block(config: LlamaConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * elem


def num_blocks_for_budget(config: LlamaConfig, block_size: int, dtype: torch.dtype, device: torch.device,
                          kv_cache_bytes: int | None, gpu_memory_utilization: float) -> int:
    """Blocks that fit: an explicit byte budget, or on CUDA the given fraction of the device memory minus
    what is already allocated (weights) and a reserve for activations."""
    per_block = bytes_per_block(config, block_size, dtype)
    if kv_cache_bytes is None:
        if device.type != "cuda":
            kv_cache_bytes = 512 << 20
        else:
            if not 0.0 < gpu_memory_utilization <= 1.0:
                raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
            total = torch.cuda.get_device_properties(device).total_memory
            activation_reserve = 1 << 30
            kv_cache_bytes = int(total * gpu_memory_utilization) - torch.cuda.memory_allocated(device) \
                - activation_reserve
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
