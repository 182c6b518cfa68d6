"""What a user of `selfrag-engine serve` feels, at 1, 8 and 64 concurrent clients, side by side with the same
work done in process in one run:
- streamed completions: time to the first token's text (TTFT) and between tokens (ITL), p50 and p99, read
  chunk by chunk from the server-sent events; each prompt is a Self-RAG branch after its relevant passage (a
  held-out question, `[Retrieval]<paragraph>...</paragraph>`), whose continuation is the answer's text (asked
  only the question, the model writes reflection tokens, which a stream carries as no text);
- Self-RAG short-form queries: queries per second and latency, against the same queries answered one after
  another by `SelfRAG.answer` (the server's own cost: serve_selfrag_concurrency_speedup_c1, target >= 0.9;
  at 64 clients, target >= 4), and the time to the first streamed event. Each level has queries (and
  streamed prompts) of its own, which neither side has seen, so that no side reads a prefix cache that an
  earlier level filled; the sequential side answers them close in time to the server, so that the machine's
  drift over the run falls on both: at one client in `--rounds` blocks interleaved with the server's (the
  order alternating), at more clients half before and half after the served run. Before the first level a
  burst of other queries at the most clients starts the server's program workers;
- Self-RAG long-form queries streamed (`form: "long"`, the server's defaults: a beam of 2): the time to the
  first `selfrag.segment` event and to the answer, p50 and p99, and the share of segments that arrived before
  their answer (a segment is sent once no later choice of the beam can drop it); `--long-queries` per level,
  or as many as the level has clients, each level with held-out people and towns of its own. A query the
  server turns away while its rows are taken (429) is sent again after its Retry-After, the wait counted in
  its times (serve_selfrag_long_busy_retries_c64 says how often);
- in process: N concurrent programs on an `EngineLoop` over `answer_batch` of the same N queries
  (programs_vs_answer_batch_c64, target >= 0.95): what sharing steps through the loop costs; the median of
  `--rounds` side-by-side rounds.

    python bench/serve.py             # the embedded tiny model on the CPU; writes bench/results/serve-cpu-<date>.*
    python bench/serve.py --smoke --out /tmp/x
    python bench/serve.py --only programs --out /tmp/x            # programs_vs_answer_batch_c64 alone
    python bench/serve.py --only serve --levels 64 --queries 128 --out /tmp/x   # the server at 64 clients

The server runs as a subprocess on 127.0.0.1; each client is a thread posting held-out world questions of the
tiny model with their five passages to /v1/selfrag over one kept-alive connection (the standard library's
http.client: a light client, since it shares the machine's cores with the server). Every served answer is
checked against the sequential one. Both sides use the same number of torch threads (`--threads`), and every
in-process side computes on a thread of its own that holds the process's only OpenMP team, as the server's
engine loop does (`alone`: libgomp stops spinning between operators once a process holds more OpenMP threads
than cores, so a team left behind on the main thread would slow whichever side ran second).
Headline: serve_ttft_p50_ms_c8, serve_itl_p50_ms_c8, programs_vs_answer_batch_c64,
serve_selfrag_concurrency_speedup_c1 and _c64 (qps over the sequential qps).
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
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

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
from selfrag_engine.engine.loop import EngineLoop  # noqa: E402
from selfrag_engine.selfrag.prompts import format_passage, format_prompt  # noqa: E402
from selfrag_engine.retrieval.passages import Passage  # noqa: E402
from selfrag_engine.selfrag.short_form import SelfRAG  # noqa: E402
from selfrag_engine.tiny.assets import default_model_dir  # noqa: E402
from selfrag_engine.tiny.evaluate import world_and_split, world_cases  # noqa: E402
from selfrag_engine.tiny.long_form_data import long_form_cases  # noqa: E402


T = TypeVar("T")


def alone(fn: Callable[[], T]) -> T:
    """fn() on a thread that ends with it, so that its OpenMP team goes with it: the next side measured (an
    engine loop's thread, another in-process side) holds the process's only team, as the served engine does."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - raised by the caller
            box["error"] = e

    thread = threading.Thread(target=run, name="bench-side")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


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


def sse_events(r: http.client.HTTPResponse) -> Iterator[dict]:
    """The JSON events of a server-sent-event response, each as soon as its line arrives ([DONE] ends it)."""
    while line := r.readline():
        line = line.strip()
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            yield json.loads(line[6:])


def stream_completion(conn: http.client.HTTPConnection, prompt: str, max_tokens: int) -> tuple[str, list[float]]:
    """One streamed completion: its text and the arrival time of every chunk that carried text."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                       "stream": True})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"/v1/completions answered {r.status}: {r.read()[:300]!r}")
    text, times = [], []
    for event in sse_events(r):
        piece = event["choices"][0]["text"]
        if piece:
            times.append(time.perf_counter())
            text.append(piece)
    return "".join(text), times


def passages_json(passages) -> list[dict]:
    """Passages as /v1/selfrag takes them."""
    return [{"title": p.title, "text": p.text} for p in passages]


def as_query(case) -> tuple[str, list[dict]]:
    """A world case as the server takes it: the question and its passages."""
    return case.question.text, passages_json(case.passages)


def start_workers(loop: EngineLoop, n: int) -> None:
    """Starts n of the loop's program workers, as a serving loop has them: its pool makes a thread per program
    while none is idle, so a cold pool would make 64 of them (0.1-0.2 s here) while the timed programs run."""
    barrier = threading.Barrier(n)
    for handle in [loop.run_program(lambda _: barrier.wait()) for _ in range(n)]:
        handle.result()


def stream_long_form(conn: http.client.HTTPConnection, question: str, passages: list[dict]
                     ) -> tuple[list[float], float, int]:
    """One streamed long-form Self-RAG query: the seconds to each `selfrag.segment` event and to the answer,
    from the first try, and how many times the server answered 429 (busy: each branch of the beam holds a row,
    so many clients' trees can outgrow the server's rows) and the query was sent again after `retry-after`, as
    the `openai` client does."""
    body = json.dumps({"question": question, "passages": passages, "form": "long", "stream": True})
    s = time.perf_counter()
    retries = 0
    while True:
        conn.request("POST", "/v1/selfrag", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 429:
            break
        r.read()
        retries += 1
        time.sleep(float(r.getheader("retry-after") or 1))
    if r.status != 200:
        raise RuntimeError(f"/v1/selfrag answered {r.status}: {r.read()[:300]!r}")
    segments, answer = [], None
    for event in sse_events(r):
        if event.get("object") == "selfrag.segment":
            segments.append(time.perf_counter() - s)
        elif event.get("object") == "selfrag.answer":
            answer = time.perf_counter() - s
        elif "error" in event:
            raise RuntimeError(f"/v1/selfrag failed: {event['error']}")
    if answer is None:
        raise RuntimeError("a long-form stream ended without its answer")
    return segments, answer, retries


def programs_ratio(model: Path, queries: list, max_tokens: int, num_blocks: int, rounds: int = 1
                   ) -> tuple[float, float, list[float]]:
    """In process: (qps of len(queries) concurrent programs on an EngineLoop, qps of one answer_batch of them,
    every round's ratio in increasing order),
    every program's answer checked against the batch's. Measured in `rounds` rounds on the same engine, the
    batch first in even rounds and the programs first in odd ones (whichever runs second in a round is not
    favoured); the round with the median ratio is returned (one round's ratio varies by several percent on a
    2-core machine, more than the difference the ratio is there to show)."""
    qs, docs = [q for q, _ in queries], [[Passage(**p) for p in d] for _, d in queries]
    engine = alone(lambda: Engine.from_pretrained(model, progress=False, num_blocks=num_blocks))

    def batch_side() -> tuple[list[str], float]:
        rag = SelfRAG(engine, max_new_tokens=max_tokens)
        rag.answer_batch(qs[:2], docs[:2])  # warm-up
        t0 = time.perf_counter()
        batch = [a.answer for a in rag.answer_batch(qs, docs)]
        return batch, len(qs) / (time.perf_counter() - t0)

    def programs_side() -> tuple[list[str], float]:
        # The loop's thread holds the only OpenMP team while it runs, and takes it along when it closes.
        with EngineLoop(engine, max_pending=len(qs) + 1, program_workers=len(qs)) as loop:
            loop.run_program(lambda v: SelfRAG(v, max_new_tokens=max_tokens).answer(qs[0], docs[0])).result()
            start_workers(loop, len(qs))
            t0 = time.perf_counter()
            handles = [loop.run_program(lambda v, q=q, d=d: SelfRAG(v, max_new_tokens=max_tokens).answer(q, d)
                                        .answer) for q, d in zip(qs, docs)]
            got = [h.result() for h in handles]
            return got, len(qs) / (time.perf_counter() - t0)

    measured = []
    for i in range(rounds):
        if i % 2 == 0:
            batch, batch_qps = alone(batch_side)
            got, programs_qps = programs_side()
        else:
            got, programs_qps = programs_side()
            batch, batch_qps = alone(batch_side)
        if got != batch:
            raise AssertionError(f"{sum(a != b for a, b in zip(got, batch))} programs answered otherwise than the "
                                 "batch")
        measured.append((programs_qps, batch_qps))
    measured.sort(key=lambda m: m[0] / m[1])
    programs_qps, batch_qps = measured[(len(measured) - 1) // 2]
    return programs_qps, batch_qps, [round(p / b, 4) for p, b in measured]


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "8 queries per level, 1 and 8 clients: a check of the script")
    parser.add_argument("--queries", type=int, default=256, help="queries per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--num-blocks", type=int, default=12288,
                        help="KV cache blocks of both engines (the default holds 64 queries' branches without "
                             "preemption)")
    parser.add_argument("--completion-tokens", type=int, default=32, help="tokens per streamed completion")
    parser.add_argument("--completions", type=int, default=64, help="streamed completions per concurrency level")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads of the sequential engine and of the server alike (default: torch's)")
    parser.add_argument("--long-queries", type=int, default=16,
                        help="streamed long-form queries per level, at least one per client (smoke: 2)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of the in-process comparison (batch, then programs; the median round's "
                             "ratio is recorded) and blocks of the one-client comparison (in process, then "
                             "served; the sums' ratio is recorded) (smoke: 1)")
    parser.add_argument("--only", choices=("programs", "serve"), default=None,
                        help="programs: the in-process ratio alone; serve: the sequential side and the server "
                             "alone (a partial run: give --out)")
    parser.add_argument("--levels", default=None,
                        help="concurrent clients to measure the server at, comma-separated (default 1,8,64; "
                             "smoke 1,8)")
    args = parse_bench_args(parser, argv, default_device=lambda smoke: "cpu")
    levels = (1, 8) if args.smoke else (1, 8, 64)
    if args.levels is not None:
        try:
            levels = tuple(int(x) for x in args.levels.split(","))
        except ValueError:
            parser.error(f"--levels: comma-separated client counts, got {args.levels!r}")
        if not levels or min(levels) < 1:
            parser.error(f"--levels: client counts of at least 1, got {args.levels!r}")
        levels = tuple(sorted(set(levels)))
    if args.only is not None and args.out is None:
        parser.error("--only writes a partial result: give --out, so the recorded results are not replaced")
    num_queries = 8 if args.smoke else args.queries
    max_tokens = 12 if args.smoke else args.max_tokens
    num_completions = 8 if args.smoke else args.completions
    completion_tokens = 8 if args.smoke else args.completion_tokens
    num_programs = 8 if args.smoke else 64
    rounds = 1 if args.smoke else args.rounds
    long_queries = 2 if args.smoke else args.long_queries
    if rounds < 1:
        parser.error(f"--rounds: at least 1, got {rounds}")

    world, split = world_and_split()
    # Each level answers queries of its own, and the warm-up others again, so that no side reads the prefix cache
    # of queries an earlier level or the warm-up computed (the server would otherwise skip the prompts' prefill
    # at 8 and 64 clients, the sequential engine never).
    num_sets = 1 if args.only == "programs" else len(levels)
    cases = world_cases(world, split, num_queries * num_sets + max(levels), seed=11)
    level_cases = {level: cases[i * num_queries:(i + 1) * num_queries] for i, level in enumerate(levels)}
    warm_queries = [as_query(c) for c in cases[num_sets * num_queries:]]
    long_cases, taken = long_form_cases(world, split), 0
    level_long = {}
    for level in levels:  # past the held-out cases (132), they come round again
        n = max(level, long_queries)
        level_long[level] = [long_cases[(taken + i) % len(long_cases)] for i in range(n)]
        taken += n
    model = default_model_dir()
    results: list[dict] = []

    torch.set_num_threads(args.threads)

    def measure_programs(num_blocks: int) -> float:
        """Records the in-process side; returns programs_vs_answer_batch."""
        batch = [as_query(c) for c in cases[:num_programs]]
        programs_qps, batch_qps, ratios = programs_ratio(model, batch, max_tokens, num_blocks, rounds)
        record(results, f"answer_batch_qps_c{num_programs}", batch_qps, "queries/s", queries=num_programs)
        record(results, f"programs_qps_c{num_programs}", programs_qps, "queries/s", queries=num_programs)
        record(results, f"programs_vs_answer_batch_c{num_programs}", programs_qps / batch_qps, "x",
               queries=num_programs, threads=args.threads, rounds=rounds, round_ratios=ratios)
        return programs_qps / batch_qps

    if args.only == "programs":
        measure_programs(args.num_blocks)
        write_results("serve", args.device, results, out_dir=args.out)
        return 0

    # Sequential: the synchronous API, one query after another on one engine, answering each level's queries
    # close in time to the server answering them, so that the machine's drift over the run (several percent on
    # a shared 2-core machine) falls on both sides of the ratio alike: at one client in `--rounds` blocks
    # interleaved with the server's (the order alternating), at more clients half before and half after the
    # served run.
    seq_engine = alone(lambda: Engine.from_pretrained(model, progress=False, num_blocks=args.num_blocks))
    seq_rag = SelfRAG(seq_engine, max_new_tokens=max_tokens)

    def sequential(queries: list, indices: list[int], expected: list, latency: list[float]) -> float:
        """Answers queries[i] for i in indices one after another; returns the seconds they took."""
        def run() -> float:
            t0 = time.perf_counter()
            for i in indices:
                q, docs = queries[i]
                s = time.perf_counter()
                expected[i] = seq_rag.answer(q, [Passage(**p) for p in docs]).answer
                latency[i] = time.perf_counter() - s
            return time.perf_counter() - t0
        return alone(run)

    alone(lambda: seq_rag.answer(warm_queries[0][0], [Passage(**p) for p in warm_queries[0][1]]))  # warm-up
    cache = seq_engine.cache_stats()
    num_blocks = cache["num_blocks"]
    record(results, "kv_cache_blocks", num_blocks, "blocks", block_size=cache.get("block_size"))

    programs_vs_batch = measure_programs(num_blocks) if args.only is None else float("nan")

    proc, base = start_server(model, num_blocks, args.threads)
    host, port_text = base.removeprefix("http://").split(":")
    port = int(port_text)
    qps_by_level, p99_by_level, p50_by_level, speedup_by_level = {}, {}, {}, {}
    ttft, itl = {}, {}  # level -> (p50, p99) in ms
    long_ms: dict[str, dict[int, tuple[float, float]]] = {}  # first_segment / answer -> level -> (p50, p99)
    try:
        # A burst at the most clients measured first, so that every level meets the server's program workers
        # started, as a server that has been serving does (the first burst makes a thread per program).
        def warm(i: int) -> None:
            q, docs = warm_queries[i % len(warm_queries)]
            with httpx.Client(base_url=base, timeout=600) as client:
                client.post("/v1/selfrag", json={"question": q, "passages": docs, "max_tokens": max_tokens}
                            ).raise_for_status()

        with cf.ThreadPoolExecutor(max(levels)) as pool:
            list(pool.map(warm, range(max(levels))))
        for level in levels:
            queries = [as_query(c) for c in level_cases[level]]
            prompts = [format_prompt(c.question.text) + format_passage(c.passages[c.gold_index].title,
                                                                       c.passages[c.gold_index].text)
                       for c in level_cases[level]]
            firsts: list[float] = []
            gaps: list[float] = []

            def streamer(worker: int) -> None:
                conn = http.client.HTTPConnection(host, port, timeout=600)
                try:
                    for i in range(worker, num_completions, level):
                        s = time.perf_counter()
                        _, times = stream_completion(conn, prompts[i % len(prompts)], completion_tokens)
                        if times:
                            firsts.append(times[0] - s)
                            gaps.extend(b - a for a, b in zip(times, times[1:]))
                finally:
                    conn.close()

            with cf.ThreadPoolExecutor(level) as pool:
                list(pool.map(streamer, range(level)))
            ttft[level] = (percentile(firsts, 50) * 1e3, percentile(firsts, 99) * 1e3)
            itl[level] = (percentile(gaps, 50) * 1e3, percentile(gaps, 99) * 1e3) if gaps else (0.0, 0.0)
            for name, (p50, p99) in (("ttft", ttft[level]), ("itl", itl[level])):
                record(results, f"serve_{name}_p50_ms_c{level}", p50, "ms", clients=level,
                       completions=num_completions, tokens=completion_tokens)
                record(results, f"serve_{name}_p99_ms_c{level}", p99, "ms", clients=level)

            first_events: list[float] = [0.0] * len(queries)
            latencies: list[float] = [0.0] * len(queries)
            answers: list[str | None] = [None] * len(queries)
            expected: list[str | None] = [None] * len(queries)
            seq_lat: list[float] = [0.0] * len(queries)

            def client(worker: int, indices: list[int]) -> None:
                conn = http.client.HTTPConnection(host, port, timeout=600)
                try:
                    for i in indices[worker::level]:
                        q, docs = queries[i]
                        body = json.dumps({"question": q, "passages": docs, "max_tokens": max_tokens,
                                           "stream": True})
                        s = time.perf_counter()
                        conn.request("POST", "/v1/selfrag", body, {"Content-Type": "application/json"})
                        r = conn.getresponse()
                        if r.status != 200:
                            raise RuntimeError(f"/v1/selfrag answered {r.status}: {r.read()[:300]!r}")
                        for event in sse_events(r):
                            if not first_events[i]:
                                first_events[i] = time.perf_counter() - s
                            if event.get("object") == "selfrag.answer":
                                answers[i] = event["answer"]
                            elif "error" in event:
                                raise RuntimeError(f"/v1/selfrag failed: {event['error']}")
                        latencies[i] = time.perf_counter() - s
                finally:
                    conn.close()

            def served(indices: list[int]) -> float:
                t0 = time.perf_counter()
                with cf.ThreadPoolExecutor(level) as pool:
                    list(pool.map(client, range(level), [indices] * level))
                return time.perf_counter() - t0

            def answered(indices: list[int]) -> float:
                return sequential(queries, indices, expected, seq_lat)

            everything = list(range(len(queries)))
            seq_seconds = seconds = 0.0
            if level == 1:
                for r, block in enumerate(everything[b::rounds] for b in range(rounds)):
                    if r % 2 == 0:
                        seq_seconds += answered(block)
                        seconds += served(block)
                    else:
                        seconds += served(block)
                        seq_seconds += answered(block)
            else:
                half = len(everything) // 2
                seq_seconds += answered(everything[:half])
                seconds += served(everything)
                seq_seconds += answered(everything[half:])
            seq_qps = len(queries) / seq_seconds
            if not any(r["metric"] == "sequential_selfrag_qps" for r in results):
                record(results, "sequential_selfrag_qps", seq_qps, "queries/s", queries=len(queries),
                       max_tokens=max_tokens, threads=args.threads, clients=level)
                record(results, "sequential_selfrag_p50_ms", statistics.median(seq_lat) * 1e3, "ms")
            record(results, f"sequential_selfrag_qps_c{level}", seq_qps, "queries/s", queries=len(queries),
                   blocks=rounds if level == 1 else 2)
            mismatched = sum(a != e for a, e in zip(answers, expected))
            qps = len(queries) / seconds
            qps_by_level[level] = qps
            speedup_by_level[level] = qps / seq_qps
            p50_by_level[level] = percentile(latencies, 50) * 1e3
            p99_by_level[level] = percentile(latencies, 99) * 1e3
            record(results, f"serve_selfrag_qps_c{level}", qps, "queries/s", clients=level, queries=len(queries))
            record(results, f"serve_selfrag_p50_ms_c{level}", p50_by_level[level], "ms", clients=level)
            record(results, f"serve_selfrag_p99_ms_c{level}", p99_by_level[level], "ms", clients=level)
            record(results, f"serve_selfrag_first_event_p50_ms_c{level}", percentile(first_events, 50) * 1e3, "ms",
                   clients=level)
            record(results, f"serve_selfrag_concurrency_speedup_c{level}", qps / seq_qps, "x", clients=level)
            record(results, f"serve_selfrag_mismatched_answers_c{level}", mismatched, "answers", clients=level)
            if mismatched:
                raise AssertionError(f"{mismatched} answers at {level} clients differ from the sequential ones")

            long_firsts: list[float] = []
            long_ends: list[float] = []
            long_counts: list[tuple[int, int, int]] = []  # per query: segments before the answer, segments, 429s

            def long_client(worker: int) -> None:
                conn = http.client.HTTPConnection(host, port, timeout=600)
                try:
                    for c in level_long[level][worker::level]:
                        segments, end, retries = stream_long_form(conn, c.instruction, passages_json(c.passages))
                        long_ends.append(end)
                        long_firsts.append(segments[0] if segments else end)  # the first text a reader gets
                        long_counts.append((sum(end - t > 0.001 for t in segments), len(segments), retries))
                finally:
                    conn.close()

            with cf.ThreadPoolExecutor(level) as pool:
                list(pool.map(long_client, range(level)))
            for name, values in (("first_segment", long_firsts), ("answer", long_ends)):
                long_ms.setdefault(name, {})[level] = (percentile(values, 50) * 1e3, percentile(values, 99) * 1e3)
                for q, value in zip((50, 99), long_ms[name][level]):
                    record(results, f"serve_selfrag_long_{name}_p{q}_ms_c{level}", value, "ms", clients=level,
                           queries=len(level_long[level]))
            early, total, busy = (sum(c) for c in zip(*long_counts))
            record(results, f"serve_selfrag_long_early_segments_c{level}", early / total if total else 0.0, "x",
                   clients=level, segments=total)
            record(results, f"serve_selfrag_long_busy_retries_c{level}", busy, "requests", clients=level)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()

    def plot(path: Path) -> None:
        plt = pyplot()
        fig, (a, b, c, d) = plt.subplots(1, 4, figsize=(20, 4.2))
        xs = list(qps_by_level)
        ticks = dict(xscale="log", xticks=xs, xticklabels=[str(x) for x in xs], xlabel="concurrent clients")
        a.plot(xs, [speedup_by_level[x] for x in xs], "o-", label="served / one after another in process")
        a.axhline(1.0, color="gray", ls="--", lw=0.8)
        a.set(ylabel="Self-RAG queries/s ratio", title="Self-RAG throughput through the server", ylim=(0, None),
              **ticks)
        a.minorticks_off()
        a.legend()
        b.plot(xs, [p50_by_level[x] for x in xs], "s-", label="p50")
        b.plot(xs, [p99_by_level[x] for x in xs], "o-", label="p99")
        b.set(ylabel="latency (ms)", title="Self-RAG query latency", ylim=(0, None), **ticks)
        b.minorticks_off()
        b.legend()
        for name, values, style in (("TTFT", ttft, "o-"), ("ITL", itl, "s-")):
            c.plot(xs, [values[x][0] for x in xs], style, label=f"{name} p50")
            c.plot(xs, [values[x][1] for x in xs], style, alpha=0.5, label=f"{name} p99")
        c.set(ylabel="ms", title=f"streamed completions ({completion_tokens} tokens)", ylim=(0, None), **ticks)
        c.minorticks_off()
        c.legend()
        for name, label, style in (("first_segment", "first segment", "o-"), ("answer", "answer", "s-")):
            d.plot(xs, [long_ms[name][x][0] for x in xs], style, label=f"{label} p50")
            d.plot(xs, [long_ms[name][x][1] for x in xs], style, alpha=0.5, label=f"{label} p99")
        d.set(ylabel="ms", title="streamed long-form Self-RAG (beam of 2)", ylim=(0, None), **ticks)
        d.minorticks_off()
        d.legend()
        fig.suptitle(f"{model.name} on {args.device}, {args.threads} torch threads; in process, "
                     f"{num_programs} programs / answer_batch = {programs_vs_batch:.2f}x")
        save_figure(fig, path)

    write_results("serve", args.device, results, out_dir=args.out, plot=plot if args.only is None else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
