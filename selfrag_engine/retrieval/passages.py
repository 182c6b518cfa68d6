"""A passage of evidence (what a retriever returns and what Self-RAG inserts after `[Retrieval]`) and the
corpus files passages are read from.

Formats, chosen by the file name:
- `.tsv`: DPR style, `id<TAB>text<TAB>title` per line, as in DPR's `psgs_w100.tsv`; a first row whose id
  column is literally `id` is a header and skipped.
- `.jsonl`: one JSON object per line; `.json`: a JSON list of objects. Fields `text` (or `contents`, as
  Pyserini-style corpora name it), optional `title` and `id`.
"""
from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from selfrag_engine.errors import RequestError

__all__ = ["CorpusError", "Passage", "embedding_text", "read_passages", "write_passages_jsonl"]

TEXT_FIELDS = ("text", "contents")


@dataclass(frozen=True)
class Passage:
    title: str
    text: str
    id: str | None = None


class CorpusError(RequestError):
    """A corpus file is missing, empty or has a malformed row (the message names the file and line)."""


def embedding_text(p: Passage) -> str:
    """What a passage encoder reads: `title + " " + text`, as the Contriever passage embeddings were made."""
    return f"{p.title} {p.text}" if p.title else p.text


def _passage_from_record(obj: Any, where: str) -> Passage:
    if not isinstance(obj, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    text = next((obj[k] for k in TEXT_FIELDS if obj.get(k) is not None), None)
    if not isinstance(text, str):
        raise CorpusError(f"{where}: no passage text (expected a string field "
                          f"{' or '.join(map(repr, TEXT_FIELDS))})")
    title = obj.get("title")
    if title is not None and not isinstance(title, str):
        raise CorpusError(f"{where}: 'title' must be a string, got {type(title).__name__}")
    pid = obj.get("id")
    if pid is not None and not isinstance(pid, (str, int)):
        raise CorpusError(f"{where}: 'id' must be a string or an integer, got {type(pid).__name__}")
    return Passage(title or "", text, None if pid is None else str(pid))


def _read_tsv(path: Path) -> Iterator[Passage]:
    # DPR passages quote fields with embedded tabs or quotes the csv way; titles are often quoted.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with path.open(encoding="utf-8", newline="") as f:
        for number, row in enumerate(csv.reader(f, delimiter="\t"), start=1):
            if not row or row == [""]:
                continue
            if number == 1 and row[0].strip().lower() == "id":
                continue
            if len(row) != 3:
                raise CorpusError(f"{path}:{number}: expected 3 tab-separated columns (id, text, title), "
                                  f"got {len(row)}")
            pid, text, title = row
            if not pid.strip():
                raise CorpusError(f"{path}:{number}: empty passage id")
            yield Passage(title, text, pid.strip())


def _read_jsonl(path: Path) -> Iterator[Passage]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield _passage_from_record(obj, f"{path}:{number}")


def _read_json_list(path: Path) -> Iterator[Passage]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, list):
        raise CorpusError(f"{path}: expected a JSON list of passages, got {type(data).__name__}")
    for i, obj in enumerate(data):
        yield _passage_from_record(obj, f"{path}: item {i}")


def read_passages(path: str | Path) -> list[Passage]:
    """Every passage of a corpus file, in file order. Raises CorpusError for a missing, empty or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: no such passages file")
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        rows = _read_tsv(path)
    elif suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif suffix == ".json":
        rows = _read_json_list(path)
    else:
        raise CorpusError(f"{path}: unknown passages format {suffix or '(no extension)'!r}; "
                          "expected .tsv (id, text, title), .jsonl or .json")
    try:
        passages = list(rows)
    except UnicodeDecodeError as e:
        offset, line = _first_invalid_utf8(path)
        raise CorpusError(f"{path}: not UTF-8 text: invalid byte {e.object[e.start:e.start + 1]!r} at byte "
                          f"offset {offset} (line {line}); passages files are read as UTF-8") from None
    if not passages:
        raise CorpusError(f"{path}: no passages")
    return passages


def _first_invalid_utf8(path: Path) -> tuple[int, int]:
    """(byte offset, line number) of the first byte that is not UTF-8. The text reader's error counts from
    the start of its buffer, not of the file; a line at a time is exact, since no UTF-8 sequence spans a
    newline."""
    offset, number = 0, 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return offset + e.start, number
            offset += len(raw)
    return offset, number


def write_passages_jsonl(passages: Iterable[Passage], path: str | Path) -> None:
    """One `{"id", "title", "text"}` object per line: the format an index directory keeps its passages in."""
    with Path(path).open("w", encoding="utf-8") as f:
        for p in passages:
            f.write(json.dumps({"id": p.id, "title": p.title, "text": p.text}, ensure_ascii=False) + "\n")
