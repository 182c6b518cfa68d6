"""FP8 (e4m3) weight-only linears, gpt-fast style: a module that rewrites a model's `nn.Linear`s into
`Fp8Linear`s.

- `quantize_fp8_per_channel(w)`: one float32 scale per output row, amax(|row|) / 448.
- `Fp8Linear`: buffers `weight` (float8_e4m3fn [out, in]) and `weight_scale` (float32 [out]); the Triton
  kernel when the backend runs kernels, a torch reference otherwise. On decode-sized inputs it can also run
  the RMSNorm before it (`fuses_rms_norm`, `forward_rms_norm`) or the SiLU-and-mul before it (`fuses_silu_mul`,
  `forward_silu_mul`) as the GEMV's prologue: one launch for both. It loads its own checkpoint tensors
  (quantizing a high-precision weight on its device, or copying a pre-quantized one) through the protocol that
  `selfrag_engine.weights.checkpoint.load_weights` calls: `expected_checkpoint_attrs` / `load_checkpoint_tensor`;
  `load_checkpoint_rows` loads one checkpoint tensor into a row range of a fused linear (layers/fused_linear.py).
- `replace_linears_with_fp8(model)`: swaps the bias-free linears (lm_head stays unless asked) without
  allocating any high-precision weight, so it runs on a meta-device model before `to_empty`.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from selfrag_engine.backend import TORCH, Backend
from selfrag_engine.errors import CheckpointError
from selfrag_engine.kernels.fp8_linear import (
    GEMV_MAX_M,
    fp8_linear,
    fp8_linear_w8a8,
    w8a8_supported,
)
from selfrag_engine.kernels.fp8_norm_gemv import fp8_rms_norm_linear
from selfrag_engine.kernels.fp8_silu_gemv import fp8_silu_mul_linear

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
_HIGH_PRECISION = (torch.float16, torch.bfloat16, torch.float32)
# Rows are quantized in chunks of at most this many elements, bounding the float32 temporary (256 MiB).
_CHUNK_ELEMENTS = 1 << 26


def _quantize_into(w: torch.Tensor, q_out: torch.Tensor, s_out: torch.Tensor) -> None:
    rows = max(1, _CHUNK_ELEMENTS // max(1, w.shape[1]))
    for r in range(0, w.shape[0], rows):
        block = w[r:r + rows].float()
        amax = block.abs().amax(dim=1)
        if not bool(torch.isfinite(amax).all()):
            bad = int((~torch.isfinite(amax)).nonzero()[0]) + r
            raise ValueError(f"weight row {bad} has non-finite values; cannot quantize it to FP8")
        scale = amax / FP8_MAX
        # Zero rows (and amax so small that amax/448 underflows) get scale 1: they quantize to zeros.
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q_out[r:r + rows] = (block / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        s_out[r:r + rows] = scale


def quantize_fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] float16 / bfloat16 / float32 -> (float8_e4m3fn [out, in], float32 scale [out]) on w's device,
    with w ~= w_fp8 * scale[:, None]: scale = amax(|row|) / 448 (1 for all-zero rows) and
    w_fp8 = (w / scale).clamp(-448, 448) rounded to nearest e4m3, computed in float32."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if w.dtype not in _HIGH_PRECISION:
        raise ValueError(f"expected a float16, bfloat16 or float32 weight, got {w.dtype}")
    q = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    s = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    _quantize_into(w, q, s)
    return q, s


def dequantize_fp8(w_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float8_e4m3fn [out, in] and float32 [out] -> w_fp8 * scale[:, None] in `dtype` (a full-size copy)."""
    return (w_fp8.float() * scale.float()[:, None]).to(dtype)


class _Fp8LinearGrad(torch.autograd.Function):
    """The Triton forward with a gradient for x (the weights are frozen), so models that train through
    `forward_dense` keep working on CUDA; the backward dequantizes W, which only training pays for."""

    @staticmethod
    def forward(ctx, x, weight, scale):
        ctx.save_for_backward(weight, scale)
        return fp8_linear(x, weight, scale)

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        return (grad.float() @ dequantize_fp8(weight, scale)).to(grad.dtype), None, None


class Fp8Linear(nn.Module):
    """A bias-free linear with FP8 e4m3 weights and one float32 scale per output channel.

    weight: float8_e4m3fn [out_features, in_features]; weight_scale: float32 [out_features].
    forward(x [..., in]) -> [..., out] in x's dtype. Both buffers keep their dtypes through `.to(dtype)`,
    `.half()` and the like, which only move them between devices.
    """
    backend: Backend = TORCH

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None,
                 name: str | None = None, w8a8_prefill: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.name = name  # qualified module name, for error messages
        # Prefill (more than GEMV_MAX_M rows) on CUDA through FP8 tensor cores with per-token activation
        # scales: faster on Hopper, less accurate.
        self.w8a8_prefill = w8a8_prefill
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        # Which load set the scales of each row range, keyed by its first row ("quantized" | "checkpoint"): a
        # fused linear loads several checkpoint tensors, each into its own rows.
        self._scale_from: dict[int, str] = {}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=e4m3, per-channel scale"

    def _apply(self, fn, recurse=True):
        def keep_dtype(t):
            out = fn(t)
            if out.dtype != t.dtype:
                # A dtype cast (model.to(torch.float16)) would dequantize or round the scales: move only.
                out = t.to(device=out.device)
            return out

        return super()._apply(keep_dtype, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend.kernels:
            if torch.is_grad_enabled() and x.requires_grad:
                return _Fp8LinearGrad.apply(x, self.weight, self.weight_scale)
            if (self.w8a8_prefill and x.numel() // self.in_features > GEMV_MAX_M
                    and w8a8_supported(x.device, self.out_features, self.in_features)):
                return fp8_linear_w8a8(x, self.weight, self.weight_scale)
            return fp8_linear(x, self.weight, self.weight_scale)
        # Reference: fp32 accumulation, scale per output column after the matmul, as the kernel does.
        return ((x.float() @ self.weight.float().T) * self.weight_scale).to(x.dtype)

    def _takes_prologue(self, x: torch.Tensor) -> bool:
        # The kernels backend, a 2-D x with at most GEMV_MAX_M rows (the GEMV path, which decode takes), and no
        # autograd (the fused kernels have no backward).
        return (self.backend.kernels and x.dim() == 2 and x.shape[0] <= GEMV_MAX_M
                and not (torch.is_grad_enabled() and x.requires_grad))

    def fuses_rms_norm(self, x: torch.Tensor) -> bool:
        """Whether `forward_rms_norm(x, ...)` runs as one kernel for x [M, in]."""
        return self._takes_prologue(x)

    def fuses_silu_mul(self, gate_up: torch.Tensor) -> bool:
        """Whether `forward_silu_mul(gate_up)` runs as one kernel for gate_up [M, 2 * in]."""
        return self._takes_prologue(gate_up) and gate_up.shape[1] == 2 * self.in_features

    def forward_silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """self(silu(gate) * up) in one kernel launch for gate_up [M, 2 * in] (gate, then up; M <= GEMV_MAX_M,
        see `fuses_silu_mul`). Returns y [M, out] in gate_up's dtype."""
        return fp8_silu_mul_linear(gate_up, self.weight, self.weight_scale)

    def forward_rms_norm(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                         residual: torch.Tensor | None = None):
        """self(RMSNorm(x [+ residual]) * norm_weight) in one kernel launch, and x + residual when a residual is
        given: x, residual [M, in] (M <= GEMV_MAX_M, see `fuses_rms_norm`), norm_weight [in]. Returns y [M, out]
        in x's dtype, or (y, x + residual)."""
        return fp8_rms_norm_linear(x, norm_weight, eps, self.weight, self.weight_scale, residual)

    # -- checkpoint loading protocol (selfrag_engine.weights.checkpoint.load_weights) --------------------------------

    def expected_checkpoint_attrs(self, prequantized: bool) -> set[str]:
        return {"weight", "weight_scale"} if prequantized else {"weight"}

    def _label(self, attr: str) -> str:
        return f"'{self.name}.{attr}'" if self.name else f"'{attr}' of {self!r}"

    def load_checkpoint_tensor(self, attr: str, tensor: torch.Tensor) -> None:
        """Takes `weight` (float16/bfloat16/float32: quantized here on this module's device; float8_e4m3fn:
        copied) or `weight_scale` (a per-tensor scalar, shape [] or [1], or per-channel [out] / [out, 1],
        any float dtype; stored as float32 [out])."""
        self.load_checkpoint_rows(attr, tensor, 0, self.out_features, self._label(attr))

    def load_checkpoint_rows(self, attr: str, tensor: torch.Tensor, start: int, stop: int, label: str) -> None:
        """As `load_checkpoint_tensor`, into output rows [start, stop) only: one checkpoint tensor of a fused
        linear (q of q|k|v). A per-tensor scale becomes per-channel over those rows, so shards quantized
        with different per-tensor scales concatenate. `label` names the checkpoint tensor in errors."""
        if attr == "weight":
            self._load_weight(tensor, start, stop, label)
        elif attr == "weight_scale":
            self._load_scale(tensor, start, stop, label)
        else:
            raise CheckpointError(f"unexpected tensor {label}: an FP8 linear takes only "
                                  f"'weight' and 'weight_scale'")

    def _load_weight(self, tensor: torch.Tensor, start: int, stop: int, label: str) -> None:
        expected = (stop - start, self.in_features)
        if tuple(tensor.shape) != expected:
            raise CheckpointError(f"tensor {label} has shape {tuple(tensor.shape)}, expected {expected}")
        with torch.no_grad():
            if tensor.dtype == FP8_DTYPE:
                self.weight[start:stop].copy_(tensor)
            elif tensor.dtype in _HIGH_PRECISION:
                if self._scale_from.get(start) == "checkpoint":
                    raise CheckpointError(f"tensor {label} is {tensor.dtype} but the checkpoint "
                                          f"also has its weight_scale: expected a float8_e4m3fn weight")
                try:
                    _quantize_into(tensor.to(self.weight.device), self.weight[start:stop],
                                   self.weight_scale[start:stop])
                except ValueError as e:
                    raise CheckpointError(f"tensor {label}: {e}") from e
                self._scale_from[start] = "quantized"
            else:
                raise CheckpointError(f"tensor {label} has dtype {tensor.dtype}, expected "
                                      f"float8_e4m3fn (pre-quantized) or float16/bfloat16/float32")

    def _load_scale(self, tensor: torch.Tensor, start: int, stop: int, label: str) -> None:
        n = stop - start
        if not tensor.is_floating_point() or tensor.dtype.itemsize == 1:
            raise CheckpointError(f"tensor {label} has dtype {tensor.dtype}, expected "
                                  f"float32, float16 or bfloat16")
        if tuple(tensor.shape) in ((), (1,)):
            scale = tensor.reshape(1).expand(n)
        elif tuple(tensor.shape) in ((n,), (n, 1)):
            scale = tensor.reshape(n)
        else:
            raise CheckpointError(f"tensor {label} has shape {tuple(tensor.shape)}, expected "
                                  f"a per-tensor scale [] or [1], or per-channel [{n}] or [{n}, 1] (block-wise "
                                  f"scales are not supported)")
        if self._scale_from.get(start) == "quantized":
            raise CheckpointError(f"tensor {label} comes with a high-precision weight; "
                                  f"expected a float8_e4m3fn weight beside it")
        scale = scale.float()
        if not bool(torch.isfinite(scale).all()):
            raise CheckpointError(f"tensor {label} has non-finite values")
        with torch.no_grad():
            self.weight_scale[start:stop].copy_(scale)
        self._scale_from[start] = "checkpoint"


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def replace_linears_with_fp8(model: nn.Module, skip: Iterable[str] = ("lm_head",), *,
                             quantize_existing: bool = False, w8a8_prefill: bool = False) -> nn.Module:
    """Swaps every bias-free `nn.Linear` of `model` for an `Fp8Linear` of the same shape on the same device,
    in place, and returns `model`. Names in `skip` (a module's full name or its last components) stay as
    they are; `skip=()` quantizes lm_head too, unless it shares its weight with the embedding
    (`tie_word_embeddings`), which cannot be both fp8 and an embedding table.

    The new modules' buffers are uninitialized (meta-device models stay on meta) and no high-precision
    weight is allocated: the checkpoint loader fills them. `quantize_existing=True` instead quantizes each
    linear's current weight (a model already holding real weights)."""
    skip = tuple(skip)
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    shared: set[int] = set()
    seen: set[int] = set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (shared if id(p) in seen else seen).add(id(p))
    targets = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or module.bias is not None or _skipped(name, skip):
            continue
        if id(module.weight) in shared or (tied and _skipped(name, ("lm_head",))):
            continue
        targets.append((name, module))
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        device = linear.weight.device
        fp8 = Fp8Linear(linear.in_features, linear.out_features, device=device, name=name,
                        w8a8_prefill=w8a8_prefill)
        if quantize_existing and device.type != "meta":
            with torch.no_grad():
                _quantize_into(linear.weight.detach(), fp8.weight, fp8.weight_scale)
        setattr(parent, child, fp8)
    return model
