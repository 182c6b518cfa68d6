"""Where the committed tiny Self-RAG model and its corpus live, and how the corpus files read and write.

The directory ships as package data, so an installed package finds it next to this module:

- the Hugging Face checkpoint (config.json, model.safetensors, tokenizer files), loadable by `Engine.from_pretrained`;
- `corpus.jsonl`: the world's passages, one `{"id", "title", "text"}` object a line, to index for retrieval;
- `examples.json`: a few held-out questions (with their gold answers), no-fact instructions and long-form
  requests (with the facts a good answer states) for demos;
- `training.json`: the training run's record (its command, settings, statistics and held-out evaluation), which
  says what the model was trained to do;
- `MODEL_CARD.md`: what the model learned, how it was made, its measured accuracy.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from selfrag_engine.errors import CheckpointError
from selfrag_engine.hub import embedded_model_dir
from selfrag_engine.retrieval.passages import (
    Passage,
    read_passages,
    write_passages_jsonl,
)

CORPUS_FILE = "corpus.jsonl"
EXAMPLES_FILE = "examples.json"
TRAINING_FILE = "training.json"


def default_model_dir() -> Path:
    """The committed tiny Self-RAG checkpoint directory (`selfrag_engine/data/tiny_selfrag`, model name `tiny`)."""
    return embedded_model_dir()


def default_corpus_path() -> Path:
    """The committed world corpus, `corpus.jsonl` beside the checkpoint (id/title/text per line)."""
    return default_model_dir() / CORPUS_FILE


# The name the evaluation and training modules use.
default_checkpoint_dir = default_model_dir


def write_corpus(path: Path, passages: Iterable[Passage]) -> None:
    """`corpus.jsonl` in `path`, in the format `read_passages` reads."""
    write_passages_jsonl(passages, path / CORPUS_FILE)


def read_corpus(path: Path | None = None) -> list[Passage]:
    """The passages of `corpus.jsonl` in `path` (default: the committed checkpoint's), in file order."""
    file = (path or default_checkpoint_dir()) / CORPUS_FILE
    if not file.is_file():
        raise CheckpointError(f"no corpus at {file}")
    return read_passages(file)


def read_examples(path: Path | None = None) -> dict[str, list[dict[str, str]]]:
    """`{"questions": [{"question", "gold"}...], "instructions": [{"instruction", "answer"}...]}`."""
    file = (path or default_checkpoint_dir()) / EXAMPLES_FILE
    if not file.is_file():
        raise CheckpointError(f"no examples at {file}")
    return json.loads(file.read_text(encoding="utf-8"))


def read_training_record(path: Path | None = None) -> dict | None:
    """`training.json` in `path` (default: the committed checkpoint's), the record `tiny.train` writes beside the
    checkpoint; None where there is none (the checkpoints shipped before the record did)."""
    file = (path or default_checkpoint_dir()) / TRAINING_FILE
    if not file.is_file():
        return None
    return json.loads(file.read_text(encoding="utf-8"))


def trained_for_long_form(path: Path | None = None) -> bool:
    """Whether the checkpoint in `path` was trained on long-form answers, as its training record says (a share
    of long-form requests in its training data above 0). A checkpoint without a record predates them."""
    record = read_training_record(path)
    return bool(record and record.get("train_config", {}).get("long_form_fraction", 0) > 0)
