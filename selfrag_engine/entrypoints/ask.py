"""`selfrag-engine ask`: answer one question with short-form Self-RAG, retrieving from an index or reading
the caller's passages, and show why: the retrieval decision and every branch's critique."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from selfrag_engine.entrypoints.index import snippet
from selfrag_engine.entrypoints.model_args import add_model_arguments, load_engine, resolve_model_arg
from selfrag_engine.errors import RequestError
from selfrag_engine.retrieval.passages import read_passages
from selfrag_engine.retrieval.sharded_index import load_retriever, read_index_meta
from selfrag_engine.selfrag.decisions import MODES
from selfrag_engine.selfrag.options import QueryOptions, short_form_trace
from selfrag_engine.selfrag.scoring import COMPATS
from selfrag_engine.selfrag.short_form import Answer


def format_answer(ans: Answer, mode: str, threshold: float | None) -> str:
    """The answer, the retrieval decision and a table of the branches (`*` marks the chosen one)."""
    lines = [f"Answer: {ans.answer}"]
    p = ans.retrieval_probability
    if mode != "adaptive":
        lines.append(f"Retrieval: {'yes' if ans.retrieved else 'no'} (forced by --mode {mode})")
    elif p is None:
        lines.append(f"Retrieval: {'yes' if ans.retrieved else 'no'} (the model's first token)")
    else:
        sign = ">" if ans.retrieved else "<="
        lines.append(f"Retrieval: {'yes' if ans.retrieved else 'no'} (p = {p:.4f} {sign} threshold {threshold})")
    if ans.draft is not None:
        lines.append(f"Draft without retrieval: {ans.draft}")
    if ans.branches:
        lines.append("")
        header = f"   {'#':>2}  {'passage':<24}  {'relevance':>9}  {'grounding':>9}  {'utility':>7}  {'final':>7}  text"
        lines.append(header)
        for i, b in enumerate(ans.branches):
            mark = "*" if i == ans.best else " "
            lines.append(f" {mark} {i:>2}  {snippet(b.passage.title or '(untitled)', 24):<24}  {b.relevance:9.4f}  "
                         f"{b.grounding:9.4f}  {b.utility:7.4f}  {b.final:7.4f}  {snippet(b.text, 60)}")
    lines.append("")
    lines.append(f"{ans.num_generated_tokens} tokens generated in {ans.seconds:.2f} s")
    return "\n".join(lines)


def answer_trace(ans: Answer, mode: str, threshold: float | None) -> dict[str, Any]:
    """Everything `--json` prints: the short-form trace plus the question, decision and passages."""
    trace = short_form_trace(ans)
    for i, (entry, branch) in enumerate(zip(trace["branches"], ans.branches)):
        entry["passage_text"] = branch.passage.text
        entry["chosen"] = i == ans.best
    return {"question": ans.question, "mode": mode, "threshold": threshold, "retrieved": ans.retrieved,
            **trace, "draft": ans.draft, "seconds": ans.seconds}


def _ask(args: argparse.Namespace) -> int:
    question = args.question
    if not question.strip():
        raise RequestError("the question is empty")
    for name in ("ndocs", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise RequestError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.index is None and args.passages is None and args.mode != "never":
        raise RequestError(f"--mode {args.mode} needs passages: give --index DIR or --passages FILE")
    # Cheap checks first: a bad model name, index or passages file fails before anything loads.
    resolve_model_arg(args)
    if args.index is not None:
        read_index_meta(args.index)
    retriever, passages = None, None
    if args.index is not None:
        retriever = load_retriever(args.index, encoder=args.encoder, device=args.encoder_device or args.device)
    elif args.passages is not None:
        passages = read_passages(args.passages)[:args.ndocs]

    options = QueryOptions(form="short", mode=args.mode, ndocs=args.ndocs, compat=args.compat,
                           threshold=args.threshold, use_seqscore=args.use_seqscore,
                           max_new_tokens=args.max_new_tokens)
    ans = options.runner(load_engine(args), retriever).answer(question, passages)
    if args.json:
        print(json.dumps(answer_trace(ans, args.mode, args.threshold), ensure_ascii=False))
    else:
        print(format_answer(ans, args.mode, args.threshold))
    sys.stdout.flush()
    return 0


def register(subparsers: Any) -> None:
    """Adds `ask` to the `selfrag-engine` command line."""
    a = subparsers.add_parser("ask", help="answer a question with Self-RAG and show its branches")
    a.add_argument("question")
    add_model_arguments(a)
    source = a.add_mutually_exclusive_group()
    source.add_argument("--index", default=None, help="retrieve from this directory (`selfrag-engine index build`)")
    source.add_argument("--passages", default=None,
                        help="use these passages as given (the first --ndocs; .tsv, .jsonl or .json), no index")
    a.add_argument("--mode", default="adaptive", choices=list(MODES))
    a.add_argument("--ndocs", type=int, default=5, help="passages (branches) per question")
    a.add_argument("--threshold", type=float, default=0.2, help="retrieve when p(retrieve) exceeds it (adaptive)")
    a.add_argument("--max-new-tokens", type=int, default=100)
    a.add_argument("--use-seqscore", action="store_true", help="add exp(mean token log-probability) to the score")
    a.add_argument("--compat", default="paper", choices=list(COMPATS),
                   help="paper: the paper's rules; released: the reference script's behaviour")
    a.add_argument("--encoder", default=None, help="query encoder spec (default: the index's own)")
    a.add_argument("--encoder-device", default=None, help="query encoder device (default: --device's)")
    a.add_argument("--json", action="store_true", help="print the full trace as one JSON object")
    a.add_argument("--quiet", action="store_true")
    a.set_defaults(func=_ask)
