"""FP8 weights: the Triton W8A16 kernels against float64, per-channel quantization against an independent
e4m3 rounding, Fp8Linear's checkpoint protocol, the pre-quantized config layouts, and the checkpoint rewriter.

On the CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET), so shapes stay tiny;
`pytest -m gpu` runs the compiled kernels on 7B shapes, bf16, the byte-decoding path and W8A8.
"""
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from selfrag_engine.errors import CheckpointError
from selfrag_engine.backend import choose_backend
from selfrag_engine.kernels.fp8_linear import FP8_DTYPE, fp8_linear, fp8_linear_w8a8
from selfrag_engine.layers.fp8_linear import Fp8Linear, quantize_fp8_per_channel, replace_linears_with_fp8
from selfrag_engine.weights.quant_config import fp8_quantization_config, parse_quantization_config
from selfrag_engine.weights.quantize import quantize_checkpoint

gpu = pytest.mark.gpu
# Kernel tests run compiled where a GPU is present (the interpreter is only set up without one).
DEV = "cuda" if torch.cuda.is_available() else "cpu"
NATIVE_FP8 = DEV == "cpu" or torch.cuda.get_device_capability() >= (8, 9)

# ‖out - ref‖ / ‖ref‖ against float64: fp32 output is bound by fp32 accumulation over K (~1e-7 seen);
# fp16 / bf16 output by the final rounding (2^-11 / 2^-8 per element, ~2e-4 / ~1.5e-3 seen).
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 6e-3}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand_fp8(n, k, seed, device=DEV):
    """FP8 weights as a checkpoint would hold them: rows of different magnitudes, quantized per channel."""
    g = _gen(seed)
    w = torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-6, 7, (n, 1), generator=g).float())
    q, s = quantize_fp8_per_channel(w)
    return q.to(device), s.to(device)


def _ref(x, q, s):
    return x.double() @ (q.double() * s.double()[:, None]).T


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _poisoned(shape, dtype, device=DEV):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


# -- kernels (interpreter) -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("nk", [(136, 200), (128, 256)], ids=lambda nk: f"N{nk[0]}K{nk[1]}")
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64])
def test_kernel_matches_float64(m, nk, dtype):
    n, k = nk
    q, s = _rand_fp8(n, k, seed=m * 1000 + n)
    x = torch.randn(m, k, generator=_gen(m + k)).to(DEV, dtype)
    out = _poisoned((m, n), dtype)
    y = fp8_linear(x, q, s, out=out)
    assert y.data_ptr() == out.data_ptr() and y.dtype == dtype
    assert not torch.isnan(y).any()
    assert _rel(y, _ref(x, q, s)) < TOL[dtype]


@pytest.mark.parametrize("m,path", [(1, "gemv"), (5, "gemv"), (3, "gemm"), (40, "gemm")])
def test_kernel_byte_decoding_path(m, path):
    """The pre-sm_89 path reads W as uint8 and decodes e4m3 with integer ops."""
    n, k = 72, 136
    q, s = _rand_fp8(n, k, seed=7 + m)
    x = torch.randn(m, k, generator=_gen(m)).to(DEV, torch.float16)
    y = fp8_linear(x, q, s, out=_poisoned((m, n), torch.float16), path=path, w_bits=True)
    assert _rel(y, _ref(x, q, s)) < TOL[torch.float16]


SWAP_CFG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, SWAP_AB=True, num_warps=4, num_stages=1)


@pytest.mark.parametrize("w_bits", [False, True])
@pytest.mark.parametrize("m", [17, 50])
def test_kernel_gemm_swapped_operands(m, w_bits):
    """The GEMM variant that feeds W as the MMA's A operand (one of the GPU autotuning candidates)."""
    n, k = 72, 100
    q, s = _rand_fp8(n, k, seed=9 + m)
    if not (w_bits or NATIVE_FP8):
        pytest.skip("native e4m3 needs sm_89+")
    x = torch.randn(m, k, generator=_gen(m)).to(DEV, torch.float16)
    y = fp8_linear(x, q, s, out=_poisoned((m, n), torch.float16), path="gemm", w_bits=w_bits, gemm_cfg=SWAP_CFG)
    assert _rel(y, _ref(x, q, s)) < TOL[torch.float16]


@pytest.mark.parametrize("w_bits", [False, True])
@pytest.mark.parametrize("path,cfg,m", [("gemv", None, 1), ("gemm", None, 5), ("gemm", SWAP_CFG, 5),
                                        ("gemv", dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, USE_DOT=True,
                                                      num_warps=4, num_stages=1), 5)],
                         ids=["fma", "gemm", "gemm-swap", "dot"])
def test_every_e4m3_value_decodes_exactly(path, cfg, m, w_bits):
    """One-hot rows of x read single weights back: all 254 finite e4m3 values (subnormals, +-0, +-448) must
    come out exactly, times a per-column scale, on every kernel path."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    g = _gen(3)
    n, k = 16, codes.numel()
    if not (w_bits or NATIVE_FP8):
        pytest.skip("native e4m3 needs sm_89+")
    q = torch.stack([codes[torch.randperm(k, generator=g)] for _ in range(n)]).view(FP8_DTYPE).to(DEV)
    s = (torch.exp2(torch.randint(-5, 6, (n,), generator=g).float()) * (1 + torch.rand(n, generator=g))).to(DEV)
    for rows in torch.randperm(k, generator=g)[:2 * m].view(-1, m):
        x = torch.zeros(m, k, device=DEV)
        x[torch.arange(m), rows] = 1.0
        y = fp8_linear(x, q, s, path=path, w_bits=w_bits, gemv_cfg=cfg if path == "gemv" else None,
                       gemm_cfg=cfg if path == "gemm" else None)
        assert torch.equal(y, q.float()[:, rows].T * s)


def test_kernel_batched_input_and_errors():
    q, s = _rand_fp8(40, 48, seed=2)
    x = torch.randn(2, 3, 48, generator=_gen(2)).to(DEV)
    y = fp8_linear(x, q, s)
    assert y.shape == (2, 3, 40)
    assert _rel(y, _ref(x.reshape(6, 48), q, s).reshape(2, 3, 40)) < TOL[torch.float32]
    xt = torch.randn(48, 4, generator=_gen(3)).to(DEV).T  # non-unit stride along K
    assert _rel(fp8_linear(xt, q, s), _ref(xt, q, s)) < TOL[torch.float32]
    assert fp8_linear(torch.randn(0, 48, device=DEV), q, s).shape == (0, 40)
    with pytest.raises(ValueError, match="K=48"):
        fp8_linear(torch.randn(2, 40, device=DEV), q, s)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_linear(x, q.float(), s)
    with pytest.raises(ValueError, match=r"scale must be float32 \[40\]"):
        fp8_linear(x, q, s.half())
    with pytest.raises(ValueError, match="out must be"):
        fp8_linear(x, q, s, out=torch.empty(6, 40, device=DEV))


def test_w8a8_scaled_mm_reference_on_cpu():
    """The W8A8 path is meant for Hopper; torch's CPU _scaled_mm takes the same row-wise scales, which checks
    the plumbing (scale layout, transposes). Activation rounding costs ~2^-5 relative error."""
    q, s = _rand_fp8(64, 96, seed=4, device="cpu")
    x = torch.randn(5, 96, generator=_gen(4))
    try:
        y = fp8_linear_w8a8(x, q, s)
    except RuntimeError as e:
        pytest.skip(f"torch._scaled_mm unavailable on this CPU build: {e}")
    assert y.shape == (5, 64) and y.dtype == x.dtype
    assert _rel(y, _ref(x, q, s)) < 0.06


# -- quantize_fp8_per_channel ----------------------------------------------------------------------------------

def _e4m3_round(v: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even onto the e4m3fn grid (3 mantissa bits, subnormal step 2^-9), in float64."""
    a = np.abs(v)
    _, ex = np.frexp(np.maximum(a, 2.0 ** -6))  # a = m * 2^ex, m in [0.5, 1)
    ulp = np.ldexp(1.0, ex - 1 - 3)
    return np.sign(v) * np.minimum(np.round(a / ulp) * ulp, 448.0)


def _check_quantized(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor):
    w64 = w.double().numpy()
    amax = np.abs(w64).max(axis=1)
    s64 = np.where(amax > 0, amax / 448.0, 1.0)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32 and s.shape == (w.shape[0],)
    # The float32 scale is amax / 448 correctly rounded.
    assert np.all(np.abs(s.double().numpy() - s64) <= s64 * 2.0 ** -24)
    v = w64 / s.double().numpy()[:, None]
    expect = _e4m3_round(v)
    got = q.double().numpy()
    assert not np.isnan(got).any() and np.abs(got).max() <= 448
    bad = got != expect
    # Only a quotient within float32 rounding of an e4m3 midpoint may round the other way.
    mid = (got + expect) / 2
    assert np.all(np.abs(v[bad] - mid[bad]) <= np.abs(v[bad]) * 2.0 ** -22), f"{bad.sum()} misrounded"
    # e4m3: relative error <= 2^-4 for normals; absolute <= 2^-10 * scale in the subnormal range.
    err = np.abs(w64 - got * s.double().numpy()[:, None])
    bound = 2.0 ** -4 * np.abs(w64) * (1 + 2.0 ** -20) + 2.0 ** -10 * s.double().numpy()[:, None]
    assert np.all(err <= bound)
    # Each nonzero row's amax lands on 448 exactly (saturating, never NaN).
    nz = amax > 0
    assert np.all(np.abs(got[nz]).max(axis=1) == 448.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_quantize_matches_independent_float64(dtype):
    g = _gen(11)
    w = torch.randn(37, 203, generator=g) * torch.exp2(torch.randint(-20, 10, (37, 1), generator=g).float())
    w[3, 7] = -w.abs().max() * 3  # an outlier row
    w[5] = 0.0
    w[9, :] = torch.randn(203, generator=g) * 1e-6
    w = w.to(dtype)
    q, s = quantize_fp8_per_channel(w)
    _check_quantized(w.float(), q, s)
    assert s[5] == 1.0 and torch.equal(q[5].view(torch.uint8), torch.zeros(203, dtype=torch.uint8))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(1, 70), log_mag=st.integers(-30, 30), seed=st.integers(0, 2**31))
def test_quantize_property(n, k, log_mag, seed):
    w = torch.randn(n, k, generator=_gen(seed)) * 2.0 ** log_mag
    _check_quantized(w, *quantize_fp8_per_channel(w))


def test_quantize_saturation_never_nan():
    """amax / (amax / 448) can round above 448 in float32; the clamp must keep it at 448, not NaN."""
    g = _gen(5)
    w = torch.rand(4096, 8, generator=g) * torch.exp2(torch.randint(-40, 40, (4096, 1), generator=g).float())
    q, s = quantize_fp8_per_channel(w)
    qf = q.float()
    assert not torch.isnan(qf).any()
    assert torch.all(qf.abs().amax(dim=1) == 448)


def test_quantize_chunked_is_identical(monkeypatch):
    import selfrag_engine.layers.fp8_linear as qmod

    w = torch.randn(50, 33, generator=_gen(6))
    q1, s1 = quantize_fp8_per_channel(w)
    monkeypatch.setattr(qmod, "_CHUNK_ELEMENTS", 100)  # 3 rows per chunk
    q2, s2 = quantize_fp8_per_channel(w)
    assert torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s1, s2)


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        quantize_fp8_per_channel(torch.randn(4))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        quantize_fp8_per_channel(torch.randn(4, 4).double())
    w = torch.randn(4, 4)
    w[2, 1] = float("inf")
    with pytest.raises(ValueError, match="row 2 has non-finite"):
        quantize_fp8_per_channel(w)


# -- Fp8Linear -------------------------------------------------------------------------------------------------

def test_fp8linear_quantize_on_load_and_forward():
    lin = Fp8Linear(24, 40, name="model.layers.0.mlp.up_proj")
    assert lin.expected_checkpoint_attrs(False) == {"weight"}
    assert lin.expected_checkpoint_attrs(True) == {"weight", "weight_scale"}
    w = torch.randn(40, 24, generator=_gen(8)).half()
    lin.load_checkpoint_tensor("weight", w)
    q, s = quantize_fp8_per_channel(w)
    assert torch.equal(lin.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(lin.weight_scale, s)
    x = torch.randn(2, 3, 24, generator=_gen(9))
    y = lin(x)
    assert y.shape == (2, 3, 40) and y.dtype == torch.float32
    assert _rel(y, (x.double() @ (q.double() * s.double()[:, None]).T)) < 1e-6
    # Against the unquantized layer: the e4m3 rounding error (~2^-5 relative).
    assert _rel(y, x.double() @ w.double().T) < 0.05
    assert lin(x.half()).dtype == torch.float16


@pytest.mark.parametrize("scale_shape", [(), (1,), (40,), (40, 1)], ids=str)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fp8linear_prequantized(scale_shape, scale_dtype):
    g = _gen(10)
    q = (torch.randn(40, 24, generator=g) * 50).to(FP8_DTYPE)
    scale = (torch.rand(scale_shape, generator=g) + 0.5).to(scale_dtype)
    lin = Fp8Linear(24, 40)
    lin.load_checkpoint_tensor("weight_scale", scale)  # order does not matter
    lin.load_checkpoint_tensor("weight", q)
    assert torch.equal(lin.weight.view(torch.uint8), q.view(torch.uint8))
    assert lin.weight_scale.dtype == torch.float32
    assert torch.equal(lin.weight_scale, scale.float().reshape(-1).expand(40))
    x = torch.randn(3, 24, generator=g)
    assert _rel(lin(x), _ref(x, q, lin.weight_scale)) < 1e-6


@pytest.mark.parametrize("attr,tensor,match", [
    ("weight", torch.randn(40, 23),
     r"'model.layers.1.self_attn.q_proj.weight' has shape \(40, 23\), expected \(40, 24\)"),
    ("weight", torch.randn(40, 24).to(torch.float8_e5m2), "dtype torch.float8_e5m2, expected float8_e4m3fn"),
    ("weight", torch.randint(0, 9, (40, 24), dtype=torch.int8), "dtype torch.int8"),
    ("weight_scale", torch.rand(1, 1, 2), r"shape \(1, 1, 2\), expected a per-tensor scale \[\] or \[1\], or "
                                          r"per-channel \[40\] or \[40, 1\]"),
    ("weight_scale", torch.rand(20), r"shape \(20,\)"),
    ("weight_scale", torch.ones(40, dtype=torch.int32), "weight_scale' has dtype torch.int32"),
    ("weight_scale", torch.tensor(float("nan")), "non-finite"),
    ("input_scale", torch.tensor(1.0), "unexpected tensor 'model.layers.1.self_attn.q_proj.input_scale'"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 14 else None)
def test_fp8linear_load_errors(attr, tensor, match):
    lin = Fp8Linear(24, 40, name="model.layers.1.self_attn.q_proj")
    with pytest.raises(CheckpointError, match=match):
        lin.load_checkpoint_tensor(attr, tensor)


def test_fp8linear_mixing_high_precision_weight_and_scale_is_rejected():
    lin = Fp8Linear(8, 4, name="l")
    lin.load_checkpoint_tensor("weight", torch.randn(4, 8))
    with pytest.raises(ValueError, match="comes with a high-precision weight"):
        lin.load_checkpoint_tensor("weight_scale", torch.ones(4))
    lin = Fp8Linear(8, 4, name="l")
    lin.load_checkpoint_tensor("weight_scale", torch.ones(4))
    with pytest.raises(ValueError, match="expected a float8_e4m3fn weight"):
        lin.load_checkpoint_tensor("weight", torch.randn(4, 8))


def test_fp8linear_keeps_dtypes_through_module_casts():
    lin = Fp8Linear(8, 4)
    lin.load_checkpoint_tensor("weight", torch.randn(4, 8, generator=_gen(12)))
    before = lin.weight.view(torch.uint8).clone(), lin.weight_scale.clone()
    seq = nn.Sequential(lin).to(torch.float16).bfloat16().float()
    assert seq[0].weight.dtype == FP8_DTYPE and seq[0].weight_scale.dtype == torch.float32
    assert torch.equal(seq[0].weight.view(torch.uint8), before[0]) and torch.equal(seq[0].weight_scale, before[1])
    meta = Fp8Linear(8, 4, device="meta").half()
    assert meta.weight.dtype == FP8_DTYPE and meta.weight.is_meta
    meta.to_empty(device="cpu")
    assert meta.weight.dtype == FP8_DTYPE and meta.weight.device.type == "cpu"
    assert set(dict(lin.state_dict())) == {"weight", "weight_scale"}


class _Toy(nn.Module):
    """Llama's module names, two layers, a biased linear that must stay, and optional tied embeddings."""

    def __init__(self, tie=False):
        super().__init__()
        self.config = type("C", (), {"tie_word_embeddings": tie})()
        self.embed_tokens = nn.Embedding(50, 16)
        self.layers = nn.ModuleList()
        for _ in range(2):
            layer = nn.Module()
            layer.self_attn = nn.Module()
            for p in ("q", "k", "v", "o"):
                setattr(layer.self_attn, f"{p}_proj", nn.Linear(16, 16, bias=False))
            layer.mlp = nn.Module()
            layer.mlp.gate_proj = nn.Linear(16, 24, bias=False)
            layer.mlp.up_proj = nn.Linear(16, 24, bias=False)
            layer.mlp.down_proj = nn.Linear(24, 16, bias=False)
            layer.norm = nn.LayerNorm(16)
            self.layers.append(layer)
        self.proj_with_bias = nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, 50, bias=False)


def test_replace_on_meta_allocates_nothing():
    with torch.device("meta"):
        model = _Toy()
    model.half()
    replace_linears_with_fp8(model)
    fp8 = {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert len(fp8) == 14 and "layers.1.mlp.down_proj" in fp8
    assert type(model.lm_head) is nn.Linear and type(model.proj_with_bias) is nn.Linear
    assert all(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    down = model.layers[1].mlp.down_proj
    assert (down.in_features, down.out_features, down.name) == (24, 16, "layers.1.mlp.down_proj")
    assert down.weight.dtype == FP8_DTYPE and down.weight.shape == (16, 24)
    model.to_empty(device="cpu")
    assert down.weight.dtype == FP8_DTYPE and model.embed_tokens.weight.dtype == torch.float16


def test_replace_skip_options():
    with torch.device("meta"):
        model = _Toy()
    replace_linears_with_fp8(model, skip=())
    assert isinstance(model.lm_head, Fp8Linear)
    with torch.device("meta"):
        model = _Toy(tie=True)
    replace_linears_with_fp8(model, skip=())
    assert type(model.lm_head) is nn.Linear  # tied to the embedding: left alone
    with torch.device("meta"):
        model = _Toy()
    replace_linears_with_fp8(model, skip=("lm_head", "q_proj"))
    assert type(model.layers[0].self_attn.q_proj) is nn.Linear
    assert isinstance(model.layers[0].self_attn.k_proj, Fp8Linear)


def test_replace_quantize_existing_matches_linear():
    torch.manual_seed(0)
    model = _Toy()
    x = torch.randn(5, 16)
    with torch.no_grad():
        ref = model.layers[0].mlp.gate_proj(x)
        replace_linears_with_fp8(model, quantize_existing=True)
        assert _rel(model.layers[0].mlp.gate_proj(x), ref) < 0.05


# -- quantization_config ---------------------------------------------------------------------------------------

_CT_W = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False,
         "group_size": None, "block_structure": None}
_CT_A = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}


def _ct(weights=None, inputs=None, ignore=("lm_head",), **extra):
    cfg = {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
           "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights or _CT_W,
                                         "input_activations": inputs, "output_activations": None}},
           "ignore": list(ignore), "kv_cache_scheme": None}
    cfg.update(extra)
    return cfg


@pytest.mark.parametrize("cfg", [
    {"quant_method": "fp8", "activation_scheme": "dynamic"},
    {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ["lm_head"], "weight_block_size": None},
    _ct(),
    _ct(inputs=_CT_A),
    _ct(weights={**_CT_W, "strategy": "tensor"}, inputs={**_CT_A, "strategy": "tensor"}),
    _ct(ignore=["re:.*lm_head"], format="naive-quantized"),
    fp8_quantization_config(),
], ids=["vllm-fp8", "vllm-fp8-ignored", "ct-w8a16-channel", "ct-fp8-dynamic", "ct-tensor", "ct-naive-regex",
        "ours"])
def test_parse_accepts(cfg):
    assert parse_quantization_config(cfg) == "fp8"


@pytest.mark.parametrize("cfg,match", [
    ({"quant_method": "awq", "bits": 4}, "quant_method 'awq'"),
    ({"quant_method": "gptq"}, "'gptq'"),
    ({"bits": 8}, "quant_method 'None'"),
    ({"quant_method": "fp8", "activation_scheme": "static"}, "activation_scheme 'static'.*input_scale"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise"),
    ({"quant_method": "fp8", "ignored_layers": ["model.layers.0.mlp.down_proj"]}, "only lm_head"),
    (_ct(inputs={**_CT_A, "dynamic": False, "strategy": "tensor"}), "static activation scales"),
    (_ct(weights={**_CT_W, "num_bits": 4, "type": "int"}), "type='int' num_bits=4"),
    (_ct(weights={**_CT_W, "strategy": "block", "block_structure": [128, 128]}), "strategy 'block'"),
    (_ct(weights={**_CT_W, "strategy": "group", "group_size": 128}), "strategy 'group'"),
    (_ct(ignore=()), "quantizes lm_head"),
    (_ct(ignore=["lm_head", "re:.*down_proj"]), "'re:.\\*down_proj'"),
    (_ct(format="pack-quantized"), "format 'pack-quantized'"),
    (_ct(kv_cache_scheme={"num_bits": 8}), "kv_cache_scheme"),
    (_ct(quantization_status="frozen"), "'frozen'"),
    ("fp8", "JSON object"),
])
def test_parse_rejects(cfg, match):
    with pytest.raises(ValueError, match=match):
        parse_quantization_config(cfg)


def test_parse_none():
    assert parse_quantization_config(None) is None


# -- checkpoint rewriting --------------------------------------------------------------------------------------

TINY = dict(vocab_size=80, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
TOKENIZER_FILES = {"tokenizer.model": b"\x00sp-model\xff", "tokenizer_config.json": b'{"a": 1}',
                   "special_tokens_map.json": b"{}", "added_tokens.json": b'{"[Retrieval]": 32000}',
                   "generation_config.json": b'{"do_sample": false}'}


def _tiny_tensors(seed, dtype):
    g = _gen(seed)
    h, f, v = TINY["hidden_size"], TINY["intermediate_size"], TINY["vocab_size"]
    kv = h // TINY["num_attention_heads"] * TINY["num_key_value_heads"]

    def r(*shape, s=0.1):
        return (torch.randn(*shape, generator=g) * s).to(dtype)

    t = {"model.embed_tokens.weight": r(v, h), "model.norm.weight": 1 + r(h), "lm_head.weight": r(v, h)}
    for i in range(TINY["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": 1 + r(h), p + "post_attention_layernorm.weight": 1 + r(h),
                  p + "self_attn.q_proj.weight": r(h, h), p + "self_attn.k_proj.weight": r(kv, h),
                  p + "self_attn.v_proj.weight": r(kv, h), p + "self_attn.o_proj.weight": r(h, h),
                  p + "mlp.gate_proj.weight": r(f, h), p + "mlp.up_proj.weight": r(f, h),
                  p + "mlp.down_proj.weight": r(h, f)})
    return t


def _write_tiny_hf(path, seed=0, dtype=torch.float16, shards=1):
    """A Hugging Face-layout Llama checkpoint with HF tensor names (single or sharded with an index)."""
    path.mkdir(parents=True)
    tensors = _tiny_tensors(seed, dtype)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
           "torch_dtype": {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype],
           **TINY}
    (path / "config.json").write_text(json.dumps(cfg))
    for name, data in TOKENIZER_FILES.items():
        (path / name).write_bytes(data)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return tensors
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors


def _read_all(path):
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]
    out = {}
    for fname in files:
        with safe_open(str(path / fname), framework="pt") as f:
            for name in f.keys():
                assert name not in out
                out[name] = f.get_tensor(name)
    return out


@pytest.mark.parametrize("src_shards,shard_size", [(1, 2 << 30), (3, 6000)], ids=["single", "sharded"])
def test_quantize_checkpoint_round_trip(tmp_path, src_shards, shard_size):
    src, dst = tmp_path / "src", tmp_path / "dst"
    original = _write_tiny_hf(src, seed=1, shards=src_shards)
    quantize_checkpoint(src, dst, shard_size_bytes=shard_size, progress=False)
    written = _read_all(dst)
    index = dst / "model.safetensors.index.json"
    if shard_size < 2 << 30:
        doc = json.loads(index.read_text())
        files = set(doc["weight_map"].values())
        assert len(files) > 1 and all((dst / f).is_file() for f in files)
        assert set(doc["weight_map"]) == set(written)
        assert doc["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())
    else:
        assert not index.exists() and (dst / "model.safetensors").is_file()
    linears = [n for n in original if n.endswith("_proj.weight")]
    assert len(linears) == 14
    assert set(written) == set(original) | {n[:-len("weight")] + "weight_scale" for n in linears}
    for name, t in original.items():
        if name in linears:
            q, s = quantize_fp8_per_channel(t)
            got = written[name]
            assert got.dtype == FP8_DTYPE and torch.equal(got.view(torch.uint8), q.view(torch.uint8))
            scale = written[name[:-len("weight")] + "weight_scale"]
            assert scale.dtype == torch.float32 and scale.shape == (t.shape[0], 1)
            assert torch.equal(scale.view(-1), s)
        else:
            assert written[name].dtype == t.dtype and torch.equal(written[name], t)
    cfg = json.loads((dst / "config.json").read_text())
    assert parse_quantization_config(cfg["quantization_config"]) == "fp8"
    assert cfg["hidden_size"] == TINY["hidden_size"] and cfg["torch_dtype"] == "float16"
    for fname, data in TOKENIZER_FILES.items():
        assert (dst / fname).read_bytes() == data
    assert not (dst / "tokenizer.json").exists()


def test_quantize_checkpoint_errors(tmp_path):
    src = tmp_path / "src"
    _write_tiny_hf(src, seed=2)
    quantize_checkpoint(src, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(tmp_path / "a", tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="already exists and is not an empty directory"):
        quantize_checkpoint(src, tmp_path / "a", progress=False)
    with pytest.raises(CheckpointError, match="config.json"):
        quantize_checkpoint(tmp_path / "nothing", tmp_path / "c", progress=False)


def test_fp8_checkpoint_loads_like_quantize_on_load(tmp_path):
    """The engine's loader, both ways: quantizing an fp16 checkpoint while loading and loading the rewritten
    one give the same bytes and the same logits, within FP8 error of the unquantized model."""
    from selfrag_engine.weights.loader import load_model

    src, dst = tmp_path / "src", tmp_path / "dst"
    _write_tiny_hf(src, seed=3)
    quantize_checkpoint(src, dst, progress=False)
    on_load = load_model(src, dtype=torch.float32, quantization="fp8", progress=False)
    prequant = load_model(dst, dtype=torch.float32, progress=False)
    full = load_model(src, dtype=torch.float32, progress=False)
    a = {n: m for n, m in on_load.named_modules() if isinstance(m, Fp8Linear)}
    b = {n: m for n, m in prequant.named_modules() if isinstance(m, Fp8Linear)}
    # Two layers of fused q|k|v, o, fused gate|up and down.
    assert len(a) == 8 and set(a) == set(b)
    assert type(on_load.lm_head) is nn.Linear and on_load.model.embed_tokens.weight.dtype == torch.float32
    for n in a:
        assert torch.equal(a[n].weight.view(torch.uint8), b[n].weight.view(torch.uint8))
        assert torch.equal(a[n].weight_scale, b[n].weight_scale)
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=_gen(3))
    with torch.no_grad():
        la, lb, lf = on_load.forward_dense(ids), prequant.forward_dense(ids), full.forward_dense(ids)
    assert torch.equal(la, lb)
    # e4m3 rounds each weight by up to 2^-4 (~3.6% rms); two random layers compound it to ~7% here.
    assert _rel(la, lf) < 0.15


def test_bench_smoke(tmp_path):
    from bench.gemm import main

    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    doc = json.loads(next(tmp_path.glob("gemm-*.json")).read_text())
    metrics = {r["metric"]: r["value"] for r in doc["results"]}
    for name in ("fp8_gemv_bw_fraction", "fp8_gemv_speedup_vs_fp16", "fp8_prefill_gemm_time_ratio_vs_cublas_fp16",
                 "fp8_7b_weight_gb"):
        assert math.isfinite(metrics[name]) and metrics[name] > 0
    # Llama-2-7B with FP8 decoder linears and fp16 embedding/lm_head: ~7.0 GB, against 13.5 GB in fp16.
    assert 6.9 < metrics["fp8_7b_weight_gb"] <= 7.2
    assert all(r["value"] < 1e-3 for r in doc["results"] if r["metric"] == "gemv_fp8_rel_err")
    assert next(tmp_path.glob("gemm-*.png")).stat().st_size > 0


# -- GPU ------------------------------------------------------------------------------------------------------

SHAPES_7B = [(4096, 4096), (11008, 4096), (4096, 11008), (32016, 4096)]


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nk", SHAPES_7B, ids=lambda nk: f"{nk[0]}x{nk[1]}")
def test_gpu_kernel_7b_shapes(nk, dtype):
    n, k = nk
    q, s = _rand_fp8(n, k, seed=n + k, device="cuda")
    for m in (1, 2, 4, 8, 16, 17, 64, 2048):
        x = torch.randn(m, k, device="cuda", generator=torch.Generator("cuda").manual_seed(m)).to(dtype)
        out = _poisoned((m, n), dtype, "cuda")
        y = fp8_linear(x, q, s, out=out)
        assert not torch.isnan(y).any(), m
        assert _rel(y, _ref(x, q, s)) < TOL[dtype], m


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("w_bits", [False, True])
def test_gpu_kernel_odd_shapes_and_paths(dtype, w_bits):
    if not w_bits and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("native e4m3 needs sm_89+")
    q, s = _rand_fp8(136, 200, seed=1, device="cuda")
    swap = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SWAP_AB=True, num_warps=4, num_stages=3)
    for m in (1, 3, 16, 17, 64, 300):
        x = torch.randn(m, 200, device="cuda").to(dtype)
        for path, cfg in [("gemv", None), ("gemm", None), ("gemm", swap)]:
            if path == "gemv" and m > 16:
                continue
            y = fp8_linear(x, q, s, out=_poisoned((m, 136), dtype, "cuda"), path=path, w_bits=w_bits, gemm_cfg=cfg)
            assert _rel(y, _ref(x, q, s)) < TOL[dtype], (m, path, cfg)


@gpu
def test_gpu_bench_sweep_configs_compile_and_agree():
    from bench.gemm import SWEEP, SWEEP_DOT

    q, s = _rand_fp8(4096, 4096, seed=5, device="cuda")
    for m, configs in ((1, SWEEP), (8, SWEEP_DOT)):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
        for cfg in configs:
            y = fp8_linear(x, q, s, path="gemv", gemv_cfg=cfg)
            assert _rel(y, _ref(x, q, s)) < TOL[torch.float16], cfg


@gpu
def test_gpu_cuda_graph_replay():
    """Decode runs inside CUDA graphs: the GEMV must capture (no autotuning, no host sync) and replay."""
    q, s = _rand_fp8(4096, 4096, seed=2, device="cuda")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    fp8_linear(x, q, s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fp8_linear(x, q, s)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert _rel(y, _ref(x, q, s)) < TOL[torch.float16]


@gpu
def test_gpu_w8a8_scaled_mm():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need sm_89+")
    q, s = _rand_fp8(11008, 4096, seed=3, device="cuda")
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(2048, 4096, device="cuda", dtype=dtype)
        assert _rel(fp8_linear_w8a8(x, q, s), _ref(x, q, s)) < 0.06


@gpu
def test_gpu_quantize_and_module():
    w = torch.randn(1000, 777, generator=_gen(4)).half()
    qc, sc = quantize_fp8_per_channel(w)
    qg, sg = quantize_fp8_per_channel(w.cuda())
    assert torch.equal(qc.view(torch.uint8), qg.cpu().view(torch.uint8)) and torch.equal(sc, sg.cpu())
    lin = Fp8Linear(777, 1000, device="cuda")
    lin.backend = choose_backend("cuda")
    lin.load_checkpoint_tensor("weight", w)  # a CPU tensor: moved to the GPU, then quantized there
    assert lin.weight.is_cuda and torch.equal(lin.weight.cpu().view(torch.uint8), qc.view(torch.uint8))
    x = torch.randn(3, 5, 777, device="cuda", dtype=torch.float16)
    ref = Fp8Linear(777, 1000)
    ref.load_checkpoint_tensor("weight", w)
    assert _rel(lin(x), ref(x.float().cpu())) < TOL[torch.float16]
    # W8A8 prefill falls back to W8A16 where _scaled_mm cannot run (K=777 is not a multiple of 16).
    lin.w8a8_prefill = True
    x = torch.randn(64, 777, device="cuda", dtype=torch.float16)
    assert _rel(lin(x), ref(x.float().cpu())) < TOL[torch.float16]
    # Autograd through the Triton forward: dx = dy @ W_dequantized.
    x = torch.randn(4, 777, device="cuda", requires_grad=True)
    lin(x).pow(2).sum().backward()
    xr = x.detach().cpu().requires_grad_()
    ref(xr).pow(2).sum().backward()
    assert _rel(x.grad.cpu(), xr.grad) < 1e-4
