"""Where the committed tiny Self-RAG model and its corpus live, and how the corpus files read and write.

The directory ships as package data, so an installed package finds it next to this module:

- the Hugging Face checkpoint (config.json, model.safetensors, tokenizer files), loadable by `Engine.from_pretrained`;
- `corpus.jsonl`: the world's passages, one `{"id", "title", "text"}` object a line, to index for retrieval;
- `examples.json`: a few held-out questions (with their gold answers) and no-fact instructions for demos;
- `MODEL_CARD.md`: what the model learned, how it was made, its measured accuracy.
"""
from __future__ import annotations

import json
from pathlib import Path

from selfrag_engine.errors import CheckpointError
from selfrag_engine.selfrag.short_form import Passage

CORPUS_FILE = "corpus.jsonl"
EXAMPLES_FILE = "examples.json"


def default_model_dir() -> Path:
    """The committed tiny Self-RAG checkpoint directory (`selfrag_engine/data/tiny_selfrag`)."""
    return Path(__file__).resolve().parent.parent / "data" / "tiny_selfrag"


def default_corpus_path() -> Path:
    """The committed world corpus, `corpus.jsonl` beside the checkpoint (id/title/text per line)."""
    return default_model_dir() / CORPUS_FILE


# The name the evaluation and training modules use.
default_checkpoint_dir = default_model_dir


def write_corpus(path: Path, passages: list[dict[str, str]]) -> None:
    with open(path / CORPUS_FILE, "w", encoding="utf-8") as f:
        for p in passages:
            f.write(json.dumps({"id": p["id"], "title": p["title"], "text": p["text"]}, ensure_ascii=False) + "\n")


def read_corpus(path: Path | None = None) -> list[Passage]:
    """The passages of `corpus.jsonl` in `path` (default: the committed checkpoint's), in file order."""
    file = (path or default_checkpoint_dir()) / CORPUS_FILE
    if not file.is_file():
        raise CheckpointError(f"no corpus at {file}")
    out = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rec = json.loads(line)
            out.append(Passage(rec["title"], rec["text"], str(rec["id"])))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{file} line {n}: expected an object with id, title and text ({e})") from e
    return out


def read_examples(path: Path | None = None) -> dict[str, list[dict[str, str]]]:
    """`{"questions": [{"question", "gold"}...], "instructions": [{"instruction", "answer"}...]}`."""
    file = (path or default_checkpoint_dir()) / EXAMPLES_FILE
    if not file.is_file():
        raise CheckpointError(f"no examples at {file}")
    return json.loads(file.read_text(encoding="utf-8"))
