"""The kernels at the launch plans a Hopper GPU takes, run by the interpreter: `planning_for(H100)` makes every
launch function choose the H100/H200 configuration (64-key decode tiles and split counts for 132 SMs, 128-query
prefill tiles, the GEMV row and K blocks of 7B weights), whatever device the tensors are on, so the programs a
GPU would run are the ones checked here against float64 references.

Shapes are Llama-2-7B's where the plan depends on them (head_dim 128, K = 4096 and 11008, vocabulary 32016),
with fewer heads and weight rows than 7B, as a model test uses fewer layers: the plans do not depend on those
counts beyond the split heuristic, which is asserted where it matters. Pools are NaN outside every context, and
outputs are NaN-poisoned before the launch.

What stays GPU-only: the compiled code itself (register allocation, fast exp2/log2 and fused multiply-adds
under TRITON_DEFAULT_FP_FUSION=1, tf32 dots, bf16), covered by the `-m gpu` tests with tolerances sized for it.
"""
from __future__ import annotations

import pytest
import torch

from selfrag_engine.kernels import H100, planning_for
from selfrag_engine.kernels.decode_attention import (_block_n, cascade_decode_attention, default_num_splits,
                                                      paged_decode_attention)
from selfrag_engine.kernels.fp8_linear import fp8_linear, gemv_config
from selfrag_engine.kernels.fp8_silu_gemv import fp8_silu_mul_linear
from selfrag_engine.kernels.prefill_attention import launch_config, prefill_attention
from selfrag_engine.layers.fp8_linear import quantize_fp8_per_channel
from tests.test_kernels_attention import _assert_f64, _gen, _randn, make_cascade_pool, make_pool, ref_attention

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's run of a GPU's plans")

HEAD_DIM = 128


def test_prefill_at_the_h100_plan(poisoned_alloc):
    q_lens, ctx_lens = [130, 40], [130, 300]
    cfg = launch_config(max(q_lens), HEAD_DIM, 16, torch.float16, H100)
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"]) == (128, 64)  # not the interpreter's 16 x 16
    gen = _gen(40)
    pool = make_pool(ctx_lens, 16, 2, HEAD_DIM, torch.float16, gen)
    q = _randn((sum(q_lens), 4, HEAD_DIM), torch.float16, gen)
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    scale = HEAD_DIM ** -0.5
    with planning_for(H100):
        out = prefill_attention(q, pool.k_cache, pool.v_cache, pool.block_tables, cu, pool.context_lens, scale,
                                max(q_lens))
    _assert_f64(out, ref_attention(q, pool.k_cache, pool.v_cache, pool.block_tables, q_lens, ctx_lens, scale,
                                   compute=torch.float64), torch.float16)


@pytest.mark.parametrize("heads,kv_heads,ctx_lens", [(32, 4, [512, 77]), (8, 8, [1, 600])],
                         ids=["gqa8-512", "mha-600"])
def test_paged_decode_at_the_h100_plan(heads, kv_heads, ctx_lens, poisoned_alloc):
    splits = default_num_splits(len(ctx_lens), kv_heads, max(ctx_lens), H100)
    assert splits > 1 and _block_n(HEAD_DIM, 16, H100) == 64  # split-K and 64-key tiles, as on the GPU
    gen = _gen(41)
    pool = make_pool(ctx_lens, 16, kv_heads, HEAD_DIM, torch.float16, gen)
    q = _randn((len(ctx_lens), heads, HEAD_DIM), torch.float16, gen)
    scale = HEAD_DIM ** -0.5
    with planning_for(H100):
        out = paged_decode_attention(q, pool.k_cache, pool.v_cache, pool.block_tables, pool.context_lens, scale,
                                     max_context_len=max(ctx_lens))
    _assert_f64(out, ref_attention(q, pool.k_cache, pool.v_cache, pool.block_tables, [1] * len(ctx_lens),
                                   ctx_lens, scale, compute=torch.float64), torch.float16)


def test_cascade_k5_at_the_h100_plan(poisoned_alloc):
    gen = _gen(42)
    # Five Self-RAG branches over a shared 512-token prompt, and one unrelated row.
    pool, group_start, prefix_blocks = make_cascade_pool([(32, [50, 47, 61, 1, 16]), (0, [70])], 16, 2, HEAD_DIM,
                                                         torch.float16, gen)
    q = _randn((6, 4, HEAD_DIM), torch.float16, gen)
    scale = HEAD_DIM ** -0.5
    with planning_for(H100):
        out = cascade_decode_attention(q, pool.k_cache, pool.v_cache, pool.block_tables, pool.context_lens,
                                       group_start, prefix_blocks, scale, max_group_size=5,
                                       max_context_len=max(pool.ctx_lens))
    _assert_f64(out, ref_attention(q, pool.k_cache, pool.v_cache, pool.block_tables, [1] * 6, pool.ctx_lens, scale,
                                   compute=torch.float64), torch.float16)


def _fp8_weight(n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-3, 4, (n, 1), generator=g).float())
    return quantize_fp8_per_channel(w)


@pytest.mark.parametrize("m", [1, 5])
def test_fp8_gemv_at_the_h100_plan(m, poisoned_alloc):
    """The 7B projections' K (4096), fewer weight rows; the H100 GEMV tiles (BLOCK_K 512 or 256, no K mask)."""
    n, k = 96, 4096
    cfg = gemv_config(m, n, k, H100)
    assert cfg["BLOCK_K"] in (256, 512) and cfg["USE_DOT"] == (m > 1)
    q, s = _fp8_weight(n, k, seed=43 + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(44)).half()
    with planning_for(H100):
        y = fp8_linear(x, q, s, path="gemv")
    ref = x.double() @ (q.double() * s.double()[:, None]).T
    assert not torch.isnan(y).any()
    assert float((y.double() - ref).norm() / ref.norm()) < 2e-3


def test_fp8_silu_gemv_at_the_h100_plan(poisoned_alloc):
    """The 7B down projection's K (11008 = 43 x 256), one row, fewer weight rows."""
    n, k = 64, 11008
    assert gemv_config(1, n, k, H100)["BLOCK_K"] == 256
    q, s = _fp8_weight(n, k, seed=45)
    g = torch.Generator().manual_seed(46)
    gate_up = (torch.randn(1, 2 * k, generator=g) * 2).half()
    with planning_for(H100):
        y = fp8_silu_mul_linear(gate_up, q, s)
    gate, up = gate_up[:, :k].double(), gate_up[:, k:].double()
    ref = (gate * torch.sigmoid(gate) * up) @ (q.double() * s.double()[:, None]).T
    assert float(ref.abs().max()) < torch.finfo(torch.float16).max / 8  # inside fp16's range
    assert not torch.isnan(y).any()
    assert float((y.double() - ref).norm() / ref.norm()) < 2e-3
