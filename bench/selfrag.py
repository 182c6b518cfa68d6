"""One short-form Self-RAG query end to end: K=5 passages of ~150 tokens, a ~60-token prompt, 100 new tokens per
branch, on a Llama-2-7B-shaped model with random weights, three ways in one run:

  (a) ours        SelfRAG short form: the prompt prefilled once, its first position gives the retrieval
                  decision, K branches forked off its cache (prefix shared), decoded in one batch, reflection
                  probabilities from the fused sampler.
  (b) reference   the same engine driven the way the reference script does it: a whole no-retrieval answer
                  decoded first only to read its first position, then K independent full prompts (no prefix
                  caching), top-20 log-probabilities returned at every step. The reference asks vLLM for
                  5000 per step, so (b) is a lower bound of its cost.
  (c) transformers the paper's algorithm on Hugging Face transformers (same weights): one forward for the
                  decision, then `generate` over the K prompts, left-padded in one batch, scores output.

    python bench/selfrag.py                      # CUDA: bench/results/selfrag-<device>-<date>.{json,md,png}
    python bench/selfrag.py --smoke --out DIR    # tiny model on the CPU (CI): the code paths, not the numbers

Time to first token is to the first token of the answer branches. Headline metrics: selfrag_query_latency_ms
and selfrag_ttft_ms of (a), selfrag_query_speedup_vs_reference (b over a).
"""
from __future__ import annotations

import argparse
import gc
import inspect
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_results  # noqa: E402
from bench.workload import LLAMA2_7B, SMOKE, bench_tokenizer, hf_sharing_weights, random_llama  # noqa: E402
from selfrag_engine.engine.llm_engine import Engine  # noqa: E402
from selfrag_engine.engine.sampling_params import SamplingParams  # noqa: E402
from selfrag_engine.selfrag.prompts import format_passage, format_prompt  # noqa: E402
from selfrag_engine.selfrag.short_form import Passage, SelfRAG  # noqa: E402
from selfrag_engine.testing import _WORDS  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _text(tokenizer, rng: random.Random, num_tokens: int) -> str:
    """Words from the tokenizer's training vocabulary until the text encodes to about num_tokens tokens."""
    words: list[str] = []
    while len(tokenizer.encode(" ".join(words), add_bos=False)) < num_tokens:
        words.append(rng.choice(_WORDS))
    return " ".join(words)


def make_workload(tokenizer, prompt_tokens: int, passage_tokens: int, k: int, seed: int):
    rng = random.Random(seed)
    overhead = len(tokenizer.encode(format_prompt("x"))) - 1
    question = _text(tokenizer, rng, max(4, prompt_tokens - overhead)) + "?"
    passages = [Passage(title=_text(tokenizer, rng, 4).title(), text=_text(tokenizer, rng, passage_tokens - 8))
                for _ in range(k)]
    return question, passages


def make_engine(model, tokenizer, prefix_caching: bool, kv_bytes: int) -> Engine:
    kwargs = dict(kv_cache_bytes=kv_bytes, enable_prefix_caching=prefix_caching, max_num_batched_tokens=8192)
    return Engine(model, tokenizer, **{k: v for k, v in kwargs.items()
                                       if k in inspect.signature(Engine.__init__).parameters})


def run_ours(engine: Engine, question: str, passages: list[Passage], max_new_tokens: int) -> int:
    rag = SelfRAG(engine, max_new_tokens=max_new_tokens)
    answer = rag.answer(question, passages, mode="always")
    return answer.num_generated_tokens


def run_reference_style(engine: Engine, question: str, passages: list[Passage], draft_tokens: int,
                        branch_tokens: int) -> int:
    """The reference script's order of work on our engine: draft, then K independent full prompts."""
    tok = engine.tokenizer
    prompt = format_prompt(question)
    draft = engine.generate([prompt], SamplingParams(max_tokens=draft_tokens, temperature=0.0, logprobs=20))[0]
    full = [tok.encode(prompt + format_passage(p.title, p.text)) for p in passages]
    outs = engine.generate(full, SamplingParams(max_tokens=branch_tokens, temperature=0.0, logprobs=20))
    return len(draft.token_ids) + sum(len(o.token_ids) for o in outs)


def _left_pad(seqs: list[list[int]], pad: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def run_transformers(hf, tokenizer, question: str, passages: list[Passage], max_new_tokens: int,
                     device: str) -> int:
    """The paper's short form on transformers: decision from one forward, then the K branches in a batch with
    per-step scores (from which the critique reads its positions)."""
    prompt = tokenizer.encode(format_prompt(question))
    ref = tokenizer.reflection_token_ids().groups()
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt], device=device)).logits[0, -1].float()
        probs = logits.softmax(-1)
        p_ret, p_no = float(probs[ref["retrieval"][0]]), float(probs[ref["retrieval"][1]])
        _ = p_ret / max(p_ret + p_no, 1e-30)
        seqs = [prompt + tokenizer.encode(format_passage(p.title, p.text), add_bos=False) for p in passages]
        ids, mask = _left_pad(seqs, 0, device)
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                          output_scores=True, return_dict_in_generate=True, pad_token_id=0,
                          eos_token_id=tokenizer.eos_id)
        # Group probabilities at every step, as the critique needs them.
        flat = [t for g in ref.values() for t in g]
        for step_scores in out.scores:
            step_scores.float().softmax(-1)[:, flat].cpu()
    return int((out.sequences[:, ids.shape[1]:] != 0).sum())


def timed(fn, device: str, repeats: int) -> tuple[float, int]:
    """(median milliseconds, tokens generated by the last run) over `repeats` runs after one warm-up."""
    fn()
    times, tokens = [], 0
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        tokens = fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), tokens


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU: exercises the code paths")
    ap.add_argument("--device", default=None)
    ap.add_argument("--ndocs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    args = ap.parse_args(argv)

    smoke = args.smoke
    device = args.device or ("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    cfg = SMOKE if smoke else LLAMA2_7B
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    prompt_tokens, passage_tokens, new_tokens = (20, 24, 6) if smoke else (60, 150, 100)
    repeats = args.repeats or (1 if smoke else 5)
    k = args.ndocs
    tokenizer = bench_tokenizer(cfg)
    question, passages = make_workload(tokenizer, prompt_tokens, passage_tokens, k, seed=0)
    n_prompt = len(tokenizer.encode(format_prompt(question)))
    n_passage = [len(tokenizer.encode(format_passage(p.title, p.text), add_bos=False)) for p in passages]
    shape = {"k": k, "prompt_tokens": n_prompt, "passage_tokens": round(statistics.mean(n_passage)),
             "max_new_tokens": new_tokens, "dtype": str(dtype).removeprefix("torch.")}
    results: list[dict] = []

    def add(metric: str, value: float, unit: str, **config) -> None:
        results.append({"metric": metric, "value": value, "unit": unit, "config": {**shape, **config}})
        print(f"{metric:38s} {value:12.4g} {unit:6s} {config}", flush=True)

    model = random_llama(cfg, device, dtype, seed=0)
    kv_bytes = (64 << 20) if smoke else (16 << 30)
    ours = make_engine(model, tokenizer, True, kv_bytes)
    a_ms, a_tok = timed(lambda: run_ours(ours, question, passages, new_tokens), device, repeats)
    a_ttft, _ = timed(lambda: run_ours(ours, question, passages, 1), device, repeats)
    del ours
    gc.collect()
    ref = make_engine(model, tokenizer, False, kv_bytes)
    b_ms, b_tok = timed(lambda: run_reference_style(ref, question, passages, new_tokens, new_tokens), device,
                        repeats)
    # Its first answer token comes after the whole draft and the K prefills.
    b_ttft, _ = timed(lambda: run_reference_style(ref, question, passages, new_tokens, 1), device, repeats)
    del ref
    gc.collect()
    add("selfrag_query_latency_ms", a_ms, "ms", impl="ours", generated_tokens=a_tok)
    add("selfrag_ttft_ms", a_ttft, "ms", impl="ours")
    add("selfrag_query_latency_ms", b_ms, "ms", impl="reference_style", generated_tokens=b_tok)
    add("selfrag_ttft_ms", b_ttft, "ms", impl="reference_style")
    add("selfrag_query_speedup_vs_reference", b_ms / a_ms, "x")
    if not args.no_hf:
        try:
            hf = hf_sharing_weights(model, cfg)
        except ImportError as e:
            print(f"transformers is not available ({e}); skipping it", flush=True)
            hf = None
        if hf is not None:
            c_ms, c_tok = timed(lambda: run_transformers(hf, tokenizer, question, passages, new_tokens, device),
                                device, repeats)
            c_ttft, _ = timed(lambda: run_transformers(hf, tokenizer, question, passages, 1, device), device,
                              repeats)
            add("selfrag_query_latency_ms", c_ms, "ms", impl="transformers", generated_tokens=c_tok)
            add("selfrag_ttft_ms", c_ttft, "ms", impl="transformers")
            add("selfrag_query_speedup_vs_transformers", c_ms / a_ms, "x")

    def plot(path: Path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
        for ax, metric in zip(axes, ("selfrag_query_latency_ms", "selfrag_ttft_ms")):
            rows = [r for r in results if r["metric"] == metric]
            ax.bar([r["config"]["impl"] for r in rows], [r["value"] for r in rows])
            ax.set_title(metric)
            ax.set_ylabel("ms")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    path = write_results("selfrag", device, results, Path(args.out) if args.out else None, plot)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
