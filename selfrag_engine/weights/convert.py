"""Offline conversion of `pytorch_model*.bin` weights to safetensors (`selfrag-engine convert`)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from selfrag_engine.errors import CheckpointError
from selfrag_engine.weights.checkpoint import (
    IGNORED_TENSORS,
    WeightFiles,
    find_weight_files,
    iter_tensors,
)
from selfrag_engine.weights.files import check_destination, save_safetensors, staged_directory


def convert_bin_to_safetensors(src: str | Path, dst: str | Path, *, progress: bool = True) -> Path:
    """Writes the `pytorch_model*.bin` weights of `src` as safetensors shards (same split) into `dst` (a new
    path or an empty directory), with the other files of the directory copied. Returns `dst`. The files are
    written beside it and moved into place at the end, so a failure leaves `dst` as it was."""
    src, dst = Path(src), Path(dst)
    weights = find_weight_files(src)
    if weights.format != "bin":
        raise CheckpointError(f"'{src}' has no pytorch_model*.bin weights to convert")
    check_destination(src, dst)
    with staged_directory(dst) as out:
        _convert_into(src, weights, out, progress)
    return dst


def _convert_into(src: Path, weights: WeightFiles, out: Path, progress: bool) -> None:
    for file in src.iterdir():
        if file.is_file() and not file.name.startswith("pytorch_model"):
            shutil.copy2(file, out / file.name)
    n = len(weights.files)
    weight_map: dict[str, str] = {}
    total_size = 0
    for i, file in enumerate(tqdm(weights.files, desc="converting", unit="shard", disable=not progress)):
        out_name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        state = {name: t.contiguous() for name, t in iter_tensors(WeightFiles("bin", [file]))
                 if not IGNORED_TENSORS.match(name)}
        # safetensors refuses tensors that share memory (tied weights saved twice by torch.save).
        seen: dict[int, str] = {}
        for name in list(state):
            ptr = state[name].data_ptr()
            if ptr in seen:
                state[name] = state[name].clone()
            seen[ptr] = name
        save_safetensors(state, out / out_name)
        for name, t in state.items():
            weight_map[name] = out_name
            total_size += t.numel() * t.element_size()
        del state
    if n > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
