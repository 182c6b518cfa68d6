"""The documents of the lm-eval tasks beside this file, read from the jsonl files here (no dataset hub).

Each document asks about an entity of the embedded model's world that training held out, in a phrasing training
held out, with the passage stating the fact in the prompt in Self-RAG's retrieval format, up to the model's
`[Relevant]` judgement; the answer is the sentence the model was trained to write after it. The distractor
choices state another value of the same attribute that the passage does not mention. The perplexity task's
documents are passages of the same entities."""
from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _load(name: str) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_mc(**_: object) -> datasets.DatasetDict:
    return _load("tiny_world_mc.jsonl")


def load_gen(**_: object) -> datasets.DatasetDict:
    return _load("tiny_world_gen.jsonl")


def load_ppl(**_: object) -> datasets.DatasetDict:
    return _load("tiny_world_ppl.jsonl")
