"""The model and device options every command shares (`--model`, `--revision`, `--download`, `--device`,
`--dtype`, `--quantization`, `--kv-cache-dtype`), and the checks they get before any slow work."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from selfrag_engine.backend import AUTO, device_of
from selfrag_engine.engine.llm_engine import KV_CACHE_DTYPES, Engine
from selfrag_engine.hub import EMBEDDED_MODEL_NAMES, resolve_model
from selfrag_engine.weights.checkpoint import check_checkpoint_dir

MODEL_HELP = ("checkpoint directory, Hugging Face model id (ORG/NAME, read from the local Hugging Face cache) "
              "or 'tiny' (the embedded tiny Self-RAG model)")
NO_QUANTIZATION = "none"
QUANTIZATIONS = (NO_QUANTIZATION, "fp8")


def add_model_arguments(parser: argparse.ArgumentParser, *, model_required: bool = True) -> None:
    """Adds the options that name a model and where it runs."""
    parser.add_argument("--model", required=model_required, default=None, help=MODEL_HELP)
    add_hub_arguments(parser)
    add_device_argument(parser)
    parser.add_argument("--dtype", default=AUTO,
                        help="auto (the checkpoint's on CUDA, float32 on the CPU), float32, float16 or bfloat16")
    parser.add_argument("--quantization", default=NO_QUANTIZATION, type=str.lower, choices=QUANTIZATIONS,
                        help="fp8: e4m3 weights, per output channel (a pre-quantized checkpoint loads as such)")
    parser.add_argument("--kv-cache-dtype", default="auto", type=str.lower, choices=KV_CACHE_DTYPES,
                        help="auto: keys and values in the model's dtype; fp8: e4m3 keys and values, twice the "
                             "tokens per byte")


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", default=None, help="branch, tag or commit of a model id (default: main)")
    parser.add_argument("--download", action="store_true",
                        help="download a model id missing from the cache, with progress (not when HF_HUB_OFFLINE=1)")


def add_device_argument(parser: argparse.ArgumentParser, what: str = "the model") -> None:
    parser.add_argument("--device", default=AUTO, help=f"where {what} runs: auto (CUDA when there is one, else "
                                                       "the CPU), cuda, cuda:N or cpu")


def resolve_model_arg(args: argparse.Namespace) -> Path:
    """The local checkpoint directory of `--model`, checked (files present, device available) before anything
    slow: a bad name or path fails in one line at once, not after an index or a model has loaded."""
    device_of(args.device)
    path = check_checkpoint_dir(resolve_model(args.model, args.revision, download=args.download))
    args.model_path = path
    return path


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """Engine.from_pretrained's keyword arguments for the parsed options ("auto" and "none" as None)."""
    return {"device": args.device, "dtype": None if args.dtype == AUTO else args.dtype,
            "quantization": None if args.quantization == NO_QUANTIZATION else args.quantization,
            "kv_cache_dtype": args.kv_cache_dtype}


def load_engine(args: argparse.Namespace, **options: Any) -> Engine:
    path = getattr(args, "model_path", None) or resolve_model_arg(args)
    return Engine.from_pretrained(path, progress=not args.quiet, **engine_options(args), **options)


def model_name(model: str, path: Path) -> str:
    """The name a model is known by (the server's model id): a Hugging Face id as given, else the directory's
    name."""
    if model in EMBEDDED_MODEL_NAMES or Path(model).expanduser().exists():
        return Path(path).resolve().name
    return model
