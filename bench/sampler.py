"""Sampling benchmark: the fused Triton sampler vs the torch way (softmax, sort-based top-p, multinomial,
gather of the reflection tokens), side by side over batch sizes at the Self-RAG vocabulary (32,016).

    python bench/sampler.py                      # GPU: results under bench/results/
    python bench/sampler.py --smoke --out DIR    # tiny shapes; on a CPU through the Triton interpreter

Both sides do the same work per step: sample with temperature 1.0 and top-p 0.9 from float32 logits (what the
engine's model runner returns), and return the chosen token's log-probability at temperature 1, the row's
log-sum-exp, and the 13 Self-RAG reflection tokens' log-probabilities and group-normalized probabilities.

Headline metric: sampler_speedup_b8 = torch time / fused time at batch 8; sampler_speedup_b{N},
sampler_fused_ms_b{N} and sampler_torch_ms_b{N} for every batch size.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (bench_parser, cuda_if_available, interpret_kernels, parse_bench_args,  # noqa: E402
                          pyplot, save_figure, time_fn, write_results)

if not torch.cuda.is_available():
    interpret_kernels()

from selfrag_engine.layers.sampler import ReflectionGroups, sample  # noqa: E402

# Self-RAG's reflection tokens (ids of the published tokenizer), as the engine groups them.
SELFRAG_GROUPS = {"retrieval": [32000, 32001, 32002], "relevance": [32003, 32004],
                  "grounding": [32012, 32013, 32014], "utility": [32007, 32008, 32009, 32010, 32011]}

FULL = dict(vocab=32016, batches=[1, 2, 4, 8, 16, 32, 64], timing=dict(warmup=10, iters=50))
SMOKE = dict(vocab=300, batches=[1, 8], timing=dict(warmup=1, iters=1))


def torch_sampler(logits, temperature, top_p, group_ids, same_group, generator):
    """What one writes without the kernel: full softmax, sort, cumsum mask, multinomial, gathers."""
    x = logits.float()
    logp = torch.log_softmax(x, dim=-1)
    probs = torch.softmax(x / temperature[:, None], dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p[:, None]
    choice = torch.multinomial(sorted_p.masked_fill(drop, 0.0), 1, generator=generator)
    tokens = order.gather(1, choice)
    token_lp = logp.gather(1, tokens)
    lse = torch.logsumexp(x, dim=-1)
    glp = logp[:, group_ids]
    gexp = torch.exp(glp)
    gprobs = gexp / (gexp @ same_group)
    return tokens, token_lp, lse, glp, gprobs


def bench(cfg: dict, device: str) -> list[dict]:
    vocab = cfg["vocab"]
    groups = {name: [t % vocab for t in ids] for name, ids in SELFRAG_GROUPS.items()}
    rg = ReflectionGroups.from_token_ids(groups)
    group_ids = rg.token_ids(device).long()
    gidx = torch.repeat_interleave(torch.arange(len(rg.ids)), torch.tensor([len(g) for g in rg.ids]))
    same_group = (gidx[:, None] == gidx[None, :]).float().to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    results = []
    for batch in cfg["batches"]:
        gen = torch.Generator(device="cpu").manual_seed(batch)
        # LLM-like rows: a broad body and a few strong candidates, so top-p 0.9 keeps tens of tokens.
        logits = torch.randn(batch, vocab, generator=gen) * 2.0
        logits[:, :8] += 6.0
        logits = logits[:, torch.randperm(vocab, generator=gen)].contiguous().to(device)
        temperature = torch.full((batch,), 1.0, device=device)
        top_p = torch.full((batch,), 0.9, device=device)
        top_k = torch.zeros(batch, dtype=torch.int32, device=device)
        seeds = torch.arange(batch, dtype=torch.int64, device=device)
        backend = "triton"
        fused = time_fn(lambda: sample(logits, temperature, top_p, top_k, seeds, groups=rg, backend=backend),
                        device, **cfg["timing"])
        ref = time_fn(lambda: torch_sampler(logits, temperature, top_p, group_ids, same_group, generator),
                      device, **cfg["timing"])
        config = dict(batch=batch, vocab=vocab, dtype="float32", temperature=1.0, top_p=0.9,
                      reflection_tokens=rg.num_tokens)
        results += [
            dict(metric=f"sampler_fused_ms_b{batch}", value=fused, unit="ms", config=config),
            dict(metric=f"sampler_torch_ms_b{batch}", value=ref, unit="ms", config=config),
            dict(metric=f"sampler_speedup_b{batch}", value=ref / fused, unit="x", config=config),
        ]
    return results


def plot(results: list[dict]):
    def draw(path: Path) -> None:
        def series(prefix):
            pts = [r for r in results if r["metric"].startswith(prefix)]
            return [r["config"]["batch"] for r in pts], [r["value"] for r in pts]

        fig, ax = pyplot().subplots(figsize=(7, 4.5))
        for prefix, label in (("sampler_fused_ms_b", "fused Triton sampler"),
                              ("sampler_torch_ms_b", "torch softmax + sort top-p")):
            xs, ys = series(prefix)
            ax.plot(xs, ys, marker="o", label=label)
        ax.set(xlabel="batch (rows of 32,016 logits)", ylabel="ms per step", xscale="log", yscale="log",
               title="sampling + reflection-token scoring")
        ax.set_xticks(*(lambda xs: (xs, [str(x) for x in xs]))(series("sampler_fused_ms_b")[0]))
        ax2 = ax.twinx()
        xs, ys = series("sampler_speedup_b")
        ax2.plot(xs, ys, color="gray", linestyle="--", marker="x", label="speedup")
        ax2.set_ylabel("torch / fused")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left")
        save_figure(fig, path)

    return draw


def main(argv: list[str] | None = None) -> Path:
    parser = bench_parser(__doc__, "tiny shapes (runs on the CPU interpreter)")
    args = parse_bench_args(parser, argv, cuda_if_available, needs_cuda=True)
    cfg = SMOKE if args.smoke else FULL
    results = bench(cfg, args.device)
    if args.smoke:
        for r in results:
            r["config"]["smoke"] = True
    path = write_results("sampler", args.device, results, out_dir=args.out, plot=plot(results))
    for r in results:
        if r["metric"].startswith("sampler_speedup_b"):
            print(f"{r['metric']}: {r['value']:.2f}x")
    return path


if __name__ == "__main__":
    main()
