"""The default KV pool: sized from what the engine can use, capped by a fraction of the CUDA memory free now.

The CUDA memory queries are faked (monkeypatched `torch.cuda.mem_get_info`, a device that only allocates on
paper), so the sizing that a GPU takes runs here on the CPU, a second engine in the same process included.
"""
from __future__ import annotations

import pytest
import torch

from selfrag_engine.config import LlamaConfig
from selfrag_engine.engine import kv_cache
from selfrag_engine.engine.kv_cache import (CPU_KV_CACHE_BYTES, blocks_needed, bytes_per_block, kv_bytes_per_token,
                                            num_blocks_for_budget)

GIB = 1 << 30
CUDA = torch.device("cuda", 0)


def _config(layers: int, heads: int, kv_heads: int, hidden: int, max_pos: int) -> LlamaConfig:
    return LlamaConfig.from_dict({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": 4 * hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "max_position_embeddings": max_pos, "vocab_size": 32016,
        "rms_norm_eps": 1e-5})


LLAMA2_7B = dict(layers=32, heads=32, kv_heads=32, hidden=4096, max_pos=4096)
TINY = dict(layers=4, heads=4, kv_heads=4, hidden=192, max_pos=512)


class FakeCard:
    """A device of `total` bytes whose free memory drops by what each engine's pool takes."""

    def __init__(self, total: int, used: int = 0):
        self.total, self.used = total, used

    def mem_get_info(self, device=None):
        assert torch.device(device).type == "cuda"
        return self.total - self.used, self.total

    def build_engine(self, config, dtype=torch.float16, block_size=16, max_num_seqs=256, max_model_len=None,
                     utilization=0.9) -> int:
        blocks = num_blocks_for_budget(config, block_size, dtype, CUDA, None, utilization,
                                       max_num_seqs=max_num_seqs,
                                       max_model_len=max_model_len or config.max_position_embeddings)
        self.used += blocks * bytes_per_block(config, block_size, dtype)
        assert self.used <= self.total
        return blocks


@pytest.fixture
def card(monkeypatch):
    fake = FakeCard(total=141 * GIB, used=3 * GIB)  # an H200 with a CUDA context and some weights on it
    monkeypatch.setattr(torch.cuda, "mem_get_info", fake.mem_get_info)
    return fake


def test_bytes_per_token_is_the_published_llama2_7b_figure():
    # 2 (K and V) x 32 layers x 32 kv heads x 128 x 2 bytes: 512 KiB per token in fp16.
    config = _config(**LLAMA2_7B)
    assert kv_bytes_per_token(config, torch.float16) == 512 << 10
    assert bytes_per_block(config, 16, torch.float16) == 16 * (512 << 10)
    assert blocks_needed(3, 33, 16) == 9


def test_small_model_takes_what_it_needs_and_two_engines_coexist(card):
    config = _config(**TINY)
    first = card.build_engine(config)
    second = card.build_engine(config)
    need = blocks_needed(256, 512, 16)
    assert first == second == need
    # Not a card's worth of blocks: 256 x 512 tokens x 3 KiB is 384 MiB.
    assert card.used - 3 * GIB == 2 * need * bytes_per_block(config, 16, torch.float16) == 768 << 20


def test_large_model_is_capped_by_the_free_memory_and_a_second_engine_still_gets_blocks(card):
    config = _config(**LLAMA2_7B)
    per_block = bytes_per_block(config, 16, torch.float16)
    free = card.total - card.used
    first = card.build_engine(config)  # needs 256 x 4096 tokens x 512 KiB = 512 GiB: capped
    assert first == int(free * 0.9) // per_block
    free_after = card.total - card.used
    assert free_after >= free * 0.1 - per_block
    second = card.build_engine(config)
    assert second == int(free_after * 0.9) // per_block >= 1
    # A third, small engine, e.g. a draft or a test's reference, also fits in what is left.
    assert card.build_engine(_config(**TINY), max_num_seqs=4) == blocks_needed(4, 512, 16)


def test_fewer_sequences_or_a_shorter_context_shrink_the_pool(card):
    config = _config(**LLAMA2_7B)
    assert card.build_engine(config, max_num_seqs=8, max_model_len=2048) == blocks_needed(8, 2048, 16) == 1024


def test_a_full_card_names_the_problem(card):
    card.used = card.total - (1 << 20)
    with pytest.raises(ValueError, match="holds no block.*kv_cache_bytes or num_blocks"):
        card.build_engine(_config(**LLAMA2_7B))
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        card.build_engine(_config(**TINY), utilization=1.5)


def test_explicit_budget_wins_and_the_cpu_default_is_capped():
    config = _config(**LLAMA2_7B)
    per_block = bytes_per_block(config, 16, torch.float16)
    cpu = torch.device("cpu")
    assert num_blocks_for_budget(config, 16, torch.float16, cpu, 10 * per_block + 1, 0.9,
                                 max_num_seqs=256, max_model_len=4096) == 10
    assert num_blocks_for_budget(config, 16, torch.float16, cpu, None, 0.9, max_num_seqs=256,
                                 max_model_len=4096) == CPU_KV_CACHE_BYTES // per_block
    assert num_blocks_for_budget(_config(**TINY), 16, torch.float32, cpu, None, 0.9, max_num_seqs=2,
                                 max_model_len=100) == 2 * 7
    assert kv_cache.CPU_KV_CACHE_BYTES == 512 << 20


def test_engine_built_on_the_cpu_sizes_its_pool_from_its_limits():
    from selfrag_engine import Engine
    from tests.helpers import tiny_checkpoint
    engine = Engine.from_pretrained(tiny_checkpoint(seed=1), progress=False, max_num_seqs=3, max_model_len=40)
    assert engine.cache_stats()["num_blocks"] == blocks_needed(3, 40, engine.block_size)
