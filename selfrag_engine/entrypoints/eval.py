"""`selfrag-engine eval`: answer a Self-RAG task's eval file with the task's preset and report its metrics (the
evaluation itself is `selfrag_engine.selfrag.evaluate`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from selfrag_engine.entrypoints.model_args import add_model_arguments, load_engine, resolve_model_arg
from selfrag_engine.errors import RequestError
from selfrag_engine.retrieval.sharded_index import load_retriever
from selfrag_engine.selfrag.decisions import MODES
from selfrag_engine.selfrag.evaluate import (
    build_runner,
    evaluate,
    format_table,
    metrics_path,
    write_metrics,
    write_predictions,
)
from selfrag_engine.selfrag.scoring import COMPATS
from selfrag_engine.selfrag.tasks import (
    MODE_ALIASES,
    PRESETS,
    get_preset,
    read_examples,
)


def _run(args: argparse.Namespace) -> int:
    preset = get_preset(args.task)
    for name in ("batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise RequestError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    resolve_model_arg(args)
    examples = read_examples(args.input, preset, args.limit)
    retriever = load_retriever(args.index, device=args.device) if args.index else None
    engine = load_engine(args)
    runner = build_runner(engine, preset, ndocs=args.ndocs, mode=args.mode, threshold=args.threshold,
                          max_new_tokens=args.max_new_tokens, compat=args.compat, beam_width=args.beam_width,
                          max_depth=args.max_depth, retriever=retriever if preset.form == "long" else None)

    def progress(done: int, total: int) -> None:
        if not args.quiet:
            print(f"{done}/{total} answered", file=sys.stderr, flush=True)

    report = evaluate(runner, examples, preset, args.batch_size, retriever=retriever, progress=progress)
    output = Path(args.output) if args.output else Path(f"{Path(args.input).stem}.{preset.name}.preds.jsonl")
    write_predictions(report, output)
    metrics_file = write_metrics(report, metrics_path(output), input=str(args.input), model=str(args.model),
                                 predictions=str(output), device=str(engine.device))
    print(format_table(report))
    print(f"predictions: {output}\nmetrics: {metrics_file}")
    return 0


def register(subparsers: Any) -> None:
    """Adds `eval` to the `selfrag-engine` command line."""
    e = subparsers.add_parser("eval", help="answer a Self-RAG task's eval file and report its metrics")
    e.add_argument("--task", required=True, choices=list(PRESETS))
    e.add_argument("--input", required=True, help="the task's eval file (JSONL, or JSON list), with 'ctxs'")
    add_model_arguments(e)
    e.add_argument("--output", default=None, help="predictions JSONL (default: <input stem>.<task>.preds.jsonl); "
                                                  "the metrics go to <output stem>.metrics.json")
    e.add_argument("--limit", type=int, default=None, help="only the first N rows")
    e.add_argument("--batch-size", type=int, default=8, help="questions answered together")
    e.add_argument("--ndocs", type=int, default=None, help="passages per question (default: the task's)")
    e.add_argument("--mode", default=None, choices=list(MODES) + list(MODE_ALIASES))
    e.add_argument("--threshold", type=float, default=None, help="retrieval threshold (default: the task's)")
    e.add_argument("--max-new-tokens", type=int, default=None)
    e.add_argument("--beam-width", type=int, default=None, help="long form only")
    e.add_argument("--max-depth", type=int, default=None, help="long form only")
    e.add_argument("--compat", default="paper", choices=list(COMPATS),
                   help="paper: the paper's rules; released: the reference scripts' behaviour")
    e.add_argument("--index", default=None, help="retrieve from this index instead of the rows' passages")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_run)
