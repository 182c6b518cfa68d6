"""The FP8 GEMV with a SiLU-and-mul prologue (kernels/fp8_silu_gemv.py) against a float64 reference and, bit for
bit, against the unfused pair (silu_and_mul, then fp8_linear) at the same launch parameters.

Outputs allocated by the wrapper are NaN-poisoned (the `poisoned_alloc` fixture of tests/test_fp8_norm_gemv.py).
"""
from __future__ import annotations

import math

import pytest
import torch

from selfrag_engine.kernels.activation import silu_and_mul
from selfrag_engine.kernels.fp8_linear import fp8_linear
from selfrag_engine.kernels.fp8_silu_gemv import fp8_silu_mul_linear
from selfrag_engine.layers.fp8_linear import quantize_fp8_per_channel
from tests.test_fp8_norm_gemv import TOL

gpu = pytest.mark.gpu
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, seed: int, device: str = DEV):
    """gate|up with gates on both sides of zero (some far out, where the sigmoid saturates), and per-channel
    FP8 weights whose rows differ in magnitude."""
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(m, k, generator=g) * 3.0
    gate[:, ::7] *= 8.0
    up = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-6, 7, (n, 1), generator=g).float())
    q, s = quantize_fp8_per_channel(w)
    gate_up = torch.cat([gate, up], dim=1).to(dtype)
    return gate_up.to(device), q.to(device), _fit_range(gate_up, q, s, dtype).to(device)


def _range_limit(dtype: torch.dtype) -> float:
    """The largest exact result a test may ask of a dtype: an eighth of its range (fp16: 8188)."""
    return torch.finfo(dtype).max / 8


def _fit_range(gate_up, q, s, dtype):
    """The weight scales, scaled by a power of two (exactly) so that the float64 result lies within the dtype's
    range: at Llama-2-7B's down projection (K = 11008) these inputs reach 1.6e5, where fp16 rightly gives inf."""
    peak = float(ref_silu_mul_linear(gate_up, q, s).abs().max())
    limit = _range_limit(dtype)
    return s if peak <= limit else s * 2.0 ** -math.ceil(math.log2(peak / limit))


def ref_silu_mul_linear(gate_up, q, s):
    """float64 (silu(gate) * up) @ (q * s).T, nothing rounded."""
    k = q.shape[1]
    gate, up = gate_up[:, :k].double(), gate_up[:, k:].double()
    return (gate * torch.sigmoid(gate) * up) @ (q.double() * s.double()[:, None]).T


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _check(gate_up, q, s, dtype, **kw):
    ref = ref_silu_mul_linear(gate_up, q, s)
    # Inputs checked against the dtype's range before the kernel runs: a result past it is no kernel error.
    assert float(ref.abs().max()) <= _range_limit(dtype)
    y = fp8_silu_mul_linear(gate_up, q, s, **kw)
    assert y.dtype == dtype and not torch.isnan(y).any() and torch.isfinite(y).all()
    assert _rel(y, ref) < TOL[dtype]
    unfused = fp8_linear(silu_and_mul(gate_up), q, s, path="gemv", **kw)
    assert torch.equal(y, unfused)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("nk", [(136, 200), (72, 64), (40, 160)], ids=lambda nk: f"N{nk[0]}K{nk[1]}")
@pytest.mark.parametrize("m", [1, 3, 16])
def test_kernel_matches_float64_and_the_unfused_pair(m, nk, dtype, poisoned_alloc):
    n, k = nk
    gate_up, q, s = _inputs(m, n, k, dtype, seed=m * 100 + n + k)
    _check(gate_up, q, s, dtype)


@pytest.mark.parametrize("m", [1, 5])
def test_kernel_byte_decoding_path(m, poisoned_alloc):
    gate_up, q, s = _inputs(m, 72, 136, torch.float16, seed=50 + m)
    _check(gate_up, q, s, torch.float16, w_bits=True)


@pytest.mark.parametrize("cfg", [
    dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=32, USE_DOT=False, num_warps=4, num_stages=1),
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, USE_DOT=True, num_warps=4, num_stages=1),
], ids=["fma", "dot"])
def test_kernel_other_tiles(cfg, poisoned_alloc):
    """Several K blocks with ragged N and K edges; and gate_up rows strided (a view into a wider buffer)."""
    m = 1 if not cfg["USE_DOT"] else 7
    gate_up, q, s = _inputs(m, 100, 200, torch.float16, seed=71)
    wide = torch.full((m, 2 * 200 + 24), float("nan"), dtype=torch.float16, device=DEV)
    wide[:, 8:408] = gate_up
    _check(wide[:, 8:408], q, s, torch.float16, gemv_cfg=cfg)


def test_errors():
    gate_up, q, s = _inputs(3, 40, 64, torch.float32, seed=9)
    with pytest.raises(ValueError, match="at most GEMV_MAX_M"):
        fp8_silu_mul_linear(torch.randn(17, 128, device=DEV), q, s)
    with pytest.raises(ValueError, match=r"\[M, 2\*K\]"):
        fp8_silu_mul_linear(gate_up[:, :64], q, s)
    with pytest.raises(ValueError, match="scale must be"):
        fp8_silu_mul_linear(gate_up, q, s[:8])


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("w_bits", [False, True])
def test_gpu_kernel_shapes(dtype, w_bits, poisoned_alloc):
    if not w_bits and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("native e4m3 needs sm_89+")
    for n, k in ((4096, 11008), (136, 200)):
        for m in (1, 3, 16):
            gate_up, q, s = _inputs(m, n, k, dtype, seed=m + n, device="cuda")
            _check(gate_up, q, s, dtype, w_bits=w_bits)
