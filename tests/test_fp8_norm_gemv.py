"""The FP8 GEMV with an RMSNorm prologue (kernels/fp8_norm_gemv.py) against a float64 norm-then-project, against
the unfused pair (rms_norm, then fp8_linear), and in the model's decode step against the unfused and torch paths.

Outputs allocated by the wrapper are NaN-poisoned (see `poisoned_alloc`), so a result that matches the
reference was fully written by the kernel.
"""
from __future__ import annotations

import os

import pytest
import torch

from selfrag_engine import Engine, SamplingParams
from selfrag_engine.engine.launch_counter import LaunchCounter
from selfrag_engine.kernels.fp8_linear import fp8_linear
from selfrag_engine.kernels.fp8_norm_gemv import fp8_rms_norm_linear
from selfrag_engine.kernels.rmsnorm import rms_norm
from selfrag_engine.layers.fp8_linear import Fp8Linear, quantize_fp8_per_channel
from tests.helpers import tiny_checkpoint

gpu = pytest.mark.gpu
DEV = "cuda" if torch.cuda.is_available() else "cpu"
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs the model's kernels in the Triton interpreter")
EPS = 1e-5
# ‖out - ref‖ / ‖ref‖ against float64, as tests/test_fp8.py: fp32 is bound by the fp32 accumulation, fp16 / bf16
# by the rounding of the dot's operand and of the output (seen: fp16 ~3e-4 fused, ~4e-4 unfused).
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 6e-3}


def _gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, seed: int, residual: bool, device: str = DEV):
    """x with a hidden state's spread (rows of different scales), a residual, a norm weight around 1 with
    spread, and per-channel FP8 weights whose rows differ in magnitude."""
    g = _gen(seed)
    x = torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-2, 4, (m, 1), generator=g).float())
    r = torch.randn(m, k, generator=g) * 2.0 if residual else None
    nw = 1.0 + 0.5 * torch.randn(k, generator=g)
    w = torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-6, 7, (n, 1), generator=g).float())
    q, s = quantize_fp8_per_channel(w)
    to = dict(device=device, dtype=dtype)
    return x.to(**to), None if r is None else r.to(**to), nw.to(**to), q.to(device), s.to(device)


def ref_norm_linear(x, norm_w, eps, q, s, residual=None):
    """float64 RMSNorm(x [+ residual]) * norm_w @ (q * s).T; the residual sum rounded to x's dtype first (it is
    the residual stream, held in that dtype), nothing rounded after it. Returns (y, h)."""
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    hd = h.double()
    normed = hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + eps) * norm_w.double()
    return normed @ (q.double() * s.double()[:, None]).T, h


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _check(x, r, nw, q, s, dtype, **kw):
    out = fp8_rms_norm_linear(x, nw, EPS, q, s, r, **kw)
    y, h = (out, None) if r is None else out
    want, want_h = ref_norm_linear(x, nw, EPS, q, s, r)
    assert y.dtype == dtype and y.shape == want.shape
    assert not torch.isnan(y).any()
    assert _rel(y, want) < TOL[dtype]
    if r is not None:
        assert h.dtype == dtype and torch.equal(h, want_h)
    # The unfused pair, on the same inputs: the same error bound, and one activation rounding apart.
    unfused = rms_norm(x, nw, EPS, r)
    y2 = fp8_linear(unfused if r is None else unfused[0], q, s, **{k: v for k, v in kw.items() if k == "w_bits"})
    assert _rel(y2, want) < TOL[dtype]
    assert _rel(y, y2) < TOL[dtype]
    if r is not None:
        assert torch.equal(h, unfused[1])
    return y


# -- kernel (interpreter) ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("nk", [(136, 200), (72, 64), (40, 136)], ids=lambda nk: f"N{nk[0]}K{nk[1]}")
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("residual", [False, True], ids=["no-residual", "residual"])
def test_kernel_matches_float64(m, nk, dtype, residual, poisoned_alloc):
    n, k = nk
    x, r, nw, q, s = _inputs(m, n, k, dtype, seed=m * 100 + n + k, residual=residual)
    _check(x, r, nw, q, s, dtype)


@pytest.mark.parametrize("residual", [False, True], ids=["no-residual", "residual"])
@pytest.mark.parametrize("m", [1, 5])
def test_kernel_byte_decoding_path(m, residual, poisoned_alloc):
    """The pre-sm_89 path reads W as uint8 and decodes e4m3 with integer ops."""
    x, r, nw, q, s = _inputs(m, 72, 136, torch.float16, seed=40 + m, residual=residual)
    _check(x, r, nw, q, s, torch.float16, w_bits=True)


@pytest.mark.parametrize("cfg", [
    dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=32, USE_DOT=False, num_warps=4, num_stages=1),
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, USE_DOT=True, num_warps=4, num_stages=1),
], ids=["fma", "dot"])
def test_kernel_other_tiles(cfg, poisoned_alloc):
    """Tiles with several K blocks and ragged N and K edges (K=200 is 6.25 blocks of 32, N=100 not a multiple of
    the tile): the residual is written once, whole, by program 0, whatever the tiles."""
    m = 1 if not cfg["USE_DOT"] else 7
    x, r, nw, q, s = _inputs(m, 100, 200, torch.float16, seed=61, residual=True)
    _check(x, r, nw, q, s, torch.float16, gemv_cfg=cfg)


def test_strided_rows_and_errors():
    x, r, nw, q, s = _inputs(3, 40, 64, torch.float32, seed=7, residual=True)
    wide = torch.randn(3, 96, generator=_gen(8)).to(DEV)
    xs = wide[:, 16:80]  # rows strided, unit stride along K
    y, h = fp8_rms_norm_linear(xs, nw, EPS, q, s, r)
    want, want_h = ref_norm_linear(xs, nw, EPS, q, s, r)
    assert _rel(y, want) < TOL[torch.float32] and torch.equal(h, want_h)
    with pytest.raises(ValueError, match="at most GEMV_MAX_M"):
        fp8_rms_norm_linear(torch.randn(17, 64, device=DEV), nw, EPS, q, s)
    with pytest.raises(ValueError, match="norm_weight must be"):
        fp8_rms_norm_linear(x, nw[:32], EPS, q, s)
    with pytest.raises(ValueError, match="residual must match"):
        fp8_rms_norm_linear(x, nw, EPS, q, s, r.half())
    with pytest.raises(ValueError, match="features"):
        fp8_rms_norm_linear(x[:, :32], nw[:32], EPS, q, s)


# -- the model's decode step (interpreter) ---------------------------------------------------------------------

PROMPTS = ["the fused norm", "and a second, longer prompt for the ragged batch"]


def _engine(use_kernels: bool, dtype: torch.dtype) -> Engine:
    path = tiny_checkpoint(seed=33, num_key_value_heads=2, num_hidden_layers=3, hidden_size=96,
                           intermediate_size=200, num_attention_heads=6)
    return Engine.from_pretrained(path, dtype=dtype, progress=False, use_kernels=use_kernels, quantization="fp8")


def _generate(engine: Engine, fused: bool, monkeypatch) -> tuple[list, LaunchCounter]:
    with monkeypatch.context() as patch:
        if not fused:
            patch.setattr(Fp8Linear, "fuses_rms_norm", lambda self, x: False)
            patch.setattr(Fp8Linear, "fuses_silu_mul", lambda self, x: False)
        params = SamplingParams(max_tokens=5, temperature=0.0, logprobs=5, ignore_eos=True)
        with LaunchCounter(engine.model) as counter:
            outs = engine.generate(PROMPTS, params)
    return outs, counter


def _assert_logprobs_close(a, b, tol: float) -> None:
    """Same greedy tokens with log-probabilities within tol, and at every step the top-5 tokens within tol where
    both runs have them (near-ties at the fifth place may swap by a rounding in fp16)."""
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert max(abs(u - v) for u, v in zip(x.token_logprobs, y.token_logprobs)) < tol
        for step_x, step_y in zip(x.logprobs, y.logprobs):
            common = step_x.keys() & step_y.keys()
            assert len(common) >= 4
            for tok in common:
                assert abs(step_x[tok] - step_y[tok]) < tol, (tok, step_x[tok], step_y[tok])


@interpreted
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 3e-2)], ids=["fp32", "fp16"])
def test_model_decode_fused_equals_unfused_and_torch(dtype, tol, monkeypatch):
    """An FP8 model's decode logits (through their log-probabilities) with the norms and the SiLU-and-mul fused
    into the GEMVs equal those of the unfused kernels and of the torch reference; and the fused kernels are what
    ran."""
    fast = _engine(True, dtype)
    fused, counter = _generate(fast, True, monkeypatch)
    unfused, counter_unfused = _generate(fast, False, monkeypatch)
    reference, _ = _generate(_engine(False, dtype), True, monkeypatch)
    per_layer = counter.per_layer(decode=True)
    assert per_layer["_fp8_norm_gemv_kernel"] == 2.0 and "_rms_norm_kernel" not in per_layer
    assert per_layer["_fp8_silu_gemv_kernel"] == 1.0 and "_silu_and_mul_kernel" not in per_layer
    assert counter.decode_launches_per_layer() == 6.0
    per_layer_unfused = counter_unfused.per_layer(decode=True)
    assert per_layer_unfused["_rms_norm_kernel"] == 2.0 and per_layer_unfused["_silu_and_mul_kernel"] == 1.0
    _assert_logprobs_close(fused, unfused, tol)
    _assert_logprobs_close(fused, reference, tol)
    _assert_logprobs_close(unfused, reference, tol)


# -- GPU --------------------------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("w_bits", [False, True])
def test_gpu_kernel_shapes(dtype, w_bits, poisoned_alloc):
    if not w_bits and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("native e4m3 needs sm_89+")
    for n, k in ((12288, 4096), (22016, 4096), (136, 200)):
        for m in (1, 3, 16):
            for residual in (False, True):
                x, r, nw, q, s = _inputs(m, n, k, dtype, seed=m + n, residual=residual, device="cuda")
                _check(x, r, nw, q, s, dtype, w_bits=w_bits)
