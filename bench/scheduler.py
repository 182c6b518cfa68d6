"""Host-side cost of one decode step outside the model: scheduling (block manager appends, block tables and
slot mappings) plus building the step's input tensors and attention metadata, for 1, 8, 64 and 256 running sequences.

    python bench/scheduler.py            # writes bench/results/scheduler-cpu-<date>.{json,md,png}
    python bench/scheduler.py --smoke --out /tmp/x

The model call and sampling are excluded: this is the per-token overhead the GPU does not hide.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_parser, parse_bench_args, pyplot, save_figure, write_results  # noqa: E402
from selfrag_engine.engine.block_manager import BlockManager  # noqa: E402
from selfrag_engine.engine.model_runner import ModelRunner  # noqa: E402
from selfrag_engine.engine.sampling_params import SamplingParams  # noqa: E402
from selfrag_engine.engine.scheduler import Scheduler  # noqa: E402
from selfrag_engine.engine.sequence import Sequence  # noqa: E402


def step_cost_us(num_seqs: int, prompt_len: int, steps: int, device: str) -> tuple[float, float]:
    """Median microseconds per step of (schedule, prepare) with num_seqs sequences in decode."""
    block_size = 16
    per_seq_blocks = (prompt_len + steps + 2) // block_size + 2
    bm = BlockManager(num_seqs * per_seq_blocks + 8, block_size, True)
    sched = Scheduler(bm, max_num_seqs=num_seqs, max_num_batched_tokens=max(8192, num_seqs * prompt_len))
    runner = ModelRunner(model=None, kv_caches=[], block_size=block_size, device=device)
    params = SamplingParams(max_tokens=steps + 1)
    seqs = []
    for i in range(num_seqs):
        # Distinct prompts so the prefix cache does not merge them.
        seq = Sequence(i, [1] + [(i * 7919 + j) % 30000 + 3 for j in range(prompt_len - 1)], prompt_len, params, i)
        sched.add(seq)
        seqs.append(seq)
    batch = sched.schedule()  # prefill of every prompt
    for c in batch.chunks:
        c.seq.num_computed = c.start + c.num_tokens
        c.seq.token_ids.append(5)
    sched_times, prep_times = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        batch = sched.schedule()
        t1 = time.perf_counter()
        runner.prepare(batch)
        t2 = time.perf_counter()
        assert len(batch.chunks) == num_seqs and batch.num_tokens == num_seqs
        for c in batch.chunks:
            c.seq.num_computed = c.start + c.num_tokens
            c.seq.token_ids.append(6 + step % 100)
        sched_times.append((t1 - t0) * 1e6)
        prep_times.append((t2 - t1) * 1e6)
    sched_times.sort()
    prep_times.sort()
    return sched_times[len(sched_times) // 2], prep_times[len(prep_times) // 2]


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, "tiny run for CI", device_help="where the step tensors are built (default cpu)")
    # The host's share of a step is what is measured, so the tensors are built on the CPU unless asked.
    args = parse_bench_args(parser, argv, default_device=lambda smoke: "cpu")
    sizes = [1, 8] if args.smoke else [1, 8, 64, 256]
    steps = 5 if args.smoke else 64
    prompt_len = 40 if args.smoke else 200
    results = []
    rows = []
    for n in sizes:
        sched_us, prep_us = step_cost_us(n, prompt_len, steps, args.device)
        rows.append((n, sched_us, prep_us))
        config = {"running_seqs": n, "prompt_len": prompt_len, "block_size": 16, "device": args.device}
        results += [
            {"metric": f"schedule_step_us_n{n}", "value": sched_us, "unit": "us", "config": config},
            {"metric": f"prepare_step_us_n{n}", "value": prep_us, "unit": "us", "config": config},
            {"metric": f"host_overhead_per_token_us_n{n}", "value": (sched_us + prep_us) / n, "unit": "us",
             "config": config},
        ]
        print(f"{n:4d} seqs: schedule {sched_us:9.1f} us  prepare {prep_us:9.1f} us  "
              f"per token {(sched_us + prep_us) / n:8.2f} us")

    def plot(png: Path) -> None:
        fig, ax = pyplot().subplots(figsize=(5, 3.5))
        ax.plot([r[0] for r in rows], [r[1] for r in rows], "o-", label="schedule")
        ax.plot([r[0] for r in rows], [r[2] for r in rows], "s-", label="prepare inputs")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("running sequences")
        ax.set_ylabel("us per decode step")
        ax.legend()
        save_figure(fig, png)

    write_results("scheduler", args.device, results, out_dir=args.out, plot=plot)


if __name__ == "__main__":
    main()
