"""Index searches of concurrent users, one by one against gathered into batches (`BatchedSearch`).

    python bench/search.py                  # writes bench/results/search-<device>-<date>.{json,md,png}
    python bench/search.py --smoke --out /tmp/x

C clients (threads) each search their share of Q queries, top-5, as the server's Self-RAG programs do: either
each calls the faiss retriever itself (faiss releases the GIL, so the searches run side by side), or all go
through one `BatchedSearch`, which hands the queries that queue up while a search runs to the encoder and the
index as one batch. The encoder then runs one forward over the batch, and faiss spreads the batch's queries over
its threads instead of many calls contending for them. (faiss 1.15 scans a flat index query by query below its
BLAS threshold, so a batched answer is bitwise the answer of a lone search; computing a batch's scores as one
matrix product would read the index once, but rounds differently with the batch size.) The passages' vectors
are random (the work of a search does not depend on them); the queries are encoded by the hashing encoder and,
when installed, MiniLM (all-MiniLM-L6-v2, 384 dimensions). Every batched answer is checked against the
one-by-one answer of the same query.

Metrics per encoder and concurrency: search_qps (unbatched and batched), search_p50_ms / search_p99_ms, and
search_batching_speedup_c<C> (batched qps / unbatched qps at C clients; headline at C=32).
"""
from __future__ import annotations

import random
import string
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from bench.common import bench_parser, parse_bench_args, pyplot, record, save_figure, write_results  # noqa: E402
from selfrag_engine.errors import RequestError  # noqa: E402
from selfrag_engine.retrieval.batched import BatchedSearch  # noqa: E402
from selfrag_engine.retrieval.encoders import HashingEncoder, get_encoder  # noqa: E402
from selfrag_engine.retrieval.passages import Passage  # noqa: E402

DIM = 384
K = 5


def _words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8))) for _ in range(n))


def build(num_passages: int, encoder, seed: int = 0):
    from selfrag_engine.retrieval.retriever import Retriever  # faiss: the `retrieval` extra

    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((num_passages, DIM), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    passages = [Passage(f"P{i}", f"passage {i}", str(i)) for i in range(num_passages)]
    return Retriever.from_embeddings(passages, None, emb, encoder, progress=False)


def run_clients(search, queries: list[str], clients: int) -> tuple[float, list[float], list]:
    """Wall seconds for `clients` threads to search all queries (query i by thread i % clients), each search's
    latency, and the answers in query order."""
    answers: list = [None] * len(queries)
    latencies: list[float] = [0.0] * len(queries)
    start_line = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        start_line.wait()
        for i in range(c, len(queries), clients):
            t = time.perf_counter()
            answers[i] = search(queries[i], K)
            latencies[i] = time.perf_counter() - t

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, c) for c in range(clients)]
        start_line.wait()
        t0 = time.perf_counter()
        for f in futures:
            f.result()
        wall = time.perf_counter() - t0
    return wall, latencies, answers


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "a small index and few queries (CI)", "cpu only: the faiss CPU index")
    parser.add_argument("--passages", type=int, default=None, help="index size (default 200000; smoke 2000)")
    parser.add_argument("--queries", type=int, default=None, help="queries per run (default 512; smoke 48)")
    args = parse_bench_args(parser, argv, default_device=lambda smoke: "cpu")
    if args.device != "cpu":
        parser.error("the searches run on faiss's CPU index; --device cpu only")
    num_passages = args.passages or (2000 if args.smoke else 200_000)
    num_queries = args.queries or (48 if args.smoke else 512)
    levels = [1, 8] if args.smoke else [1, 8, 32]
    encoders = [("hashing", HashingEncoder(DIM))]
    if not args.smoke:
        try:
            encoders.append(("minilm", get_encoder("minilm", device="cpu")))
        except (ImportError, RequestError) as e:
            print(f"MiniLM is not available ({e}); hashing encoder only", flush=True)
    import faiss

    threads = {"faiss_threads": faiss.omp_get_max_threads(), "torch_threads": torch.get_num_threads()}
    rng = random.Random(17)
    queries = [f"Where was {_words(rng, 2).title()} born in {rng.randint(1700, 1999)}?" for _ in range(num_queries)]
    results: list[dict] = []
    curves: dict[str, dict[str, list[float]]] = {}
    for name, encoder in encoders:
        retriever = build(num_passages, encoder)
        retriever.search(queries[0], K)  # warm: encoder weights, faiss threads
        expected = [retriever.search(q, K) for q in tqdm(queries, desc=f"{name}: reference answers",
                                                          disable=args.smoke)]
        common = {"encoder": encoder.name, "passages": num_passages, "dim": DIM, "k": K, "index": "Flat",
                  "queries": num_queries, **threads}
        curves[name] = {"plain": [], "batched": []}
        for clients in levels:
            qps = {}
            for way in ("plain", "batched"):
                batched = BatchedSearch(retriever) if way == "batched" else None
                search = batched.search if batched is not None else retriever.search
                wall, lat, answers = run_clients(search, queries, clients)
                if answers != expected:
                    raise SystemExit(f"{name}, {clients} clients, {way}: answers differ from one-by-one searches")
                qps[way] = num_queries / wall
                config = {**common, "clients": clients, "way": way}
                if batched is not None:
                    config["mean_batch"] = round(batched.stats.queries / batched.stats.batches, 2)
                    batched.close()
                record(results, "search_qps", qps[way], "queries/s", **config)
                record(results, "search_p50_ms", float(np.percentile(lat, 50) * 1e3), "ms", **config)
                record(results, "search_p99_ms", float(np.percentile(lat, 99) * 1e3), "ms", **config)
                curves[name][way].append(qps[way])
            record(results, f"search_batching_speedup_c{clients}", qps["batched"] / qps["plain"], "x",
                   **common, clients=clients)

    def plot(png: Path) -> None:
        plt = pyplot()
        fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 3.6), squeeze=False)
        for ax, (name, ways) in zip(axes[0], curves.items()):
            for way, values in ways.items():
                ax.plot(levels, values, marker="o", label="BatchedSearch" if way == "batched" else "one by one")
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels, [str(c) for c in levels])
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel("searches / s")
            ax.set_ylim(bottom=0)  # the two ways are compared by height: the axis starts at 0
            model = "all-MiniLM-L6-v2" if name == "minilm" else f"hashing (no model), {DIM} dims"
            ax.set_title(f"query encoder: {model}\nflat index of {num_passages:,} x {DIM}", fontsize=10)
            ax.legend()
        fig.suptitle(f"Index searches (top-{K}), device cpu\n{threads['faiss_threads']} faiss threads, "
                     f"{threads['torch_threads']} torch threads", fontsize=11)
        save_figure(fig, png)

    write_results("search", "cpu", results, out_dir=args.out, plot=plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
