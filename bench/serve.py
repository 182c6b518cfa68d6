"""Self-RAG short-form queries per second and latency through `selfrag-engine serve` at 1, 8 and 64 concurrent
clients, side by side with the same queries answered one after another by `SelfRAG.answer` in one run.

    python bench/serve.py             # the embedded tiny model on the CPU; writes bench/results/serve-cpu-<date>.*
    python bench/serve.py --smoke --out /tmp/x

The server runs as a subprocess on 127.0.0.1; each client is a thread posting held-out world questions of the
tiny model with their five passages to /v1/selfrag over one kept-alive connection (the standard library's
http.client: a light client, since it shares the machine's cores with the server). Every served answer is
checked against the sequential one. Both sides use the same number of torch threads (`--threads`).
Headline: serve_selfrag_qps_c64 and serve_selfrag_concurrency_speedup_c64 (qps at 64 clients over the
sequential qps).
"""
from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import torch  # noqa: E402

from bench.common import (  # noqa: E402
    bench_parser,
    parse_bench_args,
    pyplot,
    record,
    save_figure,
    write_results,
)
from selfrag_engine.engine.llm_engine import Engine  # noqa: E402
from selfrag_engine.retrieval.passages import Passage  # noqa: E402
from selfrag_engine.selfrag.short_form import SelfRAG  # noqa: E402
from selfrag_engine.tiny.assets import default_model_dir  # noqa: E402
from selfrag_engine.tiny.evaluate import world_and_split, world_cases  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, num_blocks: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.Popen([sys.executable, "-m", "selfrag_engine", "serve", "--model", str(model), "--port",
                             str(port), "--device", "cpu", "--quiet", "--max-pending", "512",
                             "--num-blocks", str(num_blocks)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start: {proc.stdout.read()}")
        time.sleep(0.2)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "8 queries per level, 1 and 8 clients: a check of the script")
    parser.add_argument("--queries", type=int, default=256, help="queries per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--num-blocks", type=int, default=12288,
                        help="KV cache blocks of both engines (the default holds 64 queries' branches without "
                             "preemption)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads of the sequential engine and of the server alike (default: torch's)")
    args = parse_bench_args(parser, argv, default_device=lambda smoke: "cpu")
    levels = (1, 8) if args.smoke else (1, 8, 64)
    num_queries = 8 if args.smoke else args.queries
    max_tokens = 12 if args.smoke else args.max_tokens

    world, split = world_and_split()
    cases = world_cases(world, split, num_queries, seed=11)
    queries = [(c.question.text, [{"title": p.title, "text": p.text} for p in c.passages]) for c in cases]
    model = default_model_dir()
    results: list[dict] = []

    # Sequential: the synchronous API, one query after another on one engine.
    torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained(model, progress=False, num_blocks=args.num_blocks)
    rag = SelfRAG(engine, max_new_tokens=max_tokens)
    rag.answer(queries[0][0], [Passage(**p) for p in queries[0][1]])  # warm-up
    expected, seq_lat = [], []
    t0 = time.perf_counter()
    for q, docs in queries:
        s = time.perf_counter()
        expected.append(rag.answer(q, [Passage(**p) for p in docs]).answer)
        seq_lat.append(time.perf_counter() - s)
    seq_seconds = time.perf_counter() - t0
    seq_qps = len(queries) / seq_seconds
    num_blocks = engine.cache_stats()["num_blocks"]
    record(results, "kv_cache_blocks", num_blocks, "blocks", block_size=engine.cache_stats().get("block_size"))
    del rag, engine
    record(results, "sequential_selfrag_qps", seq_qps, "queries/s", queries=len(queries), max_tokens=max_tokens,
           threads=args.threads)
    record(results, "sequential_selfrag_p50_ms", statistics.median(seq_lat) * 1e3, "ms")

    proc, base = start_server(model, num_blocks, args.threads)
    host, port_text = base.removeprefix("http://").split(":")
    port = int(port_text)
    qps_by_level, p99_by_level, p50_by_level = {}, {}, {}
    try:
        with httpx.Client(base_url=base, timeout=600) as warm:
            warm.post("/v1/selfrag", json={"question": queries[0][0], "passages": queries[0][1],
                                           "max_tokens": max_tokens}).raise_for_status()
        for level in levels:
            latencies: list[float] = [0.0] * len(queries)
            answers: list[str | None] = [None] * len(queries)

            def client(worker: int) -> None:
                conn = http.client.HTTPConnection(host, port, timeout=600)
                try:
                    for i in range(worker, len(queries), level):
                        q, docs = queries[i]
                        body = json.dumps({"question": q, "passages": docs, "max_tokens": max_tokens})
                        s = time.perf_counter()
                        conn.request("POST", "/v1/selfrag", body, {"Content-Type": "application/json"})
                        r = conn.getresponse()
                        data = r.read()
                        latencies[i] = time.perf_counter() - s
                        if r.status != 200:
                            raise RuntimeError(f"/v1/selfrag answered {r.status}: {data[:300]!r}")
                        answers[i] = json.loads(data)["answer"]
                finally:
                    conn.close()

            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(level) as pool:
                list(pool.map(client, range(level)))
            seconds = time.perf_counter() - t0
            mismatched = sum(a != e for a, e in zip(answers, expected))
            qps = len(queries) / seconds
            qps_by_level[level] = qps
            p50_by_level[level] = percentile(latencies, 50) * 1e3
            p99_by_level[level] = percentile(latencies, 99) * 1e3
            record(results, f"serve_selfrag_qps_c{level}", qps, "queries/s", clients=level, queries=len(queries))
            record(results, f"serve_selfrag_p50_ms_c{level}", p50_by_level[level], "ms", clients=level)
            record(results, f"serve_selfrag_p99_ms_c{level}", p99_by_level[level], "ms", clients=level)
            record(results, f"serve_selfrag_concurrency_speedup_c{level}", qps / seq_qps, "x", clients=level)
            record(results, f"serve_selfrag_mismatched_answers_c{level}", mismatched, "answers", clients=level)
            if mismatched:
                raise AssertionError(f"{mismatched} answers at {level} clients differ from the sequential ones")
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()

    def plot(path: Path) -> None:
        plt = pyplot()
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        xs = list(qps_by_level)
        a.plot(xs, [qps_by_level[x] for x in xs], "o-", label="served")
        a.axhline(seq_qps, color="gray", ls="--", label="SelfRAG.answer, one after another")
        a.set(xscale="log", xlabel="concurrent clients", ylabel="queries / s", title="Self-RAG throughput")
        a.legend()
        b.plot(xs, [p99_by_level[x] for x in xs], "o-", label="p99")
        b.plot(xs, [p50_by_level[x] for x in xs], "s-", label="p50")
        b.set(xscale="log", xlabel="concurrent clients", ylabel="latency (ms)", title="Self-RAG latency")
        b.legend()
        save_figure(fig, path)

    write_results("serve", args.device, results, out_dir=args.out, plot=plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
