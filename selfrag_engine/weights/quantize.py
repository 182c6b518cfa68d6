"""Offline FP8 rewriting of a Hugging Face Llama safetensors checkpoint (`selfrag-engine quantize`)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from selfrag_engine.errors import CheckpointError
from selfrag_engine.layers.fp8_linear import quantize_fp8_per_channel
from selfrag_engine.weights.checkpoint import WeightFiles, count_tensors, find_weight_files, iter_tensors
from selfrag_engine.weights.files import check_destination, save_safetensors, staged_directory
from selfrag_engine.weights.quant_config import fp8_quantization_config

DECODER_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.json", "generation_config.json")


def quantize_checkpoint(src: str | Path, dst: str | Path, shard_size_bytes: int = 2 << 30, progress: bool = True,
                        *, device: str | torch.device = "cpu") -> None:
    """Writes an FP8 copy of the Hugging Face Llama safetensors checkpoint `src` (single file or sharded with
    model.safetensors.index.json) into `dst`.

    Tensors are read one at a time (safe_open). Each decoder linear `model.layers.N.{self_attn.q,k,v,o,
    mlp.gate,up,down}_proj.weight` becomes float8_e4m3fn plus `...weight_scale` float32 [out, 1] (quantized on
    `device`, bit-identical to `quantize_fp8_per_channel`); every other tensor is copied unchanged. Output:
    `model.safetensors` if it fits in `shard_size_bytes`, else `model-0000i-of-0000n.safetensors` shards with
    `model.safetensors.index.json`; `config.json` with `fp8_quantization_config()`; the tokenizer and
    generation-config files that exist in `src`. `dst` must be a new path or an empty directory; the files
    are written beside it and moved into place at the end, so a failure leaves `dst` as it was.
    """
    src, dst = Path(src), Path(dst)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"'{cfg_path}' is missing: not a Hugging Face checkpoint directory")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"'{cfg_path}' is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"'{cfg_path}' does not hold a JSON object")
    if config.get("quantization_config") is not None:
        raise CheckpointError(f"'{src}' is already quantized (config.json has a quantization_config)")
    weights = find_weight_files(src)
    if weights.format != "safetensors":
        raise CheckpointError(f"'{src}' holds pytorch_model*.bin weights; run `selfrag-engine convert` first")
    check_destination(src, dst)
    with staged_directory(dst) as out:
        _quantize_into(src, weights, config, out, shard_size_bytes, progress, torch.device(device))


def _quantize_into(src: Path, weights: WeightFiles, config: dict, dst: Path, shard_size_bytes: int,
                   progress: bool, device: torch.device) -> None:
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
        save_safetensors(shard, path)
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
    for name, t in iter_tensors(weights):
        if DECODER_LINEAR.match(name) and t.dim() == 2:
            try:
                q, s = quantize_fp8_per_channel(t.to(device))
            except ValueError as e:
                raise CheckpointError(f"tensor '{name}' of '{src}': {e}") from e
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
