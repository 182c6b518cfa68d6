"""Building a model from a checkpoint directory: config, dtype, quantization scheme, weights."""
from __future__ import annotations

from pathlib import Path

import torch

from selfrag_engine.config import LlamaConfig
from selfrag_engine.errors import CheckpointError, RequestError
from selfrag_engine.layers.fp8_linear import replace_linears_with_fp8
from selfrag_engine.models.llama import Llama
from selfrag_engine.weights.checkpoint import FLOAT_DTYPES, load_weights
from selfrag_engine.weights.quant_config import parse_quantization_config


def resolve_dtype(dtype: torch.dtype | str | None, config_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The activation dtype: as asked, else the checkpoint's on CUDA and float32 on the CPU."""
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                 "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if dtype not in names:
            raise RequestError(f"unknown dtype '{dtype}' (use float32, float16 or bfloat16)")
        dtype = names[dtype]
    if dtype is None:
        dtype = config_dtype if device.type == "cuda" else torch.float32
    if dtype not in FLOAT_DTYPES:
        raise RequestError(f"dtype {dtype} is not supported (use float32, float16 or bfloat16)")
    return dtype


def load_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None,
               quantization: str | None = None, progress: bool = True):
    """Builds the Llama of the checkpoint at `path` directly on `device` and loads its weights.

    quantization: None (weights in `dtype`), or "fp8" (decoder linears quantized to e4m3 per output channel
    while loading). A checkpoint whose config.json has a `quantization_config` loads as that scheme.
    """
    device = torch.device(device)
    config = LlamaConfig.from_pretrained(path)
    dtype = resolve_dtype(dtype, config.torch_dtype, device)
    prequantized = None
    if config.quantization_config is not None:
        try:
            prequantized = parse_quantization_config(config.quantization_config)
        except ValueError as e:
            raise CheckpointError(f"'{Path(path) / 'config.json'}': {e}") from e
    if quantization not in (None, "fp8"):
        raise RequestError(f"unknown quantization '{quantization}' (supported: None, 'fp8')")
    if prequantized is not None and quantization not in (None, prequantized):
        raise RequestError(f"checkpoint is pre-quantized as '{prequantized}', cannot load it as '{quantization}'")
    scheme = prequantized or quantization

    with torch.device("meta"):
        model = Llama(config)
    model.to(dtype)
    if scheme == "fp8":
        replace_linears_with_fp8(model)
    model.to_empty(device=device)
    model.tie_weights()  # after to_empty, which would otherwise give the two modules separate storage
    load_weights(model, path, prequantized=prequantized is not None, progress=progress)
    model.init_rope()
    return model.eval().requires_grad_(False)
