"""Past one process: Self-RAG queries/s with 1 and 2 engine replicas on Ray Serve, and a sharded index's
search against the unsharded one.

    python bench/scale.py                   # writes bench/results/scale-cpu-<date>.{json,md,png}
    python bench/scale.py --smoke --out /tmp/x

Replicas: a local Ray cluster serves the embedded tiny model (`selfrag-engine serve --replicas`'s
application); each engine replica is pinned to its own core (`ReplicaConfig.cpu_affinity`, one torch thread)
and the clients run in another process (C threads posting `/v1/selfrag` short-form queries with two given
passages each, `mode: always`). The same Q queries are timed with 1 replica, then with 2 (the deployment
scaled in place). `serve_replicas_scaling_2` = qps(2) / qps(1) (target >= 1.6); every answer with 2 replicas
is checked equal to the one with 1.

Shards: a synthetic flat index of N random unit vectors (1M by default, 128 dimensions) searched one query at
a time, unsharded on one core against 2 shards searched side by side on two cores, as two retrieval
replicas would (`ShardedRetriever`'s fan-out; faiss releases the GIL; one OpenMP thread per search).
`search_sharded_speedup_2` = qps(2 shards) / qps(unsharded); every merged top-k is checked against the
unsharded top-k (same scores at every place, same rows but where ties straddle the k-th place).

The replicas' ratio needs cores beyond the replicas' own: Ray's HTTP proxy and the client process run
beside them, and a tiny model's query costs less than its HTTP round trip. On a 2-core machine the second
replica takes the core the proxy and the clients used; record on a quiet machine with at least 4 cores.
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import bench_parser, parse_bench_args, pyplot, record, save_figure, write_results  # noqa: E402

K = 5


# ---- replicas ---------------------------------------------------------------------------------------------


def _questions(n: int) -> list[dict]:
    from selfrag_engine.tiny.assets import default_model_dir, read_corpus
    import json

    corpus = read_corpus()
    examples = json.loads((default_model_dir() / "examples.json").read_text())["questions"]
    bodies = []
    for i in range(n):
        q = examples[i % len(examples)]["question"]
        docs = [corpus[(7 * i + j) % len(corpus)] for j in range(2)]
        bodies.append({"question": q, "mode": "always", "ndocs": 2, "max_tokens": 24,
                       "passages": [{"title": p.title, "text": p.text} for p in docs]})
    return bodies


def _client_process(base: str, bodies: list[dict], clients: int, out) -> None:
    import httpx

    def one(body: dict) -> str:
        r = httpx.post(f"{base}/v1/selfrag", json=body, timeout=600)
        r.raise_for_status()
        return r.json()["answer"]

    try:
        # One warm query per client thread before the clock, so both runs start warm.
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, bodies[:clients]))
            start = time.perf_counter()
            answers = list(pool.map(one, bodies))
            out.put((time.perf_counter() - start, answers))
    except Exception as e:  # noqa: BLE001 - the bench stops with the clients' error, not a wait
        detail = e.response.text if isinstance(e, httpx.HTTPStatusError) else ""
        out.put((None, f"{type(e).__name__}: {e} {detail}"))


def _measure(base: str, bodies: list[dict], clients: int) -> tuple[float, list[str]]:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_client_process, args=(base, bodies, clients, out))
    proc.start()
    while True:
        try:
            elapsed, answers = out.get(timeout=5)
            break
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the client process exited ({proc.exitcode}) without its measurement") from None
    proc.join()
    if elapsed is None:
        raise RuntimeError(f"a client's query failed: {answers}")
    return len(bodies) / elapsed, answers


def bench_replicas(results: list[dict], queries: int, clients: int) -> dict:
    import ray
    from ray import serve

    from selfrag_engine.entrypoints.ray_serve import APP_NAME, DeploymentOptions, ReplicaConfig, build_application
    from selfrag_engine.tiny.assets import default_model_dir
    from tests.server_process import free_port

    cores = sorted(os.sched_getaffinity(0))
    pinned = [[cores[0]], [cores[1 % len(cores)]]]
    port = free_port()
    bodies = _questions(queries)
    qps: dict[int, float] = {}
    answers: dict[int, list[str]] = {}
    ray.init(num_cpus=max(2, len(cores)), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ReplicaConfig(model=str(default_model_dir()), served_model_name="tiny-selfrag", device="cpu",
                               cpu_affinity=pinned)
        for replicas in (1, 2):
            serve.run(build_application(config, DeploymentOptions(replicas=replicas, replica_cpus=1)),
                      name=APP_NAME, route_prefix="/")
            qps[replicas], answers[replicas] = _measure(f"http://127.0.0.1:{port}", bodies, clients)
            record(results, "serve_selfrag_qps", qps[replicas], "queries/s", replicas=replicas, clients=clients,
                   queries=queries, cores=[c for p in pinned[:replicas] for c in p])
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    if answers[2] != answers[1]:
        raise AssertionError("answers with 2 replicas differ from those with 1")
    record(results, "serve_replicas_scaling_2", qps[2] / qps[1], "x", clients=clients, queries=queries,
           target=1.6)
    return qps


# ---- shards -----------------------------------------------------------------------------------------------


def bench_shards(results: list[dict], vectors: int, dim: int, queries: int) -> dict:
    import faiss

    from selfrag_engine.retrieval.passages import Passage
    from selfrag_engine.retrieval.retriever import Retriever
    from selfrag_engine.retrieval.sharded_index import ShardedRetriever, _IndexBuilder

    faiss.omp_set_num_threads(1)  # one core per search: the unsharded index on one, each shard on its own
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((vectors, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    q = rng.standard_normal((queries, dim), dtype=np.float32)
    passages = [Passage("", "", str(i)) for i in range(vectors)]
    whole = Retriever.from_embeddings(passages, None, emb, None, progress=False, gpu=False)
    builder = _IndexBuilder(dim, "Flat", vectors, progress=False, pieces=2)
    builder.add(emb)
    shards = [Retriever(index, passages[i::2], None, gpu=False) for i, index in enumerate(builder.finish_pieces())]
    sharded = ShardedRetriever(shards, None, dim, vectors, omp_threads=1)
    del emb

    def run(retriever) -> tuple[float, list]:
        retriever.search_embeddings(q[:1], K)  # warm
        start = time.perf_counter()
        hits = [retriever.search_embeddings(q[i:i + 1], K)[0] for i in range(queries)]
        return queries / (time.perf_counter() - start), hits

    qps_whole, want = run(whole)
    qps_sharded, got = run(sharded)
    sharded.close()
    for w, g in zip(want, got):
        if [h.score for h in g] != [h.score for h in w]:
            raise AssertionError("the sharded top-k differs from the unsharded one")
        cut = w[-1].score
        if [h.row for h in g if h.score != cut] != [h.row for h in w if h.score != cut]:
            raise AssertionError("the sharded top-k differs from the unsharded one")
    config = {"vectors": vectors, "dim": dim, "k": K, "queries": queries, "index": "Flat", "omp_threads": 1}
    record(results, "search_qps", qps_whole, "queries/s", shards=1, **config)
    record(results, "search_qps", qps_sharded, "queries/s", shards=2, **config)
    record(results, "search_sharded_speedup_2", qps_sharded / qps_whole, "x", **config)
    return {1: qps_whole, 2: qps_sharded}


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "a small run: few queries, a 20k-vector index")
    parser.add_argument("--vectors", type=int, default=None, help="vectors of the synthetic index (default 1M)")
    parser.add_argument("--queries", type=int, default=None, help="Self-RAG queries per replica count")
    parser.add_argument("--clients", type=int, default=8)
    args = parse_bench_args(parser, argv, default_device=lambda smoke: "cpu")
    vectors = args.vectors or (20_000 if args.smoke else 1_000_000)
    queries = args.queries or (8 if args.smoke else 96)
    clients = min(args.clients, queries)
    results: list[dict] = []
    shard_qps = bench_shards(results, vectors, 128, 20 if args.smoke else 200)
    replica_qps = bench_replicas(results, queries, clients)

    def plot(path: Path) -> None:
        plt = pyplot()
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
        a.bar(["1 replica", "2 replicas"], [replica_qps[1], replica_qps[2]], color=["#888", "#3a7"])
        a.set_ylabel("Self-RAG queries/s")
        a.set_title(f"engine replicas ({clients} clients)")
        b.bar(["unsharded", "2 shards"], [shard_qps[1], shard_qps[2]], color=["#888", "#37a"])
        b.set_ylabel("searches/s (one query each)")
        b.set_title(f"flat index, {vectors:,} vectors")
        save_figure(fig, path)

    write_results("scale", "cpu", results, args.out, plot=plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
