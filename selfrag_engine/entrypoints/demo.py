"""`make demo`: Self-RAG end to end on the embedded tiny model.

Indexes the tiny model's corpus (its synthetic encyclopedia) with faiss and the default encoder, then asks
held-out questions about the world (the model should retrieve and pick the relevant passage) and
instructions that need no facts (it should answer without retrieving). Each answer is printed with the
retrieval decision and the table of branch critiques, as `selfrag-engine ask` prints them.
"""
from __future__ import annotations

import argparse
import time

from selfrag_engine.engine.llm_engine import Engine
from selfrag_engine.entrypoints.ask import format_answer
from selfrag_engine.entrypoints.model_args import add_device_argument
from selfrag_engine.hub import resolve_model
from selfrag_engine.retrieval.encoders import get_encoder
from selfrag_engine.retrieval.retriever import Retriever
from selfrag_engine.selfrag.short_form import SelfRAG
from selfrag_engine.tiny.assets import default_model_dir, read_corpus, read_examples
from selfrag_engine.weights.checkpoint import check_checkpoint_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="checkpoint directory (or model id) with corpus.jsonl and examples.json beside the "
                             "checkpoint (default: the embedded one, 'tiny')")
    parser.add_argument("--encoder", default="minilm", help="retrieval encoder spec (minilm, hashing:DIM)")
    parser.add_argument("--questions", type=int, default=4, help="world questions to ask")
    parser.add_argument("--instructions", type=int, default=2, help="no-fact instructions to ask")
    parser.add_argument("--ndocs", type=int, default=5)
    add_device_argument(parser)
    return parser


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
    print("=" * 100)


if __name__ == "__main__":
    main()
