"""`make demo`: Self-RAG end to end on the embedded tiny model.

Indexes the tiny model's corpus (its synthetic encyclopedia) with faiss and the default encoder, then asks
held-out questions about the world (the model should retrieve and pick the relevant passage) and
instructions that need no facts (it should answer without retrieving). Each answer is printed with the
retrieval decision and the table of branch critiques, as `selfrag-engine ask` prints them. Then a long-form
request about a held-out entity ("Write a short biography of X."), answered by `LongFormSelfRAG` in the paper
flavour over the passages the index returns for it: the answer, each segment with the passage it cites and
its critique, and which retrieved passages the answer cites.
"""
from __future__ import annotations

import argparse
import time

from selfrag_engine.engine.llm_engine import Engine
from selfrag_engine.entrypoints.ask import format_answer
from selfrag_engine.entrypoints.index import snippet
from selfrag_engine.entrypoints.model_args import add_device_argument
from selfrag_engine.hub import resolve_model
from selfrag_engine.retrieval.encoders import get_encoder
from selfrag_engine.retrieval.passages import Passage
from selfrag_engine.retrieval.retriever import Retriever
from selfrag_engine.selfrag.long_form import LongAnswer, LongFormSelfRAG
from selfrag_engine.selfrag.short_form import SelfRAG
from selfrag_engine.tiny.assets import default_model_dir, read_corpus, read_examples
from selfrag_engine.tiny.evaluate import LONG_FORM_BEAM, LONG_FORM_MAX_DEPTH, world_and_split
from selfrag_engine.tiny.long_form_data import demo_requests
from selfrag_engine.weights.checkpoint import check_checkpoint_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="checkpoint directory (or model id) with corpus.jsonl and examples.json beside the "
                             "checkpoint (default: the embedded one, 'tiny')")
    parser.add_argument("--encoder", default="minilm", help="retrieval encoder spec (minilm, hashing:DIM)")
    parser.add_argument("--questions", type=int, default=4, help="world questions to ask")
    parser.add_argument("--instructions", type=int, default=2, help="no-fact instructions to ask")
    parser.add_argument("--long-form", type=int, default=1, help="long-form requests to ask")
    parser.add_argument("--ndocs", type=int, default=5)
    add_device_argument(parser)
    return parser


def _number(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _cites(p: Passage | None) -> str:
    return "(none)" if p is None else f"[{p.id}] {p.title}"


def format_long_answer(ans: LongAnswer, passages: list[Passage]) -> str:
    """The answer, its score, a table of its segments that hold text (each with the passage it cites and its
    critique), and the passages it was given, each marked with the segments citing it."""
    segments = [seg for seg in ans.segments if seg.text.strip()]
    lines = [f"Answer: {ans.answer}",
             f"Score: {_number(ans.score)}; written from passages: {'yes' if ans.retrieved else 'no'}", ""]
    lines.append(f"   {'#':>2}  {'cites':<28}  {'relevance':>9}  {'grounding':>9}  {'score':>7}  text")
    for i, seg in enumerate(segments, 1):
        lines.append(f"   {i:>2}  {snippet(_cites(seg.passage), 28):<28}  {_number(seg.relevance):>9}  "
                     f"{_number(seg.grounding):>9}  {_number(seg.score):>7}  {seg.text.strip()}")
    lines += ["", "Passages given:"]
    for p in passages:
        citing = [str(i) for i, seg in enumerate(segments, 1) if seg.passage is not None and seg.passage.id == p.id]
        mark = f"cited by segment {', '.join(citing)}" if citing else "not cited"
        lines.append(f"   {snippet(_cites(p), 28):<28}  {mark:<20}  {snippet(p.text, 60)}")
    lines.append("")
    lines.append(f"{ans.num_generated_tokens} tokens generated in {ans.seconds:.2f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    model_dir = check_checkpoint_dir(resolve_model(args.model)) if args.model else default_model_dir()
    passages = read_corpus(model_dir)
    examples = read_examples(model_dir)
    t0 = time.perf_counter()
    print(f"Loading the {args.encoder} encoder ...", flush=True)
    encoder = get_encoder(args.encoder, device=args.device)
    print(f"Indexing {len(passages)} passages of {model_dir / 'corpus.jsonl'} with {args.encoder} ...", flush=True)
    retriever = Retriever.build(passages, encoder, progress=True)
    print(f"Indexed {len(retriever)} passages in {time.perf_counter() - t0:.1f} s", flush=True)
    engine = Engine.from_pretrained(model_dir, device=args.device, progress=False)
    print(f"Loaded {model_dir.name}: {engine.config.num_hidden_layers} layers, hidden {engine.config.hidden_size}, "
          f"vocabulary {engine.config.vocab_size}\n")
    rag = SelfRAG(engine, retriever=retriever, ndocs=args.ndocs, max_new_tokens=48, mode="adaptive")

    asks = [(q["question"], q["gold"]) for q in examples["questions"][:args.questions]]
    asks += [(q["instruction"], q["answer"]) for q in examples["instructions"][:args.instructions]]
    for question, expected in asks:
        print("=" * 100)
        print(f"Question: {question}   (expected: {expected})")
        print(format_answer(rag.answer(question), "adaptive", rag.scoring.threshold))

    # examples.json of a checkpoint trained before the long-form data lists no long-form requests: the same
    # requests are drawn from the world, as training draws them.
    requests = examples.get("long_form") or demo_requests(*world_and_split())
    long_rag = LongFormSelfRAG(engine, ndocs=args.ndocs, max_new_tokens=100, beam_width=LONG_FORM_BEAM,
                               max_depth=LONG_FORM_MAX_DEPTH, mode="adaptive", compat="paper")
    for request in requests[:args.long_form]:
        print("=" * 100)
        facts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in request["facts"].items())
        print(f"Long-form request: {request['instruction']}   (expected facts: {facts})")
        print(f"(paper flavour, beam {LONG_FORM_BEAM}, max depth {LONG_FORM_MAX_DEPTH}, over the "
              f"{args.ndocs} passages the index returns)")
        passages = retriever.search(request["instruction"], args.ndocs)
        print(format_long_answer(long_rag.answer(request["instruction"], passages), passages))
    print("=" * 100)


if __name__ == "__main__":
    main()
