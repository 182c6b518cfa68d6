"""Reading Hugging Face Llama checkpoints: safetensors (single or sharded) and `pytorch_model*.bin`.

Tensors are read one at a time and moved straight to the target device, so a 13 GB model never has a full
CPU copy. A module may own how its tensors load (an FP8 linear quantizes a high-precision weight on its
device) by defining `expected_checkpoint_attrs(prequantized)` and `load_checkpoint_tensor(attr, tensor)`.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from selfrag_engine.errors import CheckpointError

# Saved by older transformers releases (Llama-2 era checkpoints) and recomputed here.
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class WeightFiles:
    format: str  # "safetensors" | "bin"
    files: list[Path]


def find_weight_files(path: str | Path) -> WeightFiles:
    """Locates the weight files of a checkpoint directory, preferring safetensors over .bin."""
    path = Path(path)
    for fmt, index_name, single in (("safetensors", "model.safetensors.index.json", "model.safetensors"),
                                    ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"'{index}' is not a valid shard index (needs a 'weight_map'): {e}") from e
            files = [path / name for name in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"'{index}' lists shard files that are missing: {', '.join(missing)}")
            return WeightFiles(fmt, files)
        if (path / single).is_file():
            return WeightFiles(fmt, [path / single])
    raise CheckpointError(f"no weights in '{path}': expected model.safetensors, a sharded "
                          "model-*.safetensors with model.safetensors.index.json, or pytorch_model*.bin")


def iter_tensors(weights: WeightFiles) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) one tensor at a time, on the CPU (safetensors and mmap-ed .bin are lazy)."""
    for file in weights.files:
        if weights.format == "safetensors":
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"cannot read '{file}' (unreadable or truncated safetensors file): {e}") from e
        else:
            try:
                state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # torch raises many types for a corrupt zip/pickle
                raise CheckpointError(f"cannot read '{file}' (unreadable or truncated .bin file): {e}") from e
            if not isinstance(state, dict):
                raise CheckpointError(f"'{file}' does not hold a state dict")
            yield from state.items()
            del state


def count_tensors(weights: WeightFiles) -> int | None:
    if weights.format != "safetensors":
        return None
    total = 0
    for file in weights.files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                total += len(list(f.keys()))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read '{file}' (unreadable or truncated safetensors file): {e}") from e
    return total


def _expected(model: torch.nn.Module, prequantized: bool) -> dict[str, tuple[torch.nn.Module, str]]:
    """Checkpoint name -> (owning module, attribute) for every tensor the model must receive."""
    expected: dict[str, tuple[torch.nn.Module, str]] = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if hasattr(module, "expected_checkpoint_attrs"):
            attrs = module.expected_checkpoint_attrs(prequantized)
        else:
            attrs = [n for n, _ in module.named_parameters(recurse=False)]
            attrs += [n for n, _ in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
        for attr in attrs:
            expected[prefix + attr] = (module, attr)
    return expected


def load_weights(model: torch.nn.Module, path: str | Path, *, prequantized: bool = False,
                 progress: bool = True) -> None:
    """Loads every tensor of the checkpoint at `path` into `model` (already on its target device and dtype).

    Raises CheckpointError for a missing, unexpected, misshapen or wrongly typed tensor.
    """
    weights = find_weight_files(path)
    expected = _expected(model, prequantized)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied:
        expected.pop("lm_head.weight", None)
    loaded: set[str] = set()
    bar = tqdm(total=count_tensors(weights), desc="loading weights", unit="tensor", disable=not progress)
    for name, tensor in iter_tensors(weights):
        bar.update(1)
        if _IGNORED.match(name) or (tied and name == "lm_head.weight"):
            continue
        if name not in expected:
            raise CheckpointError(f"unexpected tensor '{name}' in checkpoint '{path}' (not part of the model)")
        if name in loaded:
            raise CheckpointError(f"tensor '{name}' appears twice in checkpoint '{path}'")
        module, attr = expected[name]
        if hasattr(module, "load_checkpoint_tensor"):
            module.load_checkpoint_tensor(attr, tensor)
        else:
            target = getattr(module, attr)
            if tuple(tensor.shape) != tuple(target.shape):
                raise CheckpointError(f"tensor '{name}' has shape {tuple(tensor.shape)}, "
                                      f"the model expects {tuple(target.shape)}")
            if tensor.dtype not in _FLOAT_DTYPES:
                raise CheckpointError(f"tensor '{name}' has dtype {tensor.dtype}, expected a floating "
                                      f"point dtype (float32, float16 or bfloat16)")
            with torch.no_grad():
                target.copy_(tensor.to(target.device))
        loaded.add(name)
    bar.close()
    missing = sorted(set(expected) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint '{path}' is missing {len(missing)} tensor(s): {shown}")


def convert_bin_to_safetensors(src: str | Path, dst: str | Path, *, progress: bool = True) -> Path:
    """Writes the `pytorch_model*.bin` weights of `src` as safetensors shards (same split) into `dst`,
    with the other files of the directory copied. Returns `dst`."""
    src, dst = Path(src), Path(dst)
    weights = find_weight_files(src)
    if weights.format != "bin":
        raise CheckpointError(f"'{src}' has no pytorch_model*.bin weights to convert")
    dst.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():
        if file.is_file() and not file.name.startswith("pytorch_model"):
            shutil.copy2(file, dst / file.name)
    n = len(weights.files)
    weight_map: dict[str, str] = {}
    total_size = 0
    for i, file in enumerate(tqdm(weights.files, desc="converting", unit="shard", disable=not progress)):
        out_name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        state = {name: t.contiguous() for name, t in iter_tensors(WeightFiles("bin", [file]))
                 if not _IGNORED.match(name)}
        # safetensors refuses tensors that share memory (tied weights saved twice by torch.save).
        seen: dict[int, str] = {}
        for name in list(state):
            ptr = state[name].data_ptr()
            if ptr in seen:
                state[name] = state[name].clone()
            seen[ptr] = name
        save_file(state, str(dst / out_name), metadata={"format": "pt"})
        for name, t in state.items():
            weight_map[name] = out_name
            total_size += t.numel() * t.element_size()
        del state
    if n > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return dst



def resolve_dtype(dtype: torch.dtype | str | None, config_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The activation dtype: as asked, else the checkpoint's on CUDA and float32 on the CPU."""
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                 "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if dtype not in names:
            raise ValueError(f"unknown dtype '{dtype}' (use float32, float16 or bfloat16)")
        dtype = names[dtype]
    if dtype is None:
        dtype = config_dtype if device.type == "cuda" else torch.float32
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported (use float32, float16 or bfloat16)")
    return dtype


def load_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None,
               quantization: str | None = None, progress: bool = True):
    """Builds the Llama of the checkpoint at `path` directly on `device` and loads its weights.

    quantization: None (weights in `dtype`), or "fp8" (decoder linears quantized to e4m3 per output channel
    while loading). A checkpoint whose config.json has a `quantization_config` loads as that scheme.
    """
    from selfrag_engine.config import LlamaConfig
    from selfrag_engine.model import Llama

    device = torch.device(device)
    config = LlamaConfig.from_pretrained(path)
    dtype = resolve_dtype(dtype, config.torch_dtype, device)
    prequantized = None
    if config.quantization_config is not None:
        from selfrag_engine.quantization import parse_quantization_config
        try:
            prequantized = parse_quantization_config(config.quantization_config)
        except ValueError as e:
            raise CheckpointError(f"'{Path(path) / 'config.json'}': {e}") from e
    if quantization not in (None, "fp8"):
        raise ValueError(f"unknown quantization '{quantization}' (supported: None, 'fp8')")
    if prequantized is not None and quantization not in (None, prequantized):
        raise ValueError(f"checkpoint is pre-quantized as '{prequantized}', cannot load it as '{quantization}'")
    scheme = prequantized or quantization

    with torch.device("meta"):
        model = Llama(config)
    model.to(dtype)
    if scheme == "fp8":
        from selfrag_engine.quantization import replace_linears_with_fp8
        replace_linears_with_fp8(model)
    model.to_empty(device=device)
    model.tie_weights()  # after to_empty, which would otherwise give the two modules separate storage
    load_weights(model, path, prequantized=prequantized is not None, progress=progress)
    model.init_rope()
    return model.eval().requires_grad_(False)
