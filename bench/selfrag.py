"""One short-form Self-RAG query end to end: K=5 passages of ~150 tokens, a ~60-token prompt, 100 new tokens per
branch, on a Llama-2-7B-shaped model with random weights, in one run:

  ours          SelfRAG short form: the prompt prefilled once, its first position gives the retrieval decision,
                K branches forked off its cache (prefix shared), decoded in one batch, reflection
                probabilities from the fused sampler. Adaptive (the gate's threshold at 0, so it retrieves, as
                the reference's gate does in practice) and always-retrieve; each with the engine's default
                speculation and with speculation off (num_draft_tokens=0).
  reference     the same engine driven the way the reference script and its vLLM 0.2.6 do it: in adaptive mode
                a whole no-retrieval answer decoded first only to read its first position, asking for the
                log-probabilities of the whole vocabulary (32,016) at every step; then K independent full
                prompts (no prefix caching), 5,000 log-probabilities per step each; every step's top-n handed
                to the host and built into a {token id: log-probability} dict, as vLLM 0.2.6 returned them.
                Always-retrieve mode skips the draft, as the script does.
  transformers  the paper's algorithm on Hugging Face transformers (same weights): one forward for the
                decision, then `generate` over the K prompts, left-padded in one batch, scores output.

    python bench/selfrag.py                      # CUDA: bench/results/selfrag-<device>-<date>.{json,md,png}
    python bench/selfrag.py --smoke --out DIR    # tiny model on the CPU (CI): the code paths, not the numbers

In smoke mode the log-probability counts are capped at the tiny vocabulary. Time to first token is to the first
token of the answer branches. Headline metrics: selfrag_query_latency_ms and selfrag_ttft_ms of ours (adaptive),
selfrag_query_speedup_vs_reference (the reference over ours, per mode and per speculation setting),
selfrag_query_speedup_vs_transformers (always-retrieve).
"""
from __future__ import annotations

import dataclasses
import gc
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (autosave, bench_parser, cpu_for_smoke, hf_generate, if_importable, median_ms,  # noqa: E402
                          parse_bench_args, pyplot, record, save_figure, write_results)
from bench.workload import LLAMA2_7B, SMOKE, bench_tokenizer, hf_sharing_weights, random_llama  # noqa: E402
from selfrag_engine.engine.llm_engine import Engine  # noqa: E402
from selfrag_engine.engine.sampling_params import SamplingParams  # noqa: E402
from selfrag_engine.selfrag.prompts import format_passage, format_prompt  # noqa: E402
from selfrag_engine.retrieval.passages import Passage  # noqa: E402
from selfrag_engine.selfrag.scoring import ScoringConfig  # noqa: E402
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


# What the reference scripts ask vLLM for at every step (SELFRAG_REFERENCE.md): the short form's no-retrieval
# draft the whole vocabulary, each retrieval branch the top 5000, the long form the top 32000.
REFERENCE_DRAFT_LOGPROBS = 32016
REFERENCE_BRANCH_LOGPROBS = 5000
REFERENCE_LONG_FORM_LOGPROBS = 32000


def make_engine(model, tokenizer, prefix_caching: bool, kv_bytes: int, speculation: bool = True) -> Engine:
    """speculation False: the engine with speculative decoding off (num_draft_tokens=0); True: its default."""
    extra = {} if speculation else {"num_draft_tokens": 0}
    return Engine(model, tokenizer, kv_cache_bytes=kv_bytes, enable_prefix_caching=prefix_caching,
                  max_num_batched_tokens=8192, **extra)


def run_ours(engine: Engine, question: str, passages: list[Passage], max_new_tokens: int, mode: str) -> int:
    # Threshold 0: the adaptive gate retrieves, so both modes decode the K branches the reference decodes.
    scoring = dataclasses.replace(ScoringConfig.paper(), threshold=0.0)
    rag = SelfRAG(engine, scoring=scoring, max_new_tokens=max_new_tokens)
    answer = rag.answer(question, passages, mode=mode)
    if not answer.retrieved:
        raise RuntimeError("the gate did not retrieve at threshold 0; the comparison needs the K branches")
    return answer.num_generated_tokens


def reference_logprobs(vocab: int) -> tuple[int, int]:
    """(draft, branch) log-probability counts per step: the script's, capped at the model's vocabulary."""
    return min(REFERENCE_DRAFT_LOGPROBS, vocab), min(REFERENCE_BRANCH_LOGPROBS, vocab)


def run_reference_style(engine: Engine, question: str, passages: list[Passage], draft_tokens: int,
                        branch_tokens: int, mode: str) -> tuple[int, int]:
    """The reference script's order of work on our engine: in adaptive mode the draft, then K independent full
    prompts, every step's top-n log-probabilities returned as host dicts. Returns (generated tokens,
    log-probabilities handed back)."""
    tok = engine.tokenizer
    draft_n, branch_n = reference_logprobs(engine.config.vocab_size)
    prompt = format_prompt(question)
    outs = []
    if mode == "adaptive":
        outs += engine.generate([prompt], SamplingParams(max_tokens=draft_tokens, temperature=0.0,
                                                         logprobs=draft_n))
    full = [tok.encode(prompt + format_passage(p.title, p.text)) for p in passages]
    outs += engine.generate(full, SamplingParams(max_tokens=branch_tokens, temperature=0.0, logprobs=branch_n))
    return sum(len(o.token_ids) for o in outs), sum(len(d) for o in outs for d in o.logprobs)


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
        out = hf_generate(hf, input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
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
             "max_new_tokens": new_tokens, "vocab": cfg["vocab_size"], "dtype": str(dtype).removeprefix("torch.")}
    results: list[dict] = []
    autosave("selfrag", device, results, args.out)

    def add(metric: str, value: float, unit: str, **config) -> None:
        record(results, metric, value, unit, **shape, **config)

    def timed(fn):
        return median_ms(fn, device, repeats)

    model = random_llama(cfg, device, dtype, seed=0)
    kv_bytes = (64 << 20) if smoke else (16 << 30)
    draft_n, branch_n = reference_logprobs(cfg["vocab_size"])
    option = "num_draft_tokens"
    speculations = ("default", "off")

    def on_engine(prefix_caching: bool, run, speculation: bool = True):
        """Timings of run(engine, n) for the whole query (n = new_tokens) and to the first answer token (n = 1),
        on an engine of its own that is freed afterwards: one engine's KV pool at a time."""
        engine = make_engine(model, tokenizer, prefix_caching, kv_bytes, speculation)
        out = timed(lambda: run(engine, new_tokens)), timed(lambda: run(engine, 1))
        del engine
        gc.collect()
        return out

    ours: dict[tuple[str, str], float] = {}
    for mode in ("adaptive", "always"):
        for spec in speculations:
            (ms, tok_count), (ttft, _) = on_engine(
                True, lambda e, n, m=mode: run_ours(e, question, passages, n, m), speculation=spec == "default")
            ours[mode, spec] = ms
            add("selfrag_query_latency_ms", ms, "ms", impl="ours", mode=mode, speculation=spec,
                speculation_option=option, generated_tokens=tok_count)
            add("selfrag_ttft_ms", ttft, "ms", impl="ours", mode=mode, speculation=spec, speculation_option=option)
    for mode in ("adaptive", "always"):
        # The reference order of work, without prefix caching (vLLM 0.2.6 had none) and without speculation:
        # in adaptive mode its first answer token comes after the whole draft and the K prefills.
        (ms, (tok_count, returned)), (ttft, _) = on_engine(
            False, lambda e, n, m=mode: run_reference_style(e, question, passages, new_tokens, n, m),
            speculation=False)
        add("selfrag_query_latency_ms", ms, "ms", impl="reference_style", mode=mode, generated_tokens=tok_count,
            logprobs_returned=returned, draft_logprobs=draft_n if mode == "adaptive" else 0,
            branch_logprobs=branch_n)
        add("selfrag_ttft_ms", ttft, "ms", impl="reference_style", mode=mode)
        for spec in speculations:
            add("selfrag_query_speedup_vs_reference", ms / ours[mode, spec], "x", mode=mode, speculation=spec,
                speculation_option=option)
    if not args.no_hf:
        hf = if_importable(lambda: hf_sharing_weights(model, cfg), "transformers")
        if hf is not None:
            c_ms, c_tok = timed(lambda: run_transformers(hf, tokenizer, question, passages, new_tokens, device))
            c_ttft, _ = timed(lambda: run_transformers(hf, tokenizer, question, passages, 1, device))
            add("selfrag_query_latency_ms", c_ms, "ms", impl="transformers", mode="always", generated_tokens=c_tok)
            add("selfrag_ttft_ms", c_ttft, "ms", impl="transformers", mode="always")
            add("selfrag_query_speedup_vs_transformers", c_ms / ours["always", "default"], "x", mode="always",
                speculation="default", speculation_option=option)

    def plot(path: Path) -> None:
        fig, axes = pyplot().subplots(1, 2, figsize=(8, 3.5))
        for ax, metric in zip(axes, ("selfrag_query_latency_ms", "selfrag_ttft_ms")):
            rows = [r for r in results if r["metric"] == metric]
            labels = ["\n".join(str(r["config"][k]) for k in ("impl", "mode", "speculation") if k in r["config"])
                      for r in rows]
            ax.bar(range(len(rows)), [r["value"] for r in rows])
            ax.set_xticks(range(len(rows)), labels, fontsize=7)
            ax.set_title(metric)
            ax.set_ylabel("ms")
        save_figure(fig, path)

    write_results("selfrag", device, results, args.out, plot)
    return results


if __name__ == "__main__":
    main()
