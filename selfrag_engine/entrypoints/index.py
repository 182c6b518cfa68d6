"""`selfrag-engine index build | search`: make a retriever directory from a corpus file, and query it."""
from __future__ import annotations

import argparse
import json
from typing import Any

from selfrag_engine.entrypoints.model_args import add_device_argument
from selfrag_engine.errors import RequestError
from selfrag_engine.retrieval.encoders import get_encoder
from selfrag_engine.retrieval.passages import read_passages
from selfrag_engine.retrieval.retriever import DEFAULT_TRAIN_SIZE, Retriever
from selfrag_engine.retrieval.sharded_index import ShardedRetriever, build_sharded, load_retriever

NO_ENCODER = "none"


def snippet(text: str, width: int) -> str:
    """One line of at most `width` characters (newlines shown as spaces, an ellipsis where cut)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:max(width - 1, 0)] + "…"


def _check_nprobe(nprobe: int | None) -> None:
    if nprobe is not None and nprobe < 1:
        raise RequestError(f"--nprobe must be at least 1, got {nprobe}")


def _apply_nprobe(retriever: Retriever | ShardedRetriever, nprobe: int | None) -> None:
    _check_nprobe(nprobe)
    if nprobe is None:
        return
    for shard in retriever.shards if isinstance(retriever, ShardedRetriever) else [retriever]:
        if isinstance(shard, Retriever):  # a missing shard fails the search itself, naming it
            shard.set_search_parameter("nprobe", nprobe)


def _build(args: argparse.Namespace) -> int:
    if args.encoder == NO_ENCODER and not args.embeddings:
        raise RequestError(f"--encoder {NO_ENCODER} needs --embeddings: without an encoder nothing can embed "
                           "the passages")
    passages = read_passages(args.passages)
    encoder = None if args.encoder == NO_ENCODER else get_encoder(args.encoder, device=args.device)
    progress = not args.quiet
    train_size = args.train_size or DEFAULT_TRAIN_SIZE
    if args.shards is not None:
        _check_nprobe(args.nprobe)
        build_sharded(args.out, passages, args.shards, encoder, args.factory, contriever_shards=args.embeddings,
                      progress=progress, batch_size=args.batch_size, train_size=train_size,
                      search_parameters=None if args.nprobe is None else {"nprobe": args.nprobe})
        meta = ShardedRetriever.read_manifest(args.out)
        print(f"indexed {meta['count']} passages ({meta['dim']} dimensions, faiss {args.factory!r}, encoder "
              f"{args.encoder!r}) into {args.shards} shards in {args.out}")
        return 0
    if args.embeddings:
        retriever = Retriever.from_contriever_shards(passages, args.embeddings, encoder, args.factory, progress,
                                                     train_size, gpu=False)
    else:
        retriever = Retriever.build(passages, encoder, args.factory, progress, args.batch_size, train_size,
                                    gpu=False)
    _apply_nprobe(retriever, args.nprobe)
    retriever.save(args.out)
    print(f"indexed {len(retriever)} passages ({retriever.dim} dimensions, faiss {args.factory!r}, encoder "
          f"{args.encoder!r}) into {args.out}")
    return 0


def _search(args: argparse.Namespace) -> int:
    retriever = load_retriever(args.index, encoder=args.encoder, device=args.device)
    _apply_nprobe(retriever, args.nprobe)
    results = retriever.search_batch_with_scores(args.queries, args.k)
    for query, hits in zip(args.queries, results):
        if args.json:
            print(json.dumps({"query": query, "hits": [
                {"rank": r, "score": h.score, "id": h.passage.id, "title": h.passage.title, "text": h.passage.text}
                for r, h in enumerate(hits, start=1)]}, ensure_ascii=False))
            continue
        print(f"query: {query}")
        print(f"{'rank':>4}  {'score':>8}  {'id':<10}  {'title':<28}  text")
        for r, h in enumerate(hits, start=1):
            print(f"{r:>4}  {h.score:8.4f}  {snippet(str(h.passage.id), 10):<10}  {snippet(h.passage.title, 28):<28}  "
                  f"{snippet(h.passage.text, 70)}")
    return 0


def register(subparsers: Any) -> None:
    """Adds `index build` and `index search` to the `selfrag-engine` command line."""
    index = subparsers.add_parser("index", help="build or search a passage retriever (faiss)")
    sub = index.add_subparsers(dest="index_command", required=True)

    b = sub.add_parser("build", help="index a passages file (DPR .tsv, .jsonl or .json) into a directory")
    b.add_argument("--passages", required=True, help="corpus: .tsv (id, text, title), .jsonl or .json")
    b.add_argument("--out", required=True, help="directory to write the retriever to")
    b.add_argument("--encoder", default="minilm",
                   help="minilm (default) | hashing:DIM | contriever:PATH; 'none' with --embeddings keeps no "
                        "query encoder (give one when searching)")
    b.add_argument("--factory", default="Flat",
                   help="faiss index_factory string: Flat (exact), IVF4096,Flat, IVF4096,PQ64, HNSW32, ...")
    b.add_argument("--embeddings", default=None,
                   help="precomputed Contriever embedding shards (glob, e.g. 'wikipedia_embeddings/passages_*'); "
                        "the passages are then not encoded")
    b.add_argument("--batch-size", type=int, default=64, help="passages encoded per batch")
    b.add_argument("--train-size", type=int, default=None, help="vectors used to train IVF/PQ indexes")
    b.add_argument("--nprobe", type=int, default=None, help="IVF lists searched per query (saved with the index)")
    b.add_argument("--shards", type=int, default=None,
                   help="split the index into N shards (each 1/N of the vectors, trained once) to serve on N "
                        "retrieval replicas; a search fans out and merges the exact top-k")
    add_device_argument(b, "the encoder")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=_build)

    s = sub.add_parser("search", help="print the top-k passages for queries")
    s.add_argument("queries", nargs="+", help="query text (each one searched)")
    s.add_argument("--index", required=True, help="a directory written by `index build` (sharded or not)")
    s.add_argument("-k", type=int, default=5, help="passages per query")
    s.add_argument("--encoder", default=None, help="query encoder spec (default: the index's own)")
    s.add_argument("--nprobe", type=int, default=None)
    add_device_argument(s, "the query encoder")
    s.add_argument("--json", action="store_true", help="one JSON object per query")
    s.set_defaults(func=_search)
