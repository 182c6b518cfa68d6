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

import gc
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (bench_parser, cpu_for_smoke, if_importable, median_ms, parse_bench_args,  # noqa: E402
                          pyplot, record, save_figure, write_results)
from bench.workload import LLAMA2_7B, SMOKE, bench_tokenizer, hf_sharing_weights, random_llama  # noqa: E402
from selfrag_engine.engine.llm_engine import Engine  # noqa: E402
from selfrag_engine.engine.sampling_params import SamplingParams  # noqa: E402
from selfrag_engine.selfrag.prompts import format_passage, format_prompt  # noqa: E402
from selfrag_engine.retrieval.passages import Passage  # noqa: E402
from selfrag_engine.selfrag.short_form import SelfRAG  # noqa: E402
from selfrag_engine.testing import WORDS  # noqa: E402


def _text(tokenizer, rng: random.Random, num_tokens: int) -> str:
    """Words from the tokenizer's training vocabulary until the text encodes to about num_tokens tokens."""
    words: list[str] = []
    while len(tokenizer.encode(" ".join(words), add_bos=False)) < num_tokens:
        words.append(rng.choice(WORDS))
    return " ".join(words)


def make_workload(tokenizer, prompt_tokens: int, passage_tokens: int, k: int, seed: int):
    rng = random.Random(seed)
    overhead = len(tokenizer.encode(format_prompt("x"))) - 1
    question = _text(tokenizer, rng, max(4, prompt_tokens - overhead)) + "?"
    passages = [Passage(title=_text(tokenizer, rng, 4).title(), text=_text(tokenizer, rng, passage_tokens - 8))
                for _ in range(k)]
    return question, passages


def make_engine(model, tokenizer, prefix_caching: bool, kv_bytes: int) -> Engine:
    return Engine(model, tokenizer, kv_cache_bytes=kv_bytes, enable_prefix_caching=prefix_caching,
                  max_num_batched_tokens=8192)


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


def main(argv: list[str] | None = None) -> list[dict]:
    ap = bench_parser(__doc__, "tiny model on the CPU: exercises the code paths")
    ap.add_argument("--ndocs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    args = parse_bench_args(ap, argv, cpu_for_smoke)

    smoke = args.smoke
    device = args.device
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
        record(results, metric, value, unit, **shape, **config)

    def timed(fn) -> tuple[float, int]:
        return median_ms(fn, device, repeats)

    model = random_llama(cfg, device, dtype, seed=0)
    kv_bytes = (64 << 20) if smoke else (16 << 30)
    def on_engine(prefix_caching: bool, run) -> tuple[tuple[float, int], tuple[float, int]]:
        """Timings of run(engine, n) for the whole query (n = new_tokens) and to the first answer token (n = 1),
        on an engine of its own that is freed afterwards: one engine's KV pool at a time."""
        engine = make_engine(model, tokenizer, prefix_caching, kv_bytes)
        return timed(lambda: run(engine, new_tokens)), timed(lambda: run(engine, 1))

    (a_ms, a_tok), (a_ttft, _) = on_engine(True, lambda e, n: run_ours(e, question, passages, n))
    gc.collect()
    # The reference order of work, without prefix caching: its first answer token comes after the whole draft
    # and the K prefills.
    (b_ms, b_tok), (b_ttft, _) = on_engine(
        False, lambda e, n: run_reference_style(e, question, passages, new_tokens, n))
    gc.collect()
    add("selfrag_query_latency_ms", a_ms, "ms", impl="ours", generated_tokens=a_tok)
    add("selfrag_ttft_ms", a_ttft, "ms", impl="ours")
    add("selfrag_query_latency_ms", b_ms, "ms", impl="reference_style", generated_tokens=b_tok)
    add("selfrag_ttft_ms", b_ttft, "ms", impl="reference_style")
    add("selfrag_query_speedup_vs_reference", b_ms / a_ms, "x")
    if not args.no_hf:
        hf = if_importable(lambda: hf_sharing_weights(model, cfg), "transformers")
        if hf is not None:
            c_ms, c_tok = timed(lambda: run_transformers(hf, tokenizer, question, passages, new_tokens, device))
            c_ttft, _ = timed(lambda: run_transformers(hf, tokenizer, question, passages, 1, device))
            add("selfrag_query_latency_ms", c_ms, "ms", impl="transformers", generated_tokens=c_tok)
            add("selfrag_ttft_ms", c_ttft, "ms", impl="transformers")
            add("selfrag_query_speedup_vs_transformers", c_ms / a_ms, "x")

    def plot(path: Path) -> None:
        fig, axes = pyplot().subplots(1, 2, figsize=(8, 3.5))
        for ax, metric in zip(axes, ("selfrag_query_latency_ms", "selfrag_ttft_ms")):
            rows = [r for r in results if r["metric"] == metric]
            ax.bar([r["config"]["impl"] for r in rows], [r["value"] for r in rows])
            ax.set_title(metric)
            ax.set_ylabel("ms")
        save_figure(fig, path)

    write_results("selfrag", device, results, args.out, plot)
    return results


if __name__ == "__main__":
    main()
