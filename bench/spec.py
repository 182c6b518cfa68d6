"""Passage-copy speculative decoding on the tiny Self-RAG model: model forward passes per generated token and
draft acceptance, over the held-out world questions answered through the short form, with every answer
checked identical to speculation off.

    python bench/spec.py                 # writes bench/results/spec-cpu-<date>.{json,md,png}
    python bench/spec.py --smoke --out /tmp/x

spec_forward_passes_per_token: the model calls each generated token cost its sequence (a sequence's calls
that sampled for it, over the tokens it got, summed over the branches and drafts of every question); plain
decoding costs exactly 1. spec_acceptance_rate: the fraction of drafted tokens greedy decoding reproduced.
Both are counts, not timings, so they hold on any device; the wall time of both runs is reported beside them.
"""
from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_parser, parse_bench_args, pyplot, record, save_figure, write_results  # noqa: E402
from selfrag_engine import Engine  # noqa: E402
from selfrag_engine.retrieval.passages import Passage  # noqa: E402
from selfrag_engine.selfrag.short_form import Answer, SelfRAG  # noqa: E402
from selfrag_engine.tiny.assets import default_checkpoint_dir  # noqa: E402
from selfrag_engine.tiny.evaluate import world_and_split, world_cases  # noqa: E402

NUM_DRAFT_TOKENS = 4
MAX_NEW_TOKENS = 48  # as the tiny model's held-out evaluation


def fingerprint(a: Answer) -> tuple:
    """What speculation must not change: the gate, every branch's tokens and scores, the chosen answer."""
    return (a.retrieved, a.answer, a.best, a.num_generated_tokens,
            tuple((tuple(b.token_ids), round(b.final, 4), round(b.relevance, 4), round(b.grounding, 4),
                   round(b.utility, 4)) for b in a.branches))


def run(num_draft_tokens: int, cases, device: str) -> tuple[list[Answer], list[dict], float]:
    """Answers every case one by one; returns the answers, each question's counter deltas and the seconds."""
    engine = Engine.from_pretrained(default_checkpoint_dir(), device=device, progress=False,
                                    num_draft_tokens=num_draft_tokens, kv_cache_bytes=256 << 20)
    rag = SelfRAG(engine, max_new_tokens=MAX_NEW_TOKENS)
    answers, deltas = [], []
    start = time.perf_counter()
    for case in cases:
        before = engine.speculation_stats()
        docs = [Passage(p.title, p.text, p.id) for p in case.passages]
        answers.append(rag.answer(case.question.text, docs, mode="adaptive"))
        after = engine.speculation_stats()
        deltas.append({k: after[k] - before[k] for k in ("row_passes", "tokens", "drafted", "accepted",
                                                         "forward_passes")})
    return answers, deltas, time.perf_counter() - start


def totals(deltas: list[dict]) -> dict:
    out = defaultdict(float)
    for d in deltas:
        for k, v in d.items():
            out[k] += v
    return out


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, "three questions, for CI", device_help="default cpu")
    parser.add_argument("--questions", type=int, default=None, help="held-out questions (default: all)")
    args = parse_bench_args(parser, argv, default_device=lambda smoke: "cpu")
    world, split = world_and_split()
    cases = world_cases(world, split, 3 if args.smoke else args.questions, seed=0)
    off, off_deltas, off_s = run(0, cases, args.device)
    on, on_deltas, on_s = run(NUM_DRAFT_TOKENS, cases, args.device)
    mismatched = [c.question.text for c, a, b in zip(cases, off, on) if fingerprint(a) != fingerprint(b)]
    if mismatched:
        raise SystemExit(f"speculation changed {len(mismatched)} answers, e.g. {mismatched[0]!r}")

    config = dict(questions=len(cases), num_draft_tokens=NUM_DRAFT_TOKENS, max_new_tokens=MAX_NEW_TOKENS,
                  mode="adaptive", k=5, device=args.device, outputs_identical=True)
    results: list[dict] = []
    t_on, t_off = totals(on_deltas), totals(off_deltas)
    record(results, "spec_forward_passes_per_token", t_on["row_passes"] / t_on["tokens"], "passes/token", **config)
    record(results, "spec_acceptance_rate", t_on["accepted"] / max(t_on["drafted"], 1), "fraction", **config)
    record(results, "spec_forward_passes_per_token_off", t_off["row_passes"] / t_off["tokens"], "passes/token",
           **config)
    # Model calls of the whole engine (batched branches share one) per generated token, both ways.
    record(results, "spec_engine_calls_per_token", t_on["forward_passes"] / t_on["tokens"], "calls/token", **config)
    record(results, "spec_engine_calls_per_token_off", t_off["forward_passes"] / t_off["tokens"], "calls/token",
           **config)
    record(results, "spec_generated_tokens", t_on["tokens"], "tokens", **config)
    record(results, "spec_wall_s", on_s, "s", **config)
    record(results, "spec_wall_s_off", off_s, "s", **config)

    by_kind: dict[str, list[dict]] = defaultdict(list)
    for case, d in zip(cases, on_deltas):
        by_kind[case.question.attribute].append(d)
    kinds = sorted(by_kind)
    per_kind = {}
    for kind in kinds:
        t = totals(by_kind[kind])
        per_kind[kind] = t["row_passes"] / t["tokens"]
        record(results, "spec_forward_passes_per_token", per_kind[kind], "passes/token",
               **{**config, "kind": kind, "questions": len(by_kind[kind])})
        record(results, "spec_acceptance_rate", t["accepted"] / max(t["drafted"], 1), "fraction",
               **{**config, "kind": kind, "questions": len(by_kind[kind])})

    def plot(png: Path) -> None:
        fig, ax = pyplot().subplots(figsize=(6, 3.5))
        xs = range(len(kinds) + 1)
        ax.bar(xs, [per_kind[k] for k in kinds] + [t_on["row_passes"] / t_on["tokens"]], color="tab:blue",
               label=f"speculation ({NUM_DRAFT_TOKENS} drafts)")
        ax.axhline(1.0, color="gray", linestyle="--", label="speculation off")
        ax.axhline(0.5, color="tab:red", linestyle=":", label="target")
        ax.set_xticks(list(xs), [*kinds, "all"], rotation=20)
        ax.set_ylabel("forward passes per token")
        ax.set_title("held-out world questions, short form")
        ax.legend(fontsize=8)
        save_figure(fig, png)

    write_results("spec", args.device, results, out_dir=args.out, plot=plot)


if __name__ == "__main__":
    main()
