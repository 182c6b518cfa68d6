"""Launch configurations are functions of a Target (SMs, compute capability, or the interpreter), so they can be
asked about a GPU that is not there; `planning_for` makes every launch function plan for one, whatever device
its tensors are on (what bench/aot_compile.py compiles from)."""
from __future__ import annotations

import pytest
import torch

from selfrag_engine.kernels import H100, INTERPRETER, Target, planning_for, target_of
from selfrag_engine.kernels.decode_attention import default_num_splits
from selfrag_engine.kernels.fp8_linear import gemv_config, needs_w_bits
from selfrag_engine.kernels.prefill_attention import launch_config

A100 = Target(num_sms=108, capability=(8, 0))


def test_planning_for_overrides_the_device_and_is_undone():
    assert target_of("cpu") == INTERPRETER
    with planning_for(H100):
        assert target_of("cpu") == target_of("meta") == H100
        with planning_for(A100):
            assert target_of("cpu") == A100
        assert target_of("cpu") == H100
    with pytest.raises(RuntimeError), planning_for(H100):
        raise RuntimeError("a failed plan")
    assert target_of("cpu") == INTERPRETER


@pytest.mark.parametrize("target", [H100, A100], ids=["H100", "A100"])
@pytest.mark.parametrize("batch,context", [(1, 512), (1, 4096), (5, 512), (5, 4096), (16, 4096), (64, 8192)])
def test_decode_splits_fill_two_waves_of_the_target(target, batch, context):
    kv_heads = 32
    splits = default_num_splits(batch, kv_heads, context, target)
    by_length = max(1, context // 256)
    # The fewest splits that give two programs per SM, unless the context runs out of 256-key splits first.
    fewest = next(s for s in range(1, 65) if batch * kv_heads * s >= 2 * target.num_sms)
    assert splits == min(fewest, by_length, 64)
    with planning_for(target):
        assert default_num_splits(batch, kv_heads, context, torch.device("cpu")) == splits
    # The interpreter runs programs one after another: splitting would only add work.
    assert default_num_splits(batch, kv_heads, context, "cpu") == default_num_splits(
        batch, kv_heads, context, INTERPRETER) == 1


def test_gemv_tiles_follow_the_target():
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
        one = gemv_config(1, n, k, H100)
        assert not one["USE_DOT"] and k % one["BLOCK_K"] == 0
        # Row tiles of 16 only when that still leaves four programs per SM.
        assert one["BLOCK_N"] == (16 if -(-n // 16) >= 4 * H100.num_sms else 8)
        many = gemv_config(5, n, k, H100)
        assert many["USE_DOT"] and many["BLOCK_M"] >= 5 and k % many["BLOCK_K"] == 0
    assert gemv_config(1, 4096, 4096, INTERPRETER)["BLOCK_K"] == 64  # small tiles in the interpreter
    # More SMs, smaller row tiles for the same weight: 11008 rows are 688 tiles of 16, over 4 x 132 but not 4 x 200.
    assert gemv_config(1, 11008, 4096, Target(200, (9, 0)))["BLOCK_N"] == 8
    assert gemv_config(1, 11008, 4096, H100)["BLOCK_N"] == 16


def test_fp8_bytes_are_decoded_only_before_sm89():
    assert needs_w_bits(A100) and not needs_w_bits(H100) and not needs_w_bits(Target(128, (8, 9)))
    assert not needs_w_bits(INTERPRETER)


def test_prefill_tiles_grow_with_the_prompt_on_a_gpu_only():
    tiles = [launch_config(q, 128, 16, torch.float16, H100)["BLOCK_M"] for q in (1, 16, 17, 32, 64, 65, 4096)]
    assert tiles == [16, 16, 32, 32, 64, 128, 128]
    assert {launch_config(q, 128, 16, torch.float16, INTERPRETER)["BLOCK_M"] for q in (1, 64, 4096)} == {16}
