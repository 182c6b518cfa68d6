"""Shared test utilities: cached tiny checkpoints and the transformers oracle."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from selfrag_engine.testing import write_tiny_checkpoint

_ROOT = Path(tempfile.mkdtemp(prefix="selfrag-test-ckpt-"))


@functools.lru_cache(maxsize=None)
def tiny_checkpoint(**kwargs) -> Path:
    """A tiny HF checkpoint written once per process for each distinct set of options."""
    name = "-".join(f"{k}={v}" for k, v in sorted(kwargs.items())).replace("/", "_").replace(" ", "") or "default"
    path = _ROOT / name
    if not path.exists():
        write_tiny_checkpoint(path, **kwargs)
    return path


def hf_model(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, torch_dtype=dtype, attn_implementation="eager").eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())
