"""Shared test utilities: cached tiny checkpoints and the transformers oracle."""
from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch

from selfrag_engine.testing import write_tiny_checkpoint

_ROOT = Path(tempfile.mkdtemp(prefix="selfrag-test-ckpt-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


def tiny_checkpoint(**kwargs) -> Path:
    """A tiny HF checkpoint written once per process for each distinct set of options."""
    key = json.dumps(kwargs, sort_keys=True, default=str)
    path = _ROOT / hashlib.sha1(key.encode()).hexdigest()[:16]
    if not path.exists():
        write_tiny_checkpoint(path, **kwargs)
    return path


def hf_model(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())
