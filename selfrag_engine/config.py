"""The model configuration, read from a Hugging Face Llama `config.json`."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from selfrag_engine.errors import CheckpointError

_DTYPES = {
    "float32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0  # linear scaling: positions are divided by this factor
    tie_word_embeddings: bool = False
    torch_dtype: torch.dtype = torch.float16
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    quantization_config: dict | None = field(default=None, compare=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config.json") -> "LlamaConfig":
        def need(key: str):
            if key not in cfg:
                raise CheckpointError(f"{source}: required field '{key}' is missing")
            return cfg[key]

        model_type = cfg.get("model_type", "llama")
        if model_type != "llama":
            raise CheckpointError(f"{source}: model_type '{model_type}' is not supported (expected 'llama')")
        for key in ("hidden_act",):
            if cfg.get(key, "silu") != "silu":
                raise CheckpointError(f"{source}: {key}='{cfg[key]}' is not supported (expected 'silu')")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key, False):
                raise CheckpointError(f"{source}: {key}=true is not supported (Llama-2 has no biases)")

        def integer(key: str, value: object) -> int:
            # A string or a float is refused rather than coerced: a config that says "64" or 64.5 was not
            # written by transformers, and guessing what it meant hides the mistake. bool is an int in Python.
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CheckpointError(f"{source}: {key} must be a positive integer, got {value!r}")
            return value

        def positive_float(key: str, value: object) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < math.inf:
                raise CheckpointError(f"{source}: {key} must be a positive finite number, got {value!r}")
            return float(value)

        def token_id(key: str, value: object) -> int | None:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise CheckpointError(f"{source}: {key} must be a token id (an integer >= 0) or null, "
                                      f"got {value!r}")
            return value

        heads = integer("num_attention_heads", need("num_attention_heads"))
        kv = cfg.get("num_key_value_heads")
        kv_heads = heads if kv is None else integer("num_key_value_heads", kv)
        hidden = integer("hidden_size", need("hidden_size"))
        if hidden % heads != 0:
            raise CheckpointError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        if heads % kv_heads != 0:
            raise CheckpointError(f"{source}: num_attention_heads {heads} is not a multiple of "
                                  f"num_key_value_heads {kv_heads}")
        if "head_dim" in cfg and cfg["head_dim"] is not None and (
                isinstance(cfg["head_dim"], bool) or cfg["head_dim"] != hidden // heads):
            raise CheckpointError(f"{source}: head_dim {cfg['head_dim']!r} != hidden_size / num_attention_heads "
                                  f"({hidden // heads})")

        factor = 1.0
        # transformers 5 writes rope_parameters ({"rope_theta", "rope_type", "factor", ...}) in place of
        # rope_theta and rope_scaling.
        params = cfg.get("rope_parameters")
        if params is not None and not isinstance(params, dict):
            raise CheckpointError(f"{source}: rope_parameters must be an object or null, got {params!r}")
        params = params or {}
        scaling = cfg.get("rope_scaling")
        if scaling is None and params:
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        if scaling is not None and not isinstance(scaling, dict):
            raise CheckpointError(f"{source}: rope_scaling must be an object or null, got {scaling!r}")
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("linear", "default"):
                raise CheckpointError(f"{source}: rope_scaling type '{kind}' is not supported (only 'linear')")
            if kind == "linear":
                factor = positive_float("rope_scaling.factor", scaling.get("factor"))

        tie = cfg.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise CheckpointError(f"{source}: tie_word_embeddings must be true or false, got {tie!r}")

        dtype_name = cfg.get("torch_dtype") or cfg.get("dtype") or "float16"
        if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
            raise CheckpointError(f"{source}: torch_dtype {dtype_name!r} is not supported "
                                  f"(float32, float16 or bfloat16)")

        eos = cfg.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return cls(
            vocab_size=integer("vocab_size", need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=integer("intermediate_size", need("intermediate_size")),
            num_hidden_layers=integer("num_hidden_layers", need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=integer("max_position_embeddings", cfg.get("max_position_embeddings", 4096)),
            rms_norm_eps=positive_float("rms_norm_eps", cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=positive_float("rope_theta", cfg.get("rope_theta", params.get("rope_theta", 10000.0))),
            rope_scaling_factor=factor,
            tie_word_embeddings=tie,
            torch_dtype=_DTYPES[dtype_name],
            bos_token_id=token_id("bos_token_id", cfg.get("bos_token_id", 1)),
            eos_token_id=token_id("eos_token_id", eos),
            quantization_config=cfg.get("quantization_config"),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        file = path / "config.json"
        if not path.is_dir():
            raise CheckpointError(f"checkpoint directory '{path}' does not exist")
        if not file.is_file():
            raise CheckpointError(f"'{file}' is missing: not a Hugging Face checkpoint directory")
        try:
            cfg = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"'{file}' is not valid JSON: {e}") from e
        if not isinstance(cfg, dict):
            raise CheckpointError(f"'{file}' does not hold a JSON object")
        return cls.from_dict(cfg, source=str(file))

