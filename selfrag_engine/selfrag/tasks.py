"""Evaluation tasks of the Self-RAG paper: presets, readers of the reference eval files, prompts, answer
normalization.

A preset holds what the reference README command of a task sets (task instruction, number of passages,
generation length, threshold, closed-set aggregation, metric). A reader turns one row of the reference's
file (`popqa_longtail_w_gs.jsonl`, `triviaqa_test_w_gs.jsonl`, `health_claims_processed.jsonl`,
`arc_challenge_processed.jsonl`, `asqa_eval_gtr_top100.json`, the FactScore bio file) into an `Example`:
the instruction the model sees, the gold answers and the passages that came with the row. Field names
vary between files and versions, so each reader accepts the known variants and names the missing field,
with file and line, when none is present.
"""
from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from selfrag_engine.errors import RequestError
from selfrag_engine.retrieval.passages import Passage
from selfrag_engine.selfrag.decisions import MODES

# Task instructions of the reference scripts (the instruction the model sees precedes the row's text).
PUBHEALTH_INSTRUCTION = "Is the following statement correct or not? Say true if it's correct; otherwise say false."
ARC_INSTRUCTION = "Given four answer candidates, A, B, C and D, choose the best answer choice."
ASQA_INSTRUCTION = ("Answer the following question. The question may be ambiguous and have multiple correct "
                    "answers, and in that case, you have to provide a long-form answer including all correct "
                    "answers.")

# The reference scripts' names for the retrieval modes.
MODE_ALIASES = {"adaptive_retrieval": "adaptive", "always_retrieve": "always", "no_retrieval": "never",
                "default": "adaptive"}

QUESTION_FIELDS = ("question", "instruction", "query")
GOLD_FIELDS = ("answers", "answer", "golds", "gold", "output")
PASSAGE_FIELDS = ("ctxs", "docs", "top_contexts", "passages")
ID_FIELDS = ("id", "sample_id", "question_id", "qid")


class DatasetError(RequestError):
    """A row of an evaluation file cannot be read (malformed JSON, a required field missing or ill-typed)."""


@dataclass(frozen=True)
class Preset:
    """A task's settings, as the reference README command runs it."""
    name: str
    form: str                     # "short" or "long"
    ndocs: int
    max_new_tokens: int           # per answer (short form) or per segment (long form)
    threshold: float
    mode: str                     # "adaptive", "always" or "never"
    closed_set: bool              # sum branch scores per answer string (PubHealth, ARC)
    metrics: tuple[str, ...]      # computed per row, first one is the headline
    use_seqscore: bool = True     # every README command passes --use_seqscore
    w_use_released: float = 0.5   # the reference script's utility weight (compat="released")
    beam_width: int = 2
    max_depth: int = 7
    reference_file: str = ""

    @property
    def primary_metric(self) -> str | None:
        return self.metrics[0] if self.metrics else None


PRESETS: dict[str, Preset] = {
    # The short-form script at HEAD defaults --w_use to 1.0 and the README commands do not set it.
    "popqa": Preset("popqa", "short", ndocs=10, max_new_tokens=100, threshold=0.2, mode="adaptive",
                    closed_set=False, metrics=("match",), w_use_released=1.0,
                    reference_file="popqa_longtail_w_gs.jsonl"),
    "triviaqa": Preset("triviaqa", "short", ndocs=10, max_new_tokens=100, threshold=0.2, mode="adaptive",
                       closed_set=False, metrics=("match",), w_use_released=1.0,
                       reference_file="triviaqa_test_w_gs.jsonl"),
    "pubhealth": Preset("pubhealth", "short", ndocs=5, max_new_tokens=50, threshold=0.2, mode="adaptive",
                        closed_set=True, metrics=("accuracy", "match"), w_use_released=1.0,
                        reference_file="health_claims_processed.jsonl"),
    "arc_challenge": Preset("arc_challenge", "short", ndocs=5, max_new_tokens=50, threshold=0.2, mode="adaptive",
                            closed_set=True, metrics=("accuracy", "match"), w_use_released=1.0,
                            reference_file="arc_challenge_processed.jsonl"),
    # The paper sets delta to 0 for ASQA; the README command always retrieves. The long-form script
    # hard-codes w_use 0.5.
    "asqa": Preset("asqa", "long", ndocs=5, max_new_tokens=300, threshold=0.0, mode="always", closed_set=False,
                   metrics=("str_em",), reference_file="asqa_eval_gtr_top100.json"),
    # FactScore needs an external fact checker: no metric is computed here, the output feeds it.
    "bio": Preset("bio", "long", ndocs=5, max_new_tokens=300, threshold=0.2, mode="adaptive", closed_set=False,
                  metrics=(), reference_file="factscore_unlabeled_alpaca_13b_retrieval.jsonl"),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise RequestError(f"unknown task {name!r}; known tasks: {', '.join(PRESETS)}")
    return PRESETS[name]


def normalize_mode(mode: str) -> str:
    mode = MODE_ALIASES.get(mode, mode)
    if mode not in MODES:
        raise RequestError(f"mode must be one of {MODES} (or {tuple(MODE_ALIASES)}), got {mode!r}")
    return mode


@dataclass
class Example:
    """One evaluation row, ready for the model."""
    index: int                              # 0-based position in the file
    line: int                               # 1-based line (JSONL) or list position + 1 (JSON)
    id: str | None
    question: str                           # the row's own text: shown, and used as the retrieval query
    instruction: str                        # what goes into `### Instruction:`
    golds: list[str]
    passages: list[Passage] | None          # the row's passages in file order; None when it has none
    choices: dict[str, str] | None = None   # ARC: letter -> choice text
    qa_pairs: list[list[str]] | None = None  # ASQA: short answers of each disambiguated question
    extra: dict[str, Any] = field(default_factory=dict)  # fields carried to the predictions file


# ---- files ------------------------------------------------------------------------------------------


def load_records(path: str | Path, limit: int | None = None) -> list[tuple[int, dict]]:
    """(line number, object) pairs of a JSONL file, or of a JSON file holding a list (or {"data": list})."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a list of rows (or an object with a 'data' list)")
        records = list(enumerate(data, start=1))[:limit]
    else:
        records = []
        with path.open(encoding="utf-8") as f:
            for number, text in enumerate(f, start=1):
                if limit is not None and len(records) >= limit:
                    break
                if not text.strip():
                    continue
                try:
                    records.append((number, json.loads(text)))
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
    for number, obj in records:
        if not isinstance(obj, dict):
            raise DatasetError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
    if not records:
        raise DatasetError(f"{path}: no rows")
    return records


def read_examples(path: str | Path, preset: Preset, limit: int | None = None) -> list[Example]:
    reader = READERS[preset.name]
    examples = []
    for index, (line, row) in enumerate(load_records(path, limit)):
        where = f"{path}:{line}"
        ex = reader(row, where)
        ex.index, ex.line = index, line
        examples.append(ex)
    return examples


# ---- fields -----------------------------------------------------------------------------------------


def _first(row: dict, names: tuple[str, ...], where: str, what: str) -> Any:
    for name in names:
        if row.get(name) is not None:
            return row[name]
    raise DatasetError(f"{where}: no {what} (expected one of the fields {', '.join(map(repr, names))})")


def _text(row: dict, names: tuple[str, ...], where: str, what: str) -> str:
    value = _first(row, names, where, what)
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: the {what} must be a non-empty string, got {value!r}")
    return value


def _golds(row: dict, where: str, names: tuple[str, ...] = GOLD_FIELDS) -> list[str]:
    value = _first(row, names, where, "gold answers")
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, (str, int, float, bool)) for v in values):
        raise DatasetError(f"{where}: gold answers must be a string or a non-empty list of strings, got {value!r}")
    return [str(v) for v in values]


def _passages(row: dict, where: str) -> list[Passage] | None:
    for name in PASSAGE_FIELDS:
        if row.get(name) is not None:
            ctxs = row[name]
            break
    else:
        return None
    if not isinstance(ctxs, list):
        raise DatasetError(f"{where}: '{name}' must be a list of passages, got {type(ctxs).__name__}")
    passages = []
    for i, c in enumerate(ctxs):
        if not isinstance(c, dict) or not isinstance(c.get("text"), str):
            raise DatasetError(f"{where}: passage {i} of '{name}' has no 'text' string")
        title = c.get("title")
        if title is not None and not isinstance(title, str):
            raise DatasetError(f"{where}: passage {i} of '{name}' has a non-string 'title'")
        pid = c.get("id")
        passages.append(Passage(title or "", c["text"], None if pid is None else str(pid)))
    return passages


def _id(row: dict) -> str | None:
    for name in ID_FIELDS:
        if row.get(name) is not None:
            return str(row[name])
    return None


# ---- readers ----------------------------------------------------------------------------------------


def read_open_qa(row: dict, where: str) -> Example:
    """PopQA, TriviaQA: the bare question is the instruction; any gold string in the answer counts."""
    question = _text(row, QUESTION_FIELDS, where, "question")
    return Example(0, 0, _id(row), question, question, _golds(row, where), _passages(row, where))


def pubhealth_instruction(claim: str) -> str:
    return PUBHEALTH_INSTRUCTION + "\n\n## Input:\n\n" + claim


def read_pubhealth(row: dict, where: str) -> Example:
    claim = _text(row, ("claim",) + QUESTION_FIELDS, where, "claim")
    golds = _golds(row, where, GOLD_FIELDS + ("label",))
    labels = {pubhealth_gold(g) for g in golds}
    if None in labels or len(labels) != 1:
        raise DatasetError(f"{where}: the gold label must be true or false (or SUPPORTS / REFUTES), got {golds!r}")
    return Example(0, 0, _id(row), claim, pubhealth_instruction(claim), golds, _passages(row, where))


def arc_choices(choices: Any, where: str) -> dict[str, str]:
    """Letter -> text; numeric labels 1..4 stand for A..D, as in the reference's files."""
    if not isinstance(choices, dict) or not isinstance(choices.get("text"), list) \
            or not isinstance(choices.get("label"), list) or len(choices["text"]) != len(choices["label"]):
        raise DatasetError(f"{where}: 'choices' must be {{'text': [...], 'label': [...]}} of equal lengths")
    out: dict[str, str] = {}
    for label, text in zip(choices["label"], choices["text"]):
        letter = arc_label(str(label))
        if letter is None:
            raise DatasetError(f"{where}: choice label {label!r} is not one of A-E or 1-5")
        out[letter] = str(text)
    if "A" not in out:
        raise DatasetError(f"{where}: 'choices' has no choice A")
    return out


def arc_label(label: str) -> str | None:
    label = label.strip()
    if label in ("1", "2", "3", "4", "5"):
        return "ABCDE"[int(label) - 1]
    return label if label in ("A", "B", "C", "D", "E") else None


def arc_instruction(question: str, choices: dict[str, str]) -> str:
    # The reference always lists A-D (an empty D when a question has three) and adds E only when present.
    listed = "".join(f"\n{k}: {choices.get(k, '')}" for k in "ABCD")
    if "E" in choices:
        listed += f"\nE: {choices['E']}"
    return ARC_INSTRUCTION + "\n\n### Input:\n" + question + listed


def read_arc(row: dict, where: str) -> Example:
    question = _text(row, QUESTION_FIELDS, where, "question")
    choices = arc_choices(_first(row, ("choices",), where, "answer choices"), where)
    key = _first(row, ("answerKey", "answer_key") + GOLD_FIELDS, where, "answer key")
    key = key[0] if isinstance(key, list) and len(key) == 1 else key
    letter = arc_label(str(key))
    if letter is None or letter not in choices:
        raise DatasetError(f"{where}: answer key {key!r} is not one of the choices {sorted(choices)}")
    return Example(0, 0, _id(row), question, arc_instruction(question, choices), [letter], _passages(row, where),
                   choices=choices)


def asqa_instruction(question: str) -> str:
    # The reference joins these without a blank line ("...answers.## Input:"); the model was evaluated so.
    return ASQA_INSTRUCTION + "## Input:\n\n" + question


def read_asqa(row: dict, where: str) -> Example:
    question = _text(row, QUESTION_FIELDS, where, "question")
    qa_pairs = None
    if row.get("qa_pairs") is not None:
        pairs = row["qa_pairs"]
        if not isinstance(pairs, list) or not all(isinstance(p, dict) and isinstance(p.get("short_answers"), list)
                                                  for p in pairs):
            raise DatasetError(f"{where}: 'qa_pairs' must be a list of objects with a 'short_answers' list")
        qa_pairs = [[str(a) for a in p["short_answers"]] for p in pairs]
    golds = _golds(row, where) if any(row.get(n) is not None for n in GOLD_FIELDS) else []
    if qa_pairs is None and golds:
        qa_pairs = [[g] for g in golds]  # each gold answer counts as one disambiguation
    return Example(0, 0, _id(row), question, asqa_instruction(question), golds, _passages(row, where),
                   qa_pairs=qa_pairs)


def bio_instruction(entity: str) -> str:
    return f"Tell me a bio of {entity}."


def read_bio(row: dict, where: str) -> Example:
    """The reference feeds the row's `input` verbatim; rows with only a topic get the FactScore question."""
    topic = row.get("topic") if isinstance(row.get("topic"), str) else row.get("entity")
    if any(isinstance(row.get(n), str) and row[n].strip() for n in ("input",) + QUESTION_FIELDS):
        instruction = _text(row, ("input",) + QUESTION_FIELDS, where, "input")
    elif isinstance(topic, str) and topic.strip():
        instruction = bio_instruction(topic)
    else:
        raise DatasetError(f"{where}: no input (expected one of the fields 'input', 'question', 'topic', 'entity')")
    extra = {k: row[k] for k in ("topic", "cat") if k in row}
    return Example(0, 0, _id(row), topic if isinstance(topic, str) else instruction, instruction, [],
                   _passages(row, where), extra=extra)


READERS: dict[str, Callable[[dict, str], Example]] = {
    "popqa": read_open_qa, "triviaqa": read_open_qa, "pubhealth": read_pubhealth, "arc_challenge": read_arc,
    "asqa": read_asqa, "bio": read_bio,
}


# ---- answers ----------------------------------------------------------------------------------------


def postprocess_prediction(preset: Preset, text: str) -> str:
    """The reference's short-form clean-up: one leading '#' or ':' dropped; closed sets lose newlines (their
    branch answers are compared as strings)."""
    if preset.form != "short":
        return text
    if preset.closed_set:
        text = text.replace("\n", "")
    if text[:1] in ("#", ":"):
        text = text[1:]
    return text


def pubhealth_gold(label: str) -> str | None:
    label = label.strip().lower()
    if label in ("true", "supports", "support"):
        return "true"
    if label in ("false", "refutes", "refute"):
        return "false"
    return None


def pubhealth_label(prediction: str) -> str | None:
    """true / false read off an answer: the FEVER labels as the reference maps them, else the first of the
    words true / false."""
    if "SUPPORTS" in prediction:
        return "true"
    if "REFUTES" in prediction:
        return "false"
    m = re.search(r"\b(true|false)\b", prediction.lower())
    return m.group(1) if m else None


_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD-style normalization: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def arc_letter(prediction: str, choices: dict[str, str] | None = None) -> str | None:
    """The chosen letter: a leading letter standing alone ("B", "B:", "(B)", "B."), else the one choice whose
    text the answer contains, else "answer is X", else a leading letter followed by a space (last, since a
    leading "A " may be an article)."""
    text = prediction.strip()
    m = re.match(r"\(?([A-E])\)?(?=$|[:.,)\]\n])", text)
    if m:
        return m.group(1)
    if choices:
        norm = normalize_answer(text)
        exact = [k for k, v in choices.items() if normalize_answer(v) and normalize_answer(v) == norm]
        if len(exact) == 1:
            return exact[0]
        inside = [k for k, v in choices.items() if normalize_answer(v) and normalize_answer(v) in norm]
        if len(inside) == 1:
            return inside[0]
    m = re.search(r"[Aa]nswer(?: choice)? is:?\s*\(?([A-E])\b", text)
    if m:
        return m.group(1)
    m = re.match(r"([A-E])\s", text)
    return m.group(1) if m else None
