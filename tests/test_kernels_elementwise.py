"""Triton RMSNorm (plain and fused with the residual add) and SiLU-and-mul against torch references.

Outputs allocated by the wrappers are NaN-poisoned (see `poisoned_alloc`), so a result that matches the
reference was fully written by the kernel.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from selfrag_engine.kernels.activation import silu_and_mul
from selfrag_engine.kernels.rmsnorm import rms_norm

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# One unit in the last place of the output dtype, plus the odd rsqrt / exp rounding difference.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


def _randn(shape, dtype, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype=dtype, device=DEVICE)


def ref_rms_norm(x, weight, eps, residual=None, compute=torch.float32):
    """HF Llama RMSNorm: residual sum rounded to x's dtype, variance in `compute`, cast back, then * weight.

    With compute=float64 nothing is rounded to x's dtype, which makes it the exact oracle.
    """
    exact = compute == torch.float64
    if residual is not None:
        x = x.to(compute) + residual.to(compute) if exact else (x.float() + residual.float()).to(x.dtype)
        residual = x
    h = x.to(compute)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = h if exact else h.to(x.dtype)
    out = (out.to(compute) * weight.to(compute))
    out = out if exact else out.to(x.dtype)
    return out if residual is None else (out, residual)


def ref_silu_and_mul(x, compute=torch.float32):
    inter = x.shape[1] // 2
    out = F.silu(x[:, :inter].to(compute)) * x[:, inter:].to(compute)
    return out if compute == torch.float64 else out.to(x.dtype)


def test_references_match_float64():
    x, r, w = _randn((7, 100), torch.float16, 0), _randn((7, 100), torch.float16, 1), _randn(100, torch.float16, 2)
    for residual in (None, r):
        got = ref_rms_norm(x, w, 1e-5, residual)
        exact = ref_rms_norm(x, w, 1e-5, residual, compute=torch.float64)
        got, exact = (got, exact) if residual is None else (got[0], exact[0])
        torch.testing.assert_close(got.double(), exact, atol=1e-2, rtol=1e-2)
    # The float64 RMSNorm against the formula written out longhand.
    row = x[3].double()
    longhand = row / (sum(v * v for v in row.tolist()) / 100 + 1e-5) ** 0.5 * w.double()
    torch.testing.assert_close(ref_rms_norm(x, w, 1e-5, compute=torch.float64)[3], longhand)

    g = _randn((5, 64), torch.float16, 3, scale=4.0)
    exact = ref_silu_and_mul(g, compute=torch.float64)
    torch.testing.assert_close(ref_silu_and_mul(g).double(), exact, atol=1e-2, rtol=1e-3)
    gate, up = g[1, :32].double(), g[1, 32:].double()
    torch.testing.assert_close(exact[1], gate / (1 + torch.exp(-gate)) * up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,hidden", [(1, 64), (5, 100), (13, 4096)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, rows, hidden, with_residual, poisoned_alloc):
    x = _randn((rows, hidden), dtype, 10, scale=3.0)
    weight = _randn(hidden, dtype, 11) + 1.0
    residual = _randn((rows, hidden), dtype, 12) if with_residual else None
    x_in = x.clone()
    res_in = residual.clone() if with_residual else None
    got = rms_norm(x, weight, 1e-6, residual)
    want = ref_rms_norm(x, weight, 1e-6, residual)
    assert torch.equal(x, x_in) and (not with_residual or torch.equal(residual, res_in)), "inputs must not change"
    if with_residual:
        (out, new_res), (want_out, want_res) = got, want
        # The rounded sum is exact in both: fp32 holds the fp16 sum exactly before the single rounding.
        assert torch.equal(new_res, want_res)
    else:
        out, want_out = got, want
    assert out.dtype == dtype and out.shape == x.shape
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, want_out, **TOL[dtype])


def test_rms_norm_strided_rows(poisoned_alloc):
    base = _randn((6, 300), torch.float16, 13)
    x = base[:, 50:250]  # rows with a stride larger than the hidden size
    weight = _randn(200, torch.float32, 14)
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), ref_rms_norm(x, weight, 1e-5), **TOL[torch.float16])


def test_rms_norm_rejects_bad_inputs():
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(7, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="x must be"):
        rms_norm(x[0], torch.ones(8, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(8, device=DEVICE), 1e-6, residual=x.half())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,inter", [(1, 16), (7, 100), (3, 2500)])
def test_silu_and_mul(dtype, rows, inter, poisoned_alloc):
    x = _randn((rows, 2 * inter), dtype, 20, scale=4.0)
    x[0, 0] = -100.0  # exp overflow: silu must give -0, not NaN
    out = silu_and_mul(x)
    assert out.shape == (rows, inter) and out.dtype == dtype
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref_silu_and_mul(x), **TOL[dtype])


def test_silu_and_mul_strided_rows_and_errors(poisoned_alloc):
    base = _randn((4, 80), torch.float16, 21)
    x = base[:, 8:72]
    torch.testing.assert_close(silu_and_mul(x), ref_silu_and_mul(x), **TOL[torch.float16])
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.randn(2, 5, device=DEVICE))
    with pytest.raises(ValueError, match="x must be"):
        silu_and_mul(torch.randn(4, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_gpu_rms_norm(dtype, with_residual, poisoned_alloc):
    x = _randn((4099, 5120), dtype, 30, scale=3.0)
    weight = _randn(5120, dtype, 31) + 1.0
    residual = _randn((4099, 5120), dtype, 32) if with_residual else None
    got = rms_norm(x, weight, 1e-5, residual)
    want = ref_rms_norm(x, weight, 1e-5, residual)
    if with_residual:
        assert torch.equal(got[1], want[1])
        got, want = got[0], want[0]
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_silu_and_mul(dtype, poisoned_alloc):
    x = _randn((4099, 2 * 11008), dtype, 33, scale=4.0)
    torch.testing.assert_close(silu_and_mul(x), ref_silu_and_mul(x), **TOL[dtype])
