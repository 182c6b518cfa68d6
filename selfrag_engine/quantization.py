"""FP8 (e4m3) weight-only quantization of the decoder linears, gpt-fast style: a separate module that rewrites
a model's `nn.Linear`s into `Fp8Linear`s, plus the on-disk format.

- `quantize_fp8_per_channel(w)`: one float32 scale per output row, amax(|row|) / 448.
- `Fp8Linear`: buffers `weight` (float8_e4m3fn [out, in]) and `weight_scale` (float32 [out]); the Triton
  kernel on CUDA, a torch reference elsewhere. It loads its own checkpoint tensors (quantizing a
  high-precision weight on its device, or copying a pre-quantized one) through the protocol that
  `selfrag_engine.checkpoint.load_weights` calls: `expected_checkpoint_attrs` / `load_checkpoint_tensor`.
- `replace_linears_with_fp8(model)`: swaps the bias-free linears (lm_head stays unless asked) without
  allocating any high-precision weight, so it runs on a meta-device model before `to_empty`.
- `quantize_checkpoint(src, dst)`: rewrites a Hugging Face Llama safetensors checkpoint with FP8 decoder
  linears, one tensor at a time.

Pre-quantized checkpoints (`parse_quantization_config`) store `{prefix}.weight` as float8_e4m3fn and
`{prefix}.weight_scale` (per tensor: shape [] or [1]; per channel: [out] or [out, 1]; any float dtype) with
w ~= weight * weight_scale. Accepted `config.json` `quantization_config` layouts:

1. vLLM / AutoFP8 / llm-compressor "fp8": {"quant_method": "fp8", "activation_scheme": "dynamic",
   "ignored_layers": [...]} with `weight_block_size` absent or null. `activation_scheme: "static"` is
   rejected: those checkpoints carry `input_scale` tensors for static activation quantization, which this
   engine does not implement (it keeps activations in fp16/bf16).
2. compressed-tensors (llm-compressor), "format" "float-quantized" or "naive-quantized", status "compressed":
   every config group has weights {"type": "float", "num_bits": 8, "strategy": "channel" | "tensor",
   "symmetric": true, "dynamic": false, no group_size / block_structure} and input_activations either null
   (weight-only, "FP8" W8A16) or dynamic float8 with strategy "token" or "tensor" ("FP8_DYNAMIC"); the
   activations are then simply run in fp16/bf16, which is more accurate. Static input activations, output
   activations, a kv_cache_scheme and sparsity are rejected.

In both, only lm_head may be left unquantized (`ignored_layers` / `ignore` / `modules_to_not_convert`); a
compressed-tensors config must list lm_head there, as lm_head stays in the activation dtype here.
`quantize_checkpoint` writes layout 2 (weight-only, per channel, weight_scale [out, 1] float32): vLLM's "fp8"
method only loads per-tensor scales, while compressed-tensors per-channel FP8 loads in vLLM and HF too.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from selfrag_engine.errors import CheckpointError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
_HIGH_PRECISION = (torch.float16, torch.bfloat16, torch.float32)
# Rows are quantized in chunks of at most this many elements, bounding the float32 temporary (256 MiB).
_CHUNK_ELEMENTS = 1 << 26

DECODER_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.json", "generation_config.json")


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
        from selfrag_engine.kernels.fp8_linear import fp8_linear

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
        self._scale_from: str | None = None  # "quantized" | "checkpoint": which load set weight_scale

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
        if x.is_cuda:
            from selfrag_engine.kernels.fp8_linear import GEMV_MAX_M, fp8_linear_w8a8, w8a8_supported

            if torch.is_grad_enabled() and x.requires_grad:
                return _Fp8LinearGrad.apply(x, self.weight, self.weight_scale)
            if (self.w8a8_prefill and x.numel() // self.in_features > GEMV_MAX_M
                    and w8a8_supported(x.device, self.out_features, self.in_features)):
                return fp8_linear_w8a8(x, self.weight, self.weight_scale)
            from selfrag_engine.kernels.fp8_linear import fp8_linear

            return fp8_linear(x, self.weight, self.weight_scale)
        # Reference: fp32 accumulation, scale per output column after the matmul, as the kernel does.
        return ((x.float() @ self.weight.float().T) * self.weight_scale).to(x.dtype)

    # -- checkpoint loading protocol (selfrag_engine.checkpoint.load_weights) --------------------------------

    def expected_checkpoint_attrs(self, prequantized: bool) -> set[str]:
        return {"weight", "weight_scale"} if prequantized else {"weight"}

    def _label(self, attr: str) -> str:
        return f"'{self.name}.{attr}'" if self.name else f"'{attr}' of {self!r}"

    def load_checkpoint_tensor(self, attr: str, tensor: torch.Tensor) -> None:
        """Takes `weight` (float16/bfloat16/float32: quantized here on this module's device; float8_e4m3fn:
        copied) or `weight_scale` (a per-tensor scalar, shape [] or [1], or per-channel [out] / [out, 1],
        any float dtype; stored as float32 [out])."""
        if attr == "weight":
            self._load_weight(tensor)
        elif attr == "weight_scale":
            self._load_scale(tensor)
        else:
            raise CheckpointError(f"unexpected tensor {self._label(attr)}: an FP8 linear takes only "
                                  f"'weight' and 'weight_scale'")

    def _load_weight(self, tensor: torch.Tensor) -> None:
        expected = (self.out_features, self.in_features)
        if tuple(tensor.shape) != expected:
            raise CheckpointError(f"tensor {self._label('weight')} has shape {tuple(tensor.shape)}, "
                                  f"expected {expected}")
        with torch.no_grad():
            if tensor.dtype == FP8_DTYPE:
                self.weight.copy_(tensor)
            elif tensor.dtype in _HIGH_PRECISION:
                if self._scale_from == "checkpoint":
                    raise CheckpointError(f"tensor {self._label('weight')} is {tensor.dtype} but the checkpoint "
                                          f"also has its weight_scale: expected a float8_e4m3fn weight")
                try:
                    _quantize_into(tensor.to(self.weight.device), self.weight, self.weight_scale)
                except ValueError as e:
                    raise CheckpointError(f"tensor {self._label('weight')}: {e}") from e
                self._scale_from = "quantized"
            else:
                raise CheckpointError(f"tensor {self._label('weight')} has dtype {tensor.dtype}, expected "
                                      f"float8_e4m3fn (pre-quantized) or float16/bfloat16/float32")

    def _load_scale(self, tensor: torch.Tensor) -> None:
        n = self.out_features
        if not tensor.is_floating_point() or tensor.dtype.itemsize == 1:
            raise CheckpointError(f"tensor {self._label('weight_scale')} has dtype {tensor.dtype}, expected "
                                  f"float32, float16 or bfloat16")
        if tuple(tensor.shape) in ((), (1,)):
            scale = tensor.reshape(1).expand(n)
        elif tuple(tensor.shape) in ((n,), (n, 1)):
            scale = tensor.reshape(n)
        else:
            raise CheckpointError(f"tensor {self._label('weight_scale')} has shape {tuple(tensor.shape)}, expected "
                                  f"a per-tensor scale [] or [1], or per-channel [{n}] or [{n}, 1] (block-wise "
                                  f"scales are not supported)")
        if self._scale_from == "quantized":
            raise CheckpointError(f"tensor {self._label('weight_scale')} comes with a high-precision weight; "
                                  f"expected a float8_e4m3fn weight beside it")
        scale = scale.float()
        if not bool(torch.isfinite(scale).all()):
            raise CheckpointError(f"tensor {self._label('weight_scale')} has non-finite values")
        with torch.no_grad():
            self.weight_scale.copy_(scale)
        self._scale_from = "checkpoint"


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


# -- quantization_config -------------------------------------------------------------------------------------

def _only_lm_head(entries, field: str) -> bool:
    """Checks an ignore list names nothing but lm_head; returns whether lm_head is in it."""
    has_lm_head = False
    for entry in entries or []:
        if not isinstance(entry, str):
            raise ValueError(f"'{field}' entries must be strings, got {entry!r}")
        if entry.startswith("re:"):
            pattern = entry[3:]
            matches_head = re.fullmatch(pattern, "lm_head") is not None
            probes = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj")
            matches_decoder = any(re.fullmatch(pattern, p) for p in probes)
        else:
            matches_head = entry.split(".")[-1] == "lm_head"
            matches_decoder = False
        if not matches_head or matches_decoder:
            raise ValueError(f"'{field}' entry '{entry}' is not supported: only lm_head may stay unquantized "
                             f"(all decoder linears must be FP8)")
        has_lm_head = True
    return has_lm_head


def _ct_weights_ok(group: str, w: dict | None) -> None:
    if not isinstance(w, dict):
        raise ValueError(f"compressed-tensors group '{group}' has no 'weights' scheme")
    if w.get("type") != "float" or w.get("num_bits") != 8:
        raise ValueError(f"compressed-tensors group '{group}': weights type={w.get('type')!r} "
                         f"num_bits={w.get('num_bits')!r} are not supported (only float 8-bit, e4m3)")
    if w.get("strategy") not in ("channel", "tensor"):
        raise ValueError(f"compressed-tensors group '{group}': weight strategy {w.get('strategy')!r} is not "
                         f"supported (only 'channel' or 'tensor')")
    if w.get("symmetric", True) is not True or w.get("dynamic", False) not in (False, None):
        raise ValueError(f"compressed-tensors group '{group}': only symmetric, static weight scales are supported")
    if w.get("group_size") is not None or w.get("block_structure") is not None:
        raise ValueError(f"compressed-tensors group '{group}': group/block-wise weight scales are not supported")


def _ct_inputs_ok(group: str, a: dict | None) -> None:
    if a is None:
        return
    if (a.get("type") != "float" or a.get("num_bits") != 8 or a.get("dynamic") is not True
            or a.get("strategy") not in ("token", "tensor") or a.get("group_size") is not None):
        raise ValueError(f"compressed-tensors group '{group}': input_activations {a} are not supported (only none, "
                         f"or dynamic float8 per token / per tensor; static activation scales (input_scale) are "
                         f"not implemented)")


def parse_quantization_config(cfg: dict | None) -> str | None:
    """config.json's `quantization_config` -> "fp8" for the supported layouts (see the module docstring),
    None for no config; ValueError naming the unsupported quant_method / scheme otherwise."""
    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        raise ValueError(f"quantization_config must be a JSON object, got {type(cfg).__name__}")
    method = cfg.get("quant_method")
    if method == "fp8":
        scheme = cfg.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise ValueError(f"quant_method 'fp8' with activation_scheme '{scheme}' is not supported (static "
                             f"activation scales / input_scale are not implemented; only 'dynamic')")
        if cfg.get("weight_block_size") is not None:
            raise ValueError(f"quant_method 'fp8' with weight_block_size {cfg['weight_block_size']} (block-wise "
                             f"scales) is not supported; only per-tensor or per-channel weight_scale")
        if cfg.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"quant_method 'fp8' with fmt '{cfg['fmt']}' is not supported (only e4m3)")
        for key in ("ignored_layers", "modules_to_not_convert"):
            _only_lm_head(cfg.get(key), key)
        return "fp8"
    if method == "compressed-tensors":
        fmt = cfg.get("format")
        if fmt not in ("float-quantized", "naive-quantized"):
            raise ValueError(f"compressed-tensors format '{fmt}' is not supported (only 'float-quantized' or "
                             f"'naive-quantized' FP8)")
        status = cfg.get("quantization_status", "compressed")
        if status != "compressed":
            raise ValueError(f"compressed-tensors quantization_status '{status}' is not supported (only "
                             f"'compressed' checkpoints)")
        if cfg.get("kv_cache_scheme") is not None:
            raise ValueError("compressed-tensors kv_cache_scheme is not supported (FP8 KV cache scales)")
        if cfg.get("sparsity_config"):
            raise ValueError("compressed-tensors sparsity_config is not supported")
        groups = cfg.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise ValueError("compressed-tensors config has no 'config_groups'")
        for gname, group in groups.items():
            if not isinstance(group, dict):
                raise ValueError(f"compressed-tensors group '{gname}' is not an object")
            gfmt = group.get("format")
            if gfmt is not None and gfmt not in ("float-quantized", "naive-quantized"):
                raise ValueError(f"compressed-tensors group '{gname}' format '{gfmt}' is not supported")
            if "Linear" not in (group.get("targets") or []):
                raise ValueError(f"compressed-tensors group '{gname}' targets {group.get('targets')} are not "
                                 f"supported: only ['Linear'] (every decoder linear FP8)")
            _ct_weights_ok(gname, group.get("weights"))
            _ct_inputs_ok(gname, group.get("input_activations"))
            if group.get("output_activations") is not None:
                raise ValueError(f"compressed-tensors group '{gname}': output_activations are not supported")
        if not _only_lm_head(cfg.get("ignore"), "ignore"):
            raise ValueError("compressed-tensors config quantizes lm_head ('ignore' lacks it); only an "
                             "unquantized lm_head is supported")
        return "fp8"
    raise ValueError(f"unsupported quantization_config quant_method '{method}' (supported: 'fp8' and "
                     f"'compressed-tensors' FP8)")


def fp8_quantization_config() -> dict:
    """The `quantization_config` that `quantize_checkpoint` writes: compressed-tensors, weight-only FP8 e4m3
    with one scale per output channel, lm_head unquantized."""
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel",
                            "dynamic": False, "group_size": None, "block_structure": None, "actorder": None,
                            "observer": "minmax", "observer_kwargs": {}},
                "input_activations": None,
                "output_activations": None,
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }


# -- checkpoint rewriting ------------------------------------------------------------------------------------

def quantize_checkpoint(src: str | Path, dst: str | Path, shard_size_bytes: int = 2 << 30, progress: bool = True,
                        *, device: str | torch.device = "cpu") -> None:
    """Writes an FP8 copy of the Hugging Face Llama safetensors checkpoint `src` (single file or sharded with
    model.safetensors.index.json) into `dst`.

    Tensors are read one at a time (safe_open). Each decoder linear `model.layers.N.{self_attn.q,k,v,o,
    mlp.gate,up,down}_proj.weight` becomes float8_e4m3fn plus `...weight_scale` float32 [out, 1] (quantized on
    `device`, bit-identical to `quantize_fp8_per_channel`); every other tensor is copied unchanged. Output:
    `model.safetensors` if it fits in `shard_size_bytes`, else `model-0000i-of-0000n.safetensors` shards with
    `model.safetensors.index.json`; `config.json` with `fp8_quantization_config()`; the tokenizer and
    generation-config files that exist in `src`.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from selfrag_engine.checkpoint import count_tensors, find_weight_files

    src, dst = Path(src), Path(dst)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"'{cfg_path}' is missing: not a Hugging Face checkpoint directory")
    config = json.loads(cfg_path.read_text())
    if config.get("quantization_config") is not None:
        raise ValueError(f"'{src}' is already quantized (config.json has a quantization_config)")
    weights = find_weight_files(src)
    if weights.format != "safetensors":
        raise CheckpointError(f"'{src}' holds pytorch_model*.bin weights; run `selfrag-engine convert` first")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError("dst must differ from src")
    dst.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in dst.glob("model*.safetensors*"))
    if stale:
        raise ValueError(f"'{dst}' already holds weight files ({', '.join(stale)}); choose an empty directory")

    device = torch.device(device)
    shards: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    total_size = 0
    tmp_names: list[Path] = []

    def flush():
        nonlocal shard, shard_bytes
        if not shard:
            return
        path = dst / f"model-{len(tmp_names):05d}.tmp.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        tmp_names.append(path)
        shards.append(list(shard))
        shard, shard_bytes = {}, 0

    def add(name: str, t: torch.Tensor):
        nonlocal shard_bytes, total_size
        nbytes = t.numel() * t.element_size()
        if shard and shard_bytes + nbytes > shard_size_bytes:
            flush()
        shard[name] = t.contiguous()
        shard_bytes += nbytes
        total_size += nbytes

    bar = tqdm(total=count_tensors(weights), desc="quantizing", unit="tensor", disable=not progress)
    for file in weights.files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if DECODER_LINEAR.match(name) and t.dim() == 2:
                    try:
                        q, s = quantize_fp8_per_channel(t.to(device))
                    except ValueError as e:
                        raise CheckpointError(f"tensor '{name}' in '{file}': {e}") from e
                    add(name, q.cpu())
                    add(name[: -len("weight")] + "weight_scale", s.cpu().view(-1, 1))
                else:
                    add(name, t)
                bar.update(1)
    flush()
    bar.close()

    weight_map: dict[str, str] = {}
    n = len(tmp_names)
    for i, (tmp, names) in enumerate(zip(tmp_names, shards)):
        final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tmp.rename(dst / final)
        weight_map.update({name: final for name in names})
    if n > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    config["quantization_config"] = fp8_quantization_config()
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for fname in TOKENIZER_FILES:
        if (src / fname).is_file():
            shutil.copy2(src / fname, dst / fname)
