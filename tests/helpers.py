"""Shared test utilities: cached tiny checkpoints and the transformers oracle."""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import torch

from selfrag_engine.testing import write_tiny_checkpoint
from selfrag_engine.tiny.assets import default_model_dir
from selfrag_engine.weights.checkpoint import check_checkpoint_dir

_ROOT = Path(tempfile.mkdtemp(prefix="selfrag-test-ckpt-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


# Every engine a GPU test builds passes this KV budget (or num_blocks): a test takes what it needs, never a share
# of the card, so the engines of one process (and the frames pytest keeps of a failed test) all fit.
GPU_KV_CACHE_BYTES = 256 << 20


# A checkpoint directory trained on the tiny world (config, weights, tokenizer, corpus.jsonl, examples.json,
# training.json, as `python -m selfrag_engine.tiny.train --out DIR` writes them) for the behaviour tests of the
# embedded model to judge instead of the embedded one: a candidate is held to the same bounds before it
# replaces it.
TINY_MODEL_ENV = "SELFRAG_TINY_MODEL"


def tiny_model_dir() -> Path:
    """The tiny Self-RAG model the behaviour tests judge: the embedded one, or the directory $SELFRAG_TINY_MODEL
    names (checked as a checkpoint: a wrong path fails every test that asks, naming what is wrong)."""
    chosen = os.environ.get(TINY_MODEL_ENV)
    return check_checkpoint_dir(Path(chosen).expanduser()) if chosen else default_model_dir()


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


def slow_llama_tokenizer():
    """The tokenizer oracle: transformers' SentencePiece-backed LlamaTokenizer (the slow class of transformers
    4.x, which the published Self-RAG tokenizer was saved with). Skips the calling test, saying why, when this
    transformers has none: in 5.x `LlamaTokenizer` is a tokenizers BPE converted from tokenizer.model, which needs
    protobuf, and its legacy/dummy-prefix behaviour is not the slow class's."""
    transformers = pytest.importorskip("transformers", reason="the tokenizer oracle needs transformers 4.x")
    cls = transformers.LlamaTokenizer
    if not hasattr(cls, "get_spm_processor"):
        pytest.skip(f"transformers {transformers.__version__} has no SentencePiece-backed (slow) LlamaTokenizer, "
                    "the tokenizer oracle; it runs with transformers 4.x")
    return cls


def hf_rope(hf_config) -> tuple[float, dict | None]:
    """(rope theta, rope scaling or None for plain rope) as transformers read a config: 4.x keeps `rope_theta` and
    `rope_scaling` (None without scaling); 5.x folds both into `rope_parameters`, whose plain form is
    {"rope_type": "default", "rope_theta": ...}."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:
        return hf_config.rope_theta, hf_config.rope_scaling
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return params["rope_theta"], None if scaling == {"rope_type": "default"} else scaling


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


def record_preemptions(engine) -> list:
    """Wraps the engine's scheduler so that every sequence a step preempts is appended to the returned list."""
    preempted: list = []
    schedule = engine.scheduler.schedule

    def watch():
        batch = schedule()
        preempted.extend(batch.preempted)
        return batch

    engine.scheduler.schedule = watch
    return preempted


@contextlib.contextmanager
def one_ray_cluster_at_a_time() -> Iterator[None]:
    """Held while a test runs a local Ray cluster: the test workers of one machine take turns (a lock file), so
    two clusters never start side by side on its cores, where Serve's controller may judge a slow-starting
    HTTP proxy unhealthy and kill it."""
    with open(Path(tempfile.gettempdir()) / "selfrag-engine-ray-tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prefix_texts(engine, out) -> list[str]:
    """The reference text of the answer's first i tokens, for i = 0..n: vLLM's detokenizer over each prefix."""
    return [engine.tokenizer.decode_continuation(out.token_ids[:i], out.prompt_token_ids)
            for i in range(len(out.token_ids) + 1)]


def spanning_stop(engine, out) -> str:
    """A stop string read off the answer: its end, spanning its last two tokens or more, whose first character
    also occurs earlier in the answer (so a stream must hold it back there, then let it go)."""
    texts, n = prefix_texts(engine, out), len(out.token_ids)
    text = texts[n]
    assert text == out.text
    for k in range(2, min(8, n) + 1):
        head, first = texts[n - k], texts[n - k + 1]
        # The span's first token and a later one both add text; the stop's first character came earlier too.
        if text.startswith(first) and first.startswith(head) and head != first != text and \
                0 <= text.find(text[len(head)]) < len(head):
            return text[len(head):]
    pytest.fail(f"no stop string spanning tokens ends the answer {text!r}: choose another prompt")
