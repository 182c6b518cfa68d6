"""Reading Hugging Face Llama checkpoints: safetensors (single or sharded) and `pytorch_model*.bin`.

Tensors are read one at a time and moved straight to the target device, so a 13 GB model never has a full
CPU copy. A module may own how its tensors and its children's load (an FP8 linear quantizes a high-precision
weight on its device; a fused q|k|v linear's parent maps q_proj, k_proj and v_proj into its rows) by defining
`expected_checkpoint_attrs(prequantized)` and `load_checkpoint_tensor(attr, tensor)`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePath, PureWindowsPath
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from selfrag_engine.errors import CheckpointError, TokenizerError

# Saved by older transformers releases (Llama-2 era checkpoints) and recomputed here.
IGNORED_TENSORS = re.compile(r".*\.rotary_emb\.inv_freq$")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
            if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
                raise CheckpointError(f"'{index}': 'weight_map' must map tensor names to file names")
            files = [_inside(path, name, index) for name in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"'{index}' lists shard files that are missing: {', '.join(missing)}")
            return WeightFiles(fmt, files)
        if (path / single).is_file():
            return WeightFiles(fmt, [path / single])
    raise CheckpointError(f"no weights in '{path}': expected model.safetensors, a sharded "
                          "model-*.safetensors with model.safetensors.index.json, or pytorch_model*.bin")


def check_checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint directory `path`, checked before anything slow reads it: it exists, is a directory, and
    holds config.json, the SentencePiece tokenizer and weights. Each failure is a CheckpointError naming the
    one thing that is wrong (a file given for its directory, an empty directory, ...)."""
    path = Path(path)
    hint = ("a model is a Hugging Face checkpoint directory (config.json, tokenizer.model, weights), "
            "a model id in the Hugging Face cache, or 'tiny' for the embedded model")
    if not path.exists():
        raise CheckpointError(f"model directory '{path}' does not exist ({hint})")
    if not path.is_dir():
        raise CheckpointError(f"'{path}' is a file, not a checkpoint directory: pass the directory that holds it "
                              f"('{path.parent}')")
    if not any(path.iterdir()):
        raise CheckpointError(f"model directory '{path}' is empty ({hint})")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"'{path}' has no config.json: not a Hugging Face checkpoint directory ({hint})")
    if not (path / "tokenizer.model").is_file():
        raise TokenizerError(f"'{path / 'tokenizer.model'}' is missing: the checkpoint has no tokenizer (copy "
                             "tokenizer.model and the tokenizer's JSON files from the model's repository)")
    find_weight_files(path)
    return path


def _inside(root: Path, name: str, index: Path) -> Path:
    """The shard `name` of an index, which must name a file inside the checkpoint directory: an index that
    points elsewhere (`../x`, an absolute path) would make loading read a file nobody chose. The test is on
    the name, not the resolved file, because the Hugging Face cache links each file of a snapshot to a blob
    outside its directory."""
    parts = PurePath(name).parts
    if not name or PurePath(name).is_absolute() or PureWindowsPath(name).drive or ".." in parts \
            or "\\" in name:
        raise CheckpointError(f"'{index}' names shard file '{name}', which is outside the checkpoint directory "
                              f"'{root}'")
    return root / name


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


def check_finite(name: str, tensor: torch.Tensor, path: str | Path) -> None:
    """CheckpointError if a weight holds NaN or inf (a corrupt or badly converted file), which would otherwise
    load and make the model emit token 0 forever. min and max propagate NaN, and aminmax is one pass at
    memory speed, cheap beside reading the file."""
    if tensor.numel() == 0:
        return
    if tensor.dtype == torch.float8_e4m3fn:
        # e4m3fn has no inf; its NaN is every exponent and mantissa bit set.
        bad = bool(((tensor.view(torch.uint8) & 0x7F) == 0x7F).any())
    elif tensor.dtype.is_floating_point:
        low, high = torch.aminmax(tensor)
        bad = not (bool(low.isfinite()) and bool(high.isfinite()))
    else:
        return
    if bad:
        raise CheckpointError(f"tensor '{name}' in checkpoint '{path}' holds NaN or infinite values")


def _expected(model: torch.nn.Module, prequantized: bool) -> dict[str, tuple[torch.nn.Module, str]]:
    """Checkpoint name -> (owning module, attribute) for every tensor the model must receive."""
    expected: dict[str, tuple[torch.nn.Module, str]] = {}
    owned: tuple[str, ...] = ()  # prefixes of modules that load their whole subtree
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if owned and prefix.startswith(owned):
            continue
        if hasattr(module, "expected_checkpoint_attrs"):
            # Its children's tensors are its own to map (a fused q|k|v linear takes q_proj, k_proj, v_proj).
            attrs = module.expected_checkpoint_attrs(prequantized)
            owned += (prefix,)
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
        if IGNORED_TENSORS.match(name) or (tied and name == "lm_head.weight"):
            continue
        if name not in expected:
            raise CheckpointError(f"unexpected tensor '{name}' in checkpoint '{path}' (not part of the model)")
        if name in loaded:
            raise CheckpointError(f"tensor '{name}' appears twice in checkpoint '{path}'")
        check_finite(name, tensor, path)
        module, attr = expected[name]
        if hasattr(module, "load_checkpoint_tensor"):
            module.load_checkpoint_tensor(attr, tensor)
        else:
            target = getattr(module, attr)
            if tuple(tensor.shape) != tuple(target.shape):
                raise CheckpointError(f"tensor '{name}' has shape {tuple(tensor.shape)}, "
                                      f"the model expects {tuple(target.shape)}")
            if tensor.dtype not in FLOAT_DTYPES:
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
