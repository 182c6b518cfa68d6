"""Decode latency of a Llama-2-7B-shaped model: our engine (CUDA graphs on and off, FP16 and FP8) beside
Hugging Face transformers on the same weights, with the bandwidth floor measured in the same run.

    python bench/decode.py                       # CUDA: writes bench/results/decode-<device>-<date>.{json,md,png}
    python bench/decode.py --smoke --out DIR     # tiny model on the CPU (CI): the code paths, not the numbers

Batch-1 decode reads every weight once per token, so the floor of a step is (weight bytes + the batch's KV
bytes) over the device's copy bandwidth; `decode_floor_fraction` is that floor over the measured step time.
A step is `Engine.step()` as a user drives it: scheduling, the model, sampling, and the host reading the
tokens back. Every decode figure is of plain decoding (`num_draft_tokens=0`): a speculative verify step emits
several tokens, so tokens per second would not be batch x 1000 / step ms. Speculation is measured in rows of
its own (`spec_*`, FP8 batch 1: step time, tokens per step, draft tokens accepted per verify step), on the
random-weight model whose drafts are seldom right, so they show the cost of a verify step more than its gain
(bench/spec.py counts the gain on the trained tiny model). transformers runs `generate` with its static cache,
eager (its automatic torch.compile off, `bench.common.hf_generate`; compiled when `--hf-compile` works on the
image); its per-token time is (t(1 + n tokens) - t(1 token)) / n, so its prefill is not counted. Every row is
written to the results file as soon as it is measured (`bench.common.autosave`).

Headline metrics: decode_fp8_bs1_tokens_per_s, decode_fp8_bs1_floor_fraction (context 512),
decode_speedup_vs_transformers (our FP8 graphed batch 1 over transformers FP16 batch 1, context 512), and
branch5_step_cost_ratio (a decode step of K=5 forked Self-RAG branches over a single-sequence step); beside
them decode_overlap_speedup (FP8 batch 1: step time with `Engine(overlap=False)` over the default, overlapped
stepping on CUDA).
"""
from __future__ import annotations

import gc
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (autosave, bench_parser, copy_bandwidth_gbps, cpu_for_smoke, hf_generate,  # noqa: E402
                          if_importable, parse_bench_args, pyplot, record, save_figure, timed_ms, write_results)
from bench.workload import (LLAMA2_7B, SMOKE, bench_tokenizer, hf_sharing_weights, kv_bytes_per_token,  # noqa: E402
                            random_llama, weight_bytes_per_token)
from selfrag_engine.engine.llm_engine import Engine  # noqa: E402
from selfrag_engine.engine.sampling_params import SamplingParams  # noqa: E402
from selfrag_engine.engine.speculative import DEFAULT_NUM_DRAFT_TOKENS  # noqa: E402

SPEC_DRAFT_TOKENS = DEFAULT_NUM_DRAFT_TOKENS


def make_engine(model, tokenizer, kv_bytes: int, max_batched: int, eager: bool, overlap: bool | None = None,
                num_draft_tokens: int = 0) -> Engine:
    """An engine with an explicit KV budget; speculation off unless num_draft_tokens says otherwise."""
    return Engine(model, tokenizer, kv_cache_bytes=kv_bytes, max_num_batched_tokens=max_batched,
                  enable_prefix_caching=False, enforce_eager=eager, overlap=overlap,
                  num_draft_tokens=num_draft_tokens)


def steps_ms(engine: Engine, steps: int) -> float:
    """Milliseconds per `Engine.step()` over `steps` steps, the device synchronized around them."""
    ms, _ = timed_ms(lambda: [engine.step() for _ in range(steps)], str(engine.device))
    return ms / steps


def _random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def decode_step_ms(engine: Engine, batch: int, context: int, steps: int, warmup: int, seed: int) -> float:
    """Milliseconds per decode step of `batch` sequences whose prompts hold `context` tokens."""
    rng = random.Random(seed)
    vocab = engine.config.vocab_size
    params = SamplingParams(max_tokens=warmup + steps + 2, temperature=0.0, ignore_eos=True, detokenize=False)
    ids = [engine.add_request([1] + _random_ids(rng, context - 1, vocab), params) for _ in range(batch)]
    try:
        engine.step()  # every prompt prefills in this one step (max_num_batched_tokens covers them)
        for _ in range(warmup):
            engine.step()
        return steps_ms(engine, steps)
    finally:
        for i in ids:
            engine.forget(i)


def branch_step_ms(engine: Engine, k: int, prompt_len: int, passage_len: int, steps: int, warmup: int,
                   seed: int) -> float:
    """Milliseconds per decode step of k branches forked off one cached prompt, each with its own passage
    (the Self-RAG short form's decode phase)."""
    rng = random.Random(seed)
    vocab = engine.config.vocab_size
    prompt = [1] + _random_ids(rng, prompt_len - 1, vocab)
    first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)
    parent = engine.add_request(prompt, first, keep_cache=True)
    engine.run([parent])
    params = SamplingParams(max_tokens=warmup + steps + 2, temperature=0.0, ignore_eos=True, detokenize=False)
    kids = engine.fork(parent, [_random_ids(rng, passage_len, vocab) for _ in range(k)], params,
                       prefix_len=len(prompt))
    try:
        engine.step()  # the passages prefill together
        for _ in range(warmup):
            engine.step()
        return steps_ms(engine, steps)
    finally:
        for i in kids + [parent]:
            engine.forget(i)


def hf_decode_ms(hf, batch: int, context: int, steps: int, device: str, seed: int) -> float:
    """transformers generate, static cache: milliseconds per generated token after the first."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(3, hf.config.vocab_size, (batch, context), generator=gen).to(device)
    ids[:, 0] = 1
    mask = torch.ones_like(ids)

    def generate(n: int) -> None:
        with torch.inference_mode():
            hf_generate(hf, input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        cache_implementation="static", pad_token_id=0, eos_token_id=None)

    def run(n: int) -> float:
        return timed_ms(lambda: generate(n), device)[0] / 1e3

    run(steps + 1)  # warm-up (and compilation)
    t_one = min(run(1) for _ in range(3))
    t_all = min(run(steps + 1) for _ in range(3))
    if t_all <= t_one:
        # Timing noise larger than the decode itself (a tiny model on a busy CPU): the whole call per token is
        # an upper bound that is never negative.
        return t_all * 1e3 / (steps + 1)
    return (t_all - t_one) * 1e3 / steps


def main(argv: list[str] | None = None) -> list[dict]:
    ap = bench_parser(__doc__, "tiny model on the CPU: exercises the code paths")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,5,16)")
    ap.add_argument("--contexts", default=None, help="comma-separated prompt lengths (default 512,2048)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--hf-compile", action="store_true", help="torch.compile transformers' forward")
    args = parse_bench_args(ap, argv, cpu_for_smoke)

    smoke = args.smoke
    device = args.device
    cfg = SMOKE if smoke else LLAMA2_7B
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    batches = [int(b) for b in (args.batches or ("1,2" if smoke else "1,5,16")).split(",")]
    contexts = [int(c) for c in (args.contexts or ("16,48" if smoke else "512,2048")).split(",")]
    steps = args.steps or (3 if smoke else 64)
    warmup = 1 if smoke else 8
    branch_prompt, branch_passage = (12, 20) if smoke else (60, 150)
    results: list[dict] = []
    autosave("decode", device, results, args.out)
    tokenizer = bench_tokenizer(cfg)

    bandwidth = copy_bandwidth_gbps(device, nbytes=(64 << 20) if smoke else (1 << 30))
    results.append({"metric": "copy_bandwidth", "value": bandwidth, "unit": "GB/s", "config": {}})
    kv_tok = kv_bytes_per_token(cfg, dtype)
    max_tokens = max(batches) * (max(contexts) + steps + warmup + 32)
    kv_budget = int(max_tokens * kv_tok * 1.1) + 64 * 16 * kv_tok
    max_batched = max(4096, max(batches) * max(contexts))

    def add(metric: str, value: float, unit: str, **config) -> None:
        record(results, metric, value, unit, **config)

    def sweep(model, label: str) -> dict:
        weights = weight_bytes_per_token(model)
        add("weight_bytes_per_token", float(weights), "bytes", dtype=label)
        measured = {}
        modes = [False, True] if device.startswith("cuda") else [True]  # graphs exist on CUDA only
        for eager in modes:
            engine = make_engine(model, tokenizer, kv_budget, max_batched, eager)
            graphs = "off" if eager else "on"
            overlap = engine.overlap
            stepping = "overlapped" if overlap else "plain"
            for b in batches:
                for c in contexts:
                    ms = decode_step_ms(engine, b, c, steps, warmup, seed=b * 7919 + c)
                    floor_ms = (weights + b * (c + steps / 2) * kv_tok) / (bandwidth * 1e9) * 1e3
                    add("decode_ms_per_step", ms, "ms", dtype=label, batch=b, context=c, cuda_graphs=graphs,
                        steps=stepping)
                    add("decode_tokens_per_s", b * 1e3 / ms, "tokens/s", dtype=label, batch=b, context=c,
                        cuda_graphs=graphs, steps=stepping)
                    add("decode_floor_fraction", floor_ms / ms, "fraction", dtype=label, batch=b, context=c,
                        cuda_graphs=graphs, steps=stepping)
                    measured[(b, c, eager)] = ms
            if eager == modes[0]:
                # The same settings with the host's step work overlapped with the device's, and without.
                b, c = batches[0], contexts[0]
                flipped = make_engine(model, tokenizer, kv_budget, max_batched, eager, overlap=not overlap)
                other = decode_step_ms(flipped, b, c, steps, warmup, seed=b * 7919 + c)
                del flipped
                gc.collect()
                add("decode_ms_per_step", other, "ms", dtype=label, batch=b, context=c, cuda_graphs=graphs,
                    steps="plain" if overlap else "overlapped")
                with_, without = (measured[(b, c, eager)], other) if overlap else (other, measured[(b, c, eager)])
                measured["overlap_speedup"] = without / with_
            if eager == modes[0]:
                one = branch_step_ms(engine, 1, branch_prompt, branch_passage, steps, warmup, seed=1)
                five = branch_step_ms(engine, 5, branch_prompt, branch_passage, steps, warmup, seed=1)
                add("branch_step_ms", one, "ms", dtype=label, branches=1, cuda_graphs=graphs)
                add("branch_step_ms", five, "ms", dtype=label, branches=5, cuda_graphs=graphs)
                measured["branch5_ratio"] = five / one
            del engine
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        return measured

    model = random_llama(cfg, device, dtype, seed=0)
    fp16 = sweep(model, "fp16" if dtype == torch.float16 else "fp32")
    hf_ms = {}
    if not args.no_hf:
        hf = if_importable(lambda: hf_sharing_weights(model, cfg), "transformers")
        if hf is not None:
            compiled = False
            if args.hf_compile:
                try:
                    hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
                    compiled = True
                except Exception as e:  # noqa: BLE001 - any failure means we measure it uncompiled
                    print(f"torch.compile failed on transformers ({e}); running it eagerly", flush=True)
            for b in batches:
                for c in contexts:
                    ms = hf_decode_ms(hf, b, c, steps, device, seed=b + c)
                    hf_ms[(b, c)] = ms
                    add("hf_decode_ms_per_token", ms, "ms", dtype="fp16" if dtype == torch.float16 else "fp32",
                        batch=b, context=c, compiled=compiled)
                    add("hf_decode_tokens_per_s", b * 1e3 / ms, "tokens/s", batch=b, context=c, compiled=compiled)
            del hf
            gc.collect()

    # Quantizes the same weights in place: the FP16 copy is given up here.
    from selfrag_engine.layers.fp8_linear import replace_linears_with_fp8
    replace_linears_with_fp8(model, quantize_existing=True)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    fp8 = sweep(model, "fp8")

    graphed = not device.startswith("cuda")  # on the CPU there is only the eager path
    b1, c0 = batches[0], contexts[0]
    ms = fp8[(b1, c0, graphed)]
    floor_ms = (weight_bytes_per_token(model) + b1 * (c0 + steps / 2) * kv_tok) / (bandwidth * 1e9) * 1e3
    add("decode_fp8_bs1_tokens_per_s", b1 * 1e3 / ms, "tokens/s", batch=b1, context=c0)
    add("decode_fp8_bs1_floor_fraction", floor_ms / ms, "fraction", batch=b1, context=c0)
    if (b1, c0) in hf_ms:
        add("decode_speedup_vs_transformers", hf_ms[(b1, c0)] / ms, "x", batch=b1, context=c0,
            ours="fp8", transformers="fp16" if dtype == torch.float16 else "fp32")
    add("branch5_step_cost_ratio", fp8["branch5_ratio"], "x", dtype="fp8", prompt=branch_prompt,
        passage=branch_passage)
    if "overlap_speedup" in fp8:
        add("decode_overlap_speedup", fp8["overlap_speedup"], "x", dtype="fp8", batch=b1, context=c0,
            cuda_graphs="off" if graphed else "on")
    # Speculation in rows of its own, after the headline figures: FP8, batch 1, the default draft length.
    spec = make_engine(model, tokenizer, kv_budget, max_batched, eager=False, num_draft_tokens=SPEC_DRAFT_TOKENS)
    before = spec.speculation_stats()
    spec_ms = decode_step_ms(spec, b1, c0, steps, warmup, seed=b1 * 7919 + c0)
    after = spec.speculation_stats()
    delta = {k: after[k] - before[k] for k in ("forward_passes", "verify_passes", "tokens", "drafted", "accepted")}
    spec_config = dict(dtype="fp8", batch=b1, context=c0, num_draft_tokens=SPEC_DRAFT_TOKENS, weights="random")
    add("spec_decode_ms_per_step", spec_ms, "ms", **spec_config)
    add("spec_tokens_per_step", delta["tokens"] / max(delta["forward_passes"], 1.0), "tokens", **spec_config)
    add("spec_accepted_per_verify", delta["accepted"] / max(delta["verify_passes"], 1.0), "tokens", **spec_config)
    del spec
    del fp16

    def plot(path: Path) -> None:
        plt = pyplot()
        rows = [r for r in results if r["metric"] in ("decode_tokens_per_s", "hf_decode_tokens_per_s")]
        labels = [f"{'hf' if r['metric'].startswith('hf') else r['config'].get('dtype')}"
                  f"{'' if r['metric'].startswith('hf') else '/g-' + r['config']['cuda_graphs']}"
                  f"\nb{r['config']['batch']} c{r['config']['context']}" for r in rows]
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows)), 4))
        ax.bar(range(len(rows)), [r["value"] for r in rows])
        ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
        ax.set_ylabel("tokens/s")
        ax.set_title("decode throughput")
        save_figure(fig, path)

    write_results("decode", device, results, args.out, plot)
    return results


if __name__ == "__main__":
    main()
