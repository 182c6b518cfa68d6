"""Building a model from a checkpoint directory: config, dtype, quantization scheme, weights."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from selfrag_engine.config import LlamaConfig
from selfrag_engine.errors import CheckpointError, RequestError
from selfrag_engine.layers.fp8_linear import replace_linears_with_fp8
from selfrag_engine.models.llama import Llama
from selfrag_engine.weights.checkpoint import FLOAT_DTYPES, load_weights
from selfrag_engine.weights.quant_config import parse_quantization_config


logger = logging.getLogger("selfrag_engine")

# Above this many parameters a model on the CPU is worth a notice: it is slow and takes tens of GB.
LARGE_ON_CPU_PARAMETERS = 1_000_000_000


def auto_dtype(config_dtype: torch.dtype, device_type: str, bf16_supported: bool) -> torch.dtype:
    """The dtype that fits the device when none is asked for: on CUDA the checkpoint's own (bfloat16 becomes
    float16 on a GPU without bfloat16); on the CPU float32, the one dtype whose matmuls are fast and exact on
    every CPU."""
    if device_type != "cuda":
        return torch.float32
    if config_dtype == torch.bfloat16 and not bf16_supported:
        return torch.float16
    return config_dtype


def parameter_count(config: LlamaConfig) -> int:
    """Parameters of the Llama the config describes (embeddings, attention, MLP, norms, head)."""
    h, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    q = config.num_attention_heads * config.head_dim
    layer = h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size + 2 * h
    head = 0 if config.tie_word_embeddings else config.vocab_size * h
    return config.vocab_size * h + config.num_hidden_layers * layer + h + head


def large_on_cpu_notice(config: LlamaConfig, dtype: torch.dtype, device: torch.device) -> str | None:
    """The one-line notice for a large model landing on the CPU (None when there is nothing to say)."""
    n = parameter_count(config)
    if device.type != "cpu" or n < LARGE_ON_CPU_PARAMETERS:
        return None
    gb = n * torch.empty((), dtype=dtype).element_size() / 1e9
    return (f"selfrag-engine: note: loading a {n / 1e9:.1f}B-parameter model on the CPU in "
            f"{str(dtype).removeprefix('torch.')} (~{gb:.0f} GB of memory, slow to decode); "
            + ("no CUDA device is visible" if not torch.cuda.is_available() else "pass --device cuda to use the GPU"))


def resolve_dtype(dtype: torch.dtype | str | None, config_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The activation dtype: as asked, else `auto_dtype` for the device."""
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                 "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if dtype not in names:
            raise RequestError(f"unknown dtype '{dtype}' (use float32, float16 or bfloat16)")
        dtype = names[dtype]
    if dtype is None:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = auto_dtype(config_dtype, device.type, bf16)
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
    notice = large_on_cpu_notice(config, dtype, device)
    if notice is not None:
        logger.warning(notice)
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
