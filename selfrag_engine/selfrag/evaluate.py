"""Evaluation of Self-RAG on the paper's tasks: metrics, the batch runner and the predictions files (the
`selfrag-engine eval` command is `selfrag_engine.entrypoints.eval`).

Metrics follow the reference scripts: `match` is 1 when any gold string occurs in the prediction (case and
spacing as written, as the reference compares them); `accuracy` compares the normalized closed-set answer
(true / false for PubHealth, the chosen letter for ARC) with the gold; `str_em` is ALCE's string exact match
for ASQA (the fraction of disambiguated questions one of whose short answers occurs in the normalized
prediction). Every value lies in [0, 1]; a report averages them over the rows that have them.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from selfrag_engine.engine.client import EngineClient
from selfrag_engine.errors import RequestError
from selfrag_engine.selfrag.long_form import LongFormSelfRAG
from selfrag_engine.selfrag.options import QueryOptions, long_form_trace, short_form_trace
from selfrag_engine.selfrag.scoring import COMPATS
from selfrag_engine.selfrag.short_form import SelfRAG
from selfrag_engine.selfrag.tasks import (
    PASSAGE_FIELDS,
    DatasetError,
    Example,
    Preset,
    arc_letter,
    normalize_answer,
    normalize_mode,
    postprocess_prediction,
    pubhealth_gold,
    pubhealth_label,
)

# ---- metrics ----------------------------------------------------------------------------------------


def match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when any gold string is contained in the prediction (the reference's `match`)."""
    return 1.0 if any(g in prediction for g in golds) else 0.0


def reference_match(prediction: str, golds: Sequence[str]) -> float:
    """`match` after the reference script's FEVER relabelling (SUPPORTS -> true, REFUTES -> false)."""
    if "SUPPORTS" in prediction:
        prediction = "true"
    elif "REFUTES" in prediction:
        prediction = "false"
    return match(prediction, golds)


def pubhealth_accuracy(prediction: str, golds: Sequence[str]) -> float:
    label = pubhealth_label(prediction)
    return 1.0 if label is not None and label == pubhealth_gold(golds[0]) else 0.0


def arc_accuracy(prediction: str, gold: str, choices: dict[str, str] | None = None) -> float:
    return 1.0 if arc_letter(prediction, choices) == gold else 0.0


def str_em(prediction: str, qa_pairs: Sequence[Sequence[str]]) -> float:
    """Fraction of qa pairs with a short answer contained in the prediction, both normalized (ALCE)."""
    if not qa_pairs:
        raise ValueError("str_em needs at least one qa pair")
    norm = normalize_answer(prediction)
    hits = [any(normalize_answer(a) and normalize_answer(a) in norm for a in answers) for answers in qa_pairs]
    return sum(hits) / len(hits)


def row_metrics(preset: Preset, ex: Example, prediction: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in preset.metrics:
        if name == "match":
            out[name] = reference_match(prediction, ex.golds)
        elif name == "accuracy" and preset.name == "pubhealth":
            out[name] = pubhealth_accuracy(prediction, ex.golds)
        elif name == "accuracy" and preset.name == "arc_challenge":
            out[name] = arc_accuracy(prediction, ex.golds[0], ex.choices)
        elif name == "str_em":
            if ex.qa_pairs:
                out[name] = str_em(prediction, ex.qa_pairs)
        else:
            raise ValueError(f"no metric {name!r} for task {preset.name!r}")
    return out


# ---- running ----------------------------------------------------------------------------------------


@dataclass
class Report:
    task: str
    num_examples: int
    metrics: dict[str, float]            # mean over the rows that have each metric
    primary_metric: str | None
    retrieval_frequency: float           # fraction of rows whose answer used passages
    num_generated_tokens: int | None     # None when the runner does not count them
    seconds: float                       # wall time of the runner's batches (retrieval included)
    tokens_per_second: float | None
    questions_per_second: float
    settings: dict[str, Any]
    records: list[dict[str, Any]]

    def summary(self) -> dict[str, Any]:
        """Everything but the per-row records."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "records"}


def _row_passages(ex: Example, ndocs: int, retriever: Any, needed: bool) -> list | None:
    if retriever is not None:
        return list(retriever.search(ex.question, ndocs))
    if ex.passages is None:
        if needed:
            raise DatasetError(f"line {ex.line}: the row has no passages (expected one of the fields "
                               f"{', '.join(map(repr, PASSAGE_FIELDS))}) and no retriever was given (--index)")
        return None
    return ex.passages[:ndocs]


def evaluate(runner: Any, examples: Sequence[Example], preset: Preset, batch_size: int = 8, *,
             retriever: Any = None, progress: Callable[[int, int], None] | None = None) -> Report:
    """Answers every example with `runner` (a `SelfRAG` for short-form presets, a `LongFormSelfRAG` for long
    form), batch_size questions per call, and scores the answers. Passages come from the rows (their first
    ndocs, in file order) or, when given, from `retriever.search(question, ndocs)`."""
    if batch_size < 1:
        raise RequestError(f"batch size must be at least 1, got {batch_size}")
    ndocs = getattr(runner, "ndocs", preset.ndocs)
    mode = getattr(runner, "mode", preset.mode)
    records: list[dict[str, Any]] = []
    tokens: int | None = 0
    seconds = 0.0
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        t0 = time.perf_counter()
        passages = [_row_passages(ex, ndocs, retriever, needed=mode != "never") for ex in batch]
        instructions = [ex.instruction for ex in batch]
        if preset.form == "short":
            answers = runner.answer_batch(instructions, passages, closed_set=preset.closed_set)
        else:
            answers = runner.answer_batch(instructions, passages)
        seconds += time.perf_counter() - t0
        for ex, docs, ans in zip(batch, passages, answers):
            count = getattr(ans, "num_generated_tokens", None)
            tokens = None if tokens is None or count is None else tokens + count
            prediction = postprocess_prediction(preset, ans.answer)
            record = {"index": ex.index, "id": ex.id, "question": ex.question, "instruction": ex.instruction,
                      "prediction": prediction, "gold": ex.golds,
                      "metrics": row_metrics(preset, ex, prediction), "retrieved": bool(ans.retrieved),
                      "passages": None if docs is None else [{"title": d.title, "id": d.id} for d in docs],
                      "trace": short_form_trace(ans) if preset.form == "short" else long_form_trace(ans)}
            if ex.qa_pairs is not None:
                record["qa_pairs"] = ex.qa_pairs
            record.update(ex.extra)
            records.append(record)
        if progress is not None:
            progress(len(records), len(examples))
    n = len(records)
    metrics = {}
    for name in preset.metrics:
        values = [r["metrics"][name] for r in records if name in r["metrics"]]
        if values:
            metrics[name] = sum(values) / len(values)
    settings = {"ndocs": ndocs, "mode": mode, "threshold": getattr(getattr(runner, "scoring", None), "threshold",
                                                                     preset.threshold),
                "max_new_tokens": getattr(runner, "max_new_tokens", preset.max_new_tokens),
                "closed_set": preset.closed_set, "batch_size": batch_size,
                "compat": getattr(runner, "compat", "paper")}
    if preset.form == "long":
        settings.update(beam_width=getattr(runner, "beam_width", preset.beam_width),
                        max_depth=getattr(runner, "max_depth", preset.max_depth))
    return Report(
        task=preset.name, num_examples=n, metrics=metrics, primary_metric=preset.primary_metric,
        retrieval_frequency=sum(r["retrieved"] for r in records) / n if n else 0.0,
        num_generated_tokens=tokens, seconds=seconds,
        tokens_per_second=tokens / seconds if tokens is not None and seconds > 0 else None,
        questions_per_second=n / seconds if seconds > 0 else 0.0, settings=settings, records=records)


# ---- files ------------------------------------------------------------------------------------------


def metrics_path(predictions: str | Path) -> Path:
    """preds.jsonl -> preds.metrics.json, next to it."""
    p = Path(predictions)
    stem = p.name[:-len(".jsonl")] if p.name.endswith(".jsonl") else p.name
    return p.with_name(stem + ".metrics.json")


def write_predictions(report: Report, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in report.records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def write_metrics(report: Report, path: str | Path, **context: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**context, **report.summary()}, indent=2, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    return path


def format_table(report: Report) -> str:
    rows = [("task", f"{report.task} ({report.num_examples} examples)")]
    for name, value in report.metrics.items():
        rows.append((name + (" *" if name == report.primary_metric else ""), f"{100 * value:.1f}"))
    rows.append(("retrieval", f"{100 * report.retrieval_frequency:.1f}%"))
    if report.tokens_per_second is not None:
        rows.append(("tokens/s", f"{report.tokens_per_second:.1f}"))
    rows.append(("questions/s", f"{report.questions_per_second:.2f}"))
    rows.append(("seconds", f"{report.seconds:.1f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# ---- building the runner ----------------------------------------------------------------------------


def options_for(preset: Preset, *, ndocs: int | None = None, mode: str | None = None,
                threshold: float | None = None, max_new_tokens: int | None = None, compat: str = "paper",
                beam_width: int | None = None, max_depth: int | None = None) -> QueryOptions:
    """The preset's settings, overridable, as the query options every entry point takes. The README commands
    all add the sequence score (the released long form ignores it); the released short-form script uses its
    --w_use default (1.0)."""
    if compat not in COMPATS:
        raise RequestError(f"compat must be one of {COMPATS}, got {compat!r}")
    for name, value in (("ndocs", ndocs), ("max_new_tokens", max_new_tokens), ("beam_width", beam_width),
                        ("max_depth", max_depth)):
        if value is not None and value < 1:
            raise RequestError(f"{name} must be at least 1, got {value}")
    weights = {"w_use": preset.w_use_released} if compat == "released" and preset.form == "short" else {}
    long = {"beam_width": beam_width or preset.beam_width, "max_depth": max_depth or preset.max_depth} \
        if preset.form == "long" else {}
    return QueryOptions(form=preset.form, mode=normalize_mode(mode or preset.mode), ndocs=ndocs or preset.ndocs,
                        compat=compat, threshold=preset.threshold if threshold is None else threshold,
                        use_seqscore=preset.use_seqscore, max_new_tokens=max_new_tokens or preset.max_new_tokens,
                        **weights, **long)


def build_runner(engine: EngineClient, preset: Preset, *, ndocs: int | None = None, mode: str | None = None,
                 threshold: float | None = None, max_new_tokens: int | None = None, compat: str = "paper",
                 beam_width: int | None = None, max_depth: int | None = None,
                 retriever: Any = None) -> SelfRAG | LongFormSelfRAG:
    """A SelfRAG (short form) or LongFormSelfRAG (long form) with the preset's settings, overridable."""
    options = options_for(preset, ndocs=ndocs, mode=mode, threshold=threshold, max_new_tokens=max_new_tokens,
                          compat=compat, beam_width=beam_width, max_depth=max_depth)
    return options.runner(engine, retriever)
