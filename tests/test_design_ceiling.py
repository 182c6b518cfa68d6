"""bench/design_ceiling.py's counts against a hand computation on a configuration small enough to add up."""
from __future__ import annotations

import dataclasses

import pytest

from bench.design_ceiling import (BYTES_PER_HOST_ENTRY, Shape, kv_bytes_per_token, ours_long, ours_short,
                                  reference_long, reference_short, weight_bytes)
from selfrag_engine.testing import tiny_config

# Weights 100 bytes a pass, K/V 10 bytes a token, 8 logits (32 bytes of float32), 1 byte/s so seconds are bytes.
TINY = Shape(weight_bytes=100, kv_bytes=10, vocab=8, hbm_bytes_per_s=1.0, link_bytes_per_s=1.0, k=2,
             prompt_tokens=3, passage_tokens=4, new_tokens=2, beam_width=2, segments=2, draft_logprobs=8,
             branch_logprobs=5, long_form_logprobs=6)


def test_model_bytes_by_hand():
    cfg = tiny_config(hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=10)
    # q 4x4, k and v 4x2 (one kv head of dim 2), o 4x4, gate/up/down 4x8 each, at one byte; head 10x4 at two;
    # three norms of 4 at two.
    assert weight_bytes(cfg) == (16 + 8 + 8 + 16 + 32 * 3) + 10 * 4 * 2 + 3 * 4 * 2
    assert kv_bytes_per_token(cfg) == 2 * 1 * 1 * 2 * 2
    # Llama-2-7B with FP8 linears: the 6.74 GB a forward pass reads, 0.5 MiB of K/V per token.
    from bench.workload import LLAMA2_7B
    assert weight_bytes(LLAMA2_7B) / 1e9 == pytest.approx(6.74, abs=0.005)
    assert kv_bytes_per_token(LLAMA2_7B) == 2**19


def test_reference_short_form_by_hand():
    logits = 3 * 8 * 4  # log-softmax read and write, top-k read, of float32 logits
    w = reference_short(TINY, "adaptive")
    draft = (100 + 3 * 10) + 2 * 100 + (3 + 4) * 10 + 2 * (10 + logits)
    branches = (100 + 2 * 7 * 10) + 2 * 100 + 2 * (7 + 8) * 10 + 2 * 2 * (10 + logits)
    assert w.forwards == 1 + 2 + 1 + 2
    assert w.hbm_bytes == draft + branches
    assert w.host_entries == 2 * 8 + 2 * 2 * 5
    assert w.host_bytes == w.host_entries * BYTES_PER_HOST_ENTRY
    assert w.seconds(TINY) == draft + branches + w.host_bytes
    assert w.seconds(TINY, host_s_per_entry=0.5) == w.seconds(TINY) + 0.5 * (16 + 20)
    always = reference_short(TINY, "always")
    assert always.forwards == 3 and always.hbm_bytes == branches and always.host_entries == 20


def test_ours_short_form_by_hand():
    # The prompt, then the two passages as one batch; two rows of 7 tokens sharing the prompt's 3, read once.
    w = ours_short(TINY, "adaptive")
    assert w.forwards == 4 and w.host_entries == 0
    assert w.hbm_bytes == (100 + 30) + (100 + 80) + 2 * 100 + (2 * (7 + 8) - 3 * 2) * 10 + 2 * 2 * (10 + 32)
    half = ours_short(dataclasses.replace(TINY, passes_per_token=0.5), "always")
    assert half.forwards == 3
    assert half.hbm_bytes == (100 + 30) + (100 + 80) + 100 + 0.5 * (2 * (7 + 8) - 3 * 2) * 10 + 2 * 2 * (10 + 32)


def test_long_form_by_hand():
    s = dataclasses.replace(TINY, new_tokens=3)
    ref = reference_long(s)
    assert ref.forwards == 1 + 3 and ref.host_entries == 2 * 3 * 6
    assert ref.hbm_bytes == (100 + 2 * 7 * 10) + 3 * 100 + 2 * (7 + 8 + 9) * 10 + 2 * 3 * (10 + 96)
    ours = ours_long(s)
    # Depth 0: one node, two children of 7 tokens (the prompt's 3 shared), two tokens each. Depth 1: two nodes
    # of 5 tokens (prompt and segment), four children of 9, one token each, each node's 5 read once per pass.
    depth0 = (100 + 80) + 2 * 100 + (2 * (7 + 8) - 3 * 2) * 10 + 2 * 2 * (10 + 32)
    depth1 = (100 + 160) + 100 + (4 * 9 - 2 * 5) * 10 + 4 * (10 + 32)
    assert ours.forwards == 1 + (1 + 2) + (1 + 1)
    assert ours.hbm_bytes == (100 + 30) + depth0 + depth1


def test_fp8_kv_by_hand():
    """An FP8 cache: K/V at one byte an element, and each decoding row reads its scales once per pass."""
    from bench.design_ceiling import kv_scale_bytes_per_row
    from bench.workload import LLAMA2_7B
    assert kv_bytes_per_token(LLAMA2_7B, 1) == 2**18
    assert kv_scale_bytes_per_row(LLAMA2_7B) == 2 * 32 * 32 * 4
    fp8 = dataclasses.replace(TINY, kv_bytes=5, kv_scale_bytes=3)
    w = ours_short(fp8, "always")
    # As test_ours_short_form_by_hand at half the K/V bytes, plus 2 passes x 2 rows x 3 bytes of scales.
    assert w.hbm_bytes == (100 + 15) + (100 + 40) + 2 * 100 + (2 * (7 + 8) - 3 * 2) * 5 + 2 * 2 * (5 + 32) + 2 * 2 * 3
