"""What an FP8 KV cache (`kv_cache_dtype="fp8"`: e4m3 keys and values, static power-of-two scales per layer and
kv head bounded from the weights) changes, against the full-precision cache, in one run on the CPU:

  greedy        held-out world questions and no-fact instructions of the embedded tiny Self-RAG model: the
                full-precision engine decodes greedily; both engines score prompt + that continuation
                (teacher forcing) and their argmax are compared at every position (kv_fp8_greedy_agreement);
                the free-running greedy outputs are compared whole too. Beside it the same with scales fitted
                to those very prompts (per-head amax / 448, any real number): the tightest static rule, to
                tell the scale's share of the error from e4m3's own rounding.
  decisions     Self-RAG over held-out questions with K=5 passages, the short form in both flavours (paper,
                released) and the long form: retrieval decisions, best-branch choices, answers and long-form
                citations, each compared between the two caches (kv_fp8_selfrag_decision_agreement: decisions
                and choices; the answers beside it).
  layer         one Llama-2-7B-shaped attention layer with random weights (N(0, 0.02), the norm's weight near
                1) at contexts 512 and 4096: attention logits (q.k / sqrt(d)) and the layer's output through
                an FP8 pool against the fp16 pool, for the last 16 positions of the context.
  scales        how far real keys and values sit below the weight bound (the scale's headroom).
  bytes         K/V bytes one decode step reads for K = 5 and 10 branches at contexts 512 and 4096, fp16
                against FP8, counted from pools allocated at Llama-2-7B shapes, scales included
                (kv_bytes_per_step_ratio: the largest ratio of the four).

    python bench/kv_fp8.py                      # bench/results/kv_fp8-cpu-<date>.{json,md,png}
    python bench/kv_fp8.py --smoke --out DIR    # few questions, small layer (CI)
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_parser, parse_bench_args, pyplot, record, save_figure, write_results  # noqa: E402
from bench.workload import LLAMA2_7B, random_llama  # noqa: E402
from selfrag_engine.config import LlamaConfig  # noqa: E402
from selfrag_engine.engine.kv_cache import allocate_kv_caches  # noqa: E402
from selfrag_engine.engine.llm_engine import Engine  # noqa: E402
from selfrag_engine.engine.sampling_params import SamplingParams  # noqa: E402
from selfrag_engine.layers.attention import FP8_KV_DTYPE, dequantize_kv, quantize_kv  # noqa: E402
from selfrag_engine.models.kv_scales import fp8_kv_scales, kv_bounds  # noqa: E402
from selfrag_engine.models.llama import apply_rotary  # noqa: E402
from selfrag_engine.retrieval.passages import Passage  # noqa: E402
from selfrag_engine.selfrag.long_form import LongFormSelfRAG  # noqa: E402
from selfrag_engine.selfrag.prompts import format_prompt  # noqa: E402
from selfrag_engine.selfrag.scoring import ScoringConfig  # noqa: E402
from selfrag_engine.selfrag.short_form import SelfRAG  # noqa: E402
from selfrag_engine.tiny.assets import default_model_dir  # noqa: E402
from selfrag_engine.tiny.evaluate import instruction_cases, world_and_split, world_cases  # noqa: E402


# ---- the embedded model -----------------------------------------------------------------------------------


def held_out(n_questions: int, n_instructions: int) -> tuple[list[str], list[list[Passage]], list[str]]:
    """(held-out world questions, their K=5 passages, held-out no-fact instructions)."""
    world, split = world_and_split()
    cases = world_cases(world, split, n_questions, seed=1)
    passages = [[Passage(p.title, p.text, p.id) for p in c.passages] for c in cases]
    instr = [ex.instruction for ex, _ in instruction_cases(world, split, n_instructions, seed=1)]
    return [c.question.text for c in cases], passages, instr


def greedy(ref: Engine, others: list[Engine], prompts: list[str], max_tokens: int) -> list[dict[str, float]]:
    """For each engine of `others`, against `ref`: teacher-forced argmax agreement over ref's greedy
    continuations, whole free-running outputs equal, and the logits' relative error."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, skip_special_tokens=False)
    ref_out = ref.generate(prompts, params)
    stats = []
    for other in others:
        agree = total = same_outputs = 0
        num = den = 0.0
        for prompt, a_out, b_out in zip(prompts, ref_out, other.generate(prompts, params)):
            same_outputs += a_out.token_ids == b_out.token_ids
            ids = ref.tokenizer.encode(prompt) + list(a_out.token_ids)
            p = len(ids) - len(a_out.token_ids) - 1
            a, b = ref.score(ids)[p:-1].double(), other.score(ids)[p:-1].double()
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[0]
            num += float(((b - a) ** 2).sum())
            den += float((a ** 2).sum())
        stats.append({"agreement": agree / total, "positions": total, "same_outputs": same_outputs / len(prompts),
                      "logits_rel_err": math.sqrt(num / den)})
    return stats


def short_form(ref: Engine, fp8: Engine, questions: list[str], passages: list[list[Passage]], compat: str,
               max_new_tokens: int) -> dict[str, list[bool]]:
    def rag(engine: Engine) -> SelfRAG:
        scoring = ScoringConfig.paper() if compat == "paper" else ScoringConfig.released(form="short", threshold=0.2)
        return SelfRAG(engine, scoring=scoring, max_new_tokens=max_new_tokens, compat=compat)

    out: dict[str, list[bool]] = {"retrieval": [], "best_branch": [], "answer": []}
    for i in range(0, len(questions), 16):
        qs, ps = questions[i:i + 16], passages[i:i + 16]
        for a, b in zip(rag(ref).answer_batch(qs, ps, mode="adaptive"), rag(fp8).answer_batch(qs, ps, mode="adaptive")):
            out["retrieval"].append(a.retrieved == b.retrieved)
            if a.retrieved and b.retrieved:
                out["best_branch"].append(a.best == b.best)
            out["answer"].append(a.answer == b.answer)
    return out


def long_form(ref: Engine, fp8: Engine, questions: list[str], passages: list[list[Passage]],
              max_new_tokens: int) -> dict[str, list[bool]]:
    def rag(engine: Engine) -> LongFormSelfRAG:
        return LongFormSelfRAG(engine, max_new_tokens=max_new_tokens, beam_width=2, max_depth=3)

    out: dict[str, list[bool]] = {"retrieval": [], "citations": [], "answer": []}
    for i in range(0, len(questions), 8):
        qs, ps = questions[i:i + 8], passages[i:i + 8]
        for a, b in zip(rag(ref).answer_batch(qs, ps), rag(fp8).answer_batch(qs, ps)):
            out["retrieval"].append(a.retrieved == b.retrieved)
            out["citations"].append([c and c.id for c in a.citations] == [c and c.id for c in b.citations])
            out["answer"].append(a.answer == b.answer)
    return out


def observed_amax(engine: Engine, prompts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, float32 [kv_heads]: the largest |k| (after rotary, whatever the position) and |v| that
    `prompts` and 8 greedy tokens of each produce."""
    seen = [(torch.zeros(engine.config.num_key_value_heads), torch.zeros(engine.config.num_key_value_heads))
            for _ in engine.kv_caches]
    hooks = []
    for layer, s in zip(engine.model.model.layers, seen):
        attn = layer.self_attn

        def hook(module, args, out, s=s, attn=attn):
            q_rows, kv_rows, _ = attn.qkv_sizes
            t = out.shape[0]
            k = out[:, q_rows:q_rows + kv_rows].reshape(t, attn.num_kv_heads, attn.head_dim)
            v = out[:, q_rows + kv_rows:].reshape(t, attn.num_kv_heads, attn.head_dim)
            # Rotary preserves each pair's norm: the pair norm bounds |k| at every position.
            half = attn.head_dim // 2
            k = torch.hypot(k[..., :half], k[..., half:])
            s[0].copy_(torch.maximum(s[0], k.abs().amax((0, 2)).float()))
            s[1].copy_(torch.maximum(s[1], v.abs().amax((0, 2)).float()))
        hooks.append(attn.qkv_proj.register_forward_hook(hook))
    try:
        engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0))
    finally:
        for h in hooks:
            h.remove()
    return seen


def headroom(engine: Engine, amax: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(median, smallest) over layers and heads of the weight bound / the largest |k| or |v| seen."""
    ratios = torch.cat([torch.cat([kb / k, vb / v]) for (kb, vb), (k, v) in zip(kv_bounds(engine.model), amax)])
    return float(ratios.median()), float(ratios.min())


def calibrate(engine: Engine, amax: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Replaces the weight-bound scales by amax / 448 of the prompts themselves (any real number, not a power of
    two): the tightest static per-head rule there is, fitted to the very inputs it is measured on."""
    for cache, (k, v) in zip(engine.kv_caches, amax):
        cache.k_scale, cache.v_scale = k.clamp(min=1e-6) / 448.0, v.clamp(min=1e-6) / 448.0


# ---- a Llama-2-7B-shaped layer ------------------------------------------------------------------------------


def layer_error(context: int, cfg: dict, queries: int = 16, seed: int = 0) -> dict[str, float]:
    """Attention of the last `queries` positions over `context` tokens of one random 7B-shaped layer, with K/V
    held in fp16 (the plain pool) and in FP8 (the bound's scales): attention-logit and output errors."""
    model = random_llama(dict(cfg, num_hidden_layers=1, vocab_size=64), "cpu", torch.float32, seed=seed)
    layer, config = model.model.layers[0], model.config
    heads, dim = config.num_attention_heads, config.head_dim
    g = torch.Generator().manual_seed(seed + context)
    x = torch.randn(context, config.hidden_size, generator=g)
    with torch.no_grad():
        qkv = layer.self_attn.qkv_proj(layer.input_layernorm(x))
        q, k, v = qkv.split(layer.self_attn.qkv_sizes, dim=-1)
        cos, sin = model.rope_cos[:context], model.rope_sin[:context]
        q = apply_rotary(q.reshape(context, heads, dim), cos, sin)[-queries:]
        k = apply_rotary(k.reshape(context, -1, dim), cos, sin)
        v = v.reshape(context, -1, dim)
        (k_scale, v_scale), = fp8_kv_scales(model)
        pools = {"fp16": (k.half().double(), v.half().double()),
                 "fp8": (dequantize_kv(quantize_kv(k, k_scale), k_scale).double(),
                         dequantize_kv(quantize_kv(v, v_scale), v_scale).double())}
        out = {}
        for name, (kk, vv) in pools.items():
            logits = torch.einsum("qhd,khd->hqk", q.double(), kk) / math.sqrt(dim)
            pos = torch.arange(context - queries, context)[:, None]
            logits = logits.masked_fill(torch.arange(context)[None, :] > pos, float("-inf"))
            o = torch.einsum("hqk,khd->qhd", torch.softmax(logits, -1), vv).reshape(queries, -1)
            out[name] = (logits, layer.self_attn.o_proj(o.float()).double())
    (l16, o16), (l8, o8) = out["fp16"], out["fp8"]
    finite = torch.isfinite(l16)
    return {"logit_max_abs_err": float((l8 - l16)[finite].abs().max()),
            "logit_rms": float(l16[finite].pow(2).mean().sqrt()),
            "output_rel_err": float((o8 - o16).norm() / o16.norm()),
            "k_amax_over_bound": float(k.abs().amax() / (k_scale.max() * 448)),
            "v_amax_over_bound": float(v.abs().amax() / (v_scale.max() * 448))}


# ---- bytes ----------------------------------------------------------------------------------------------------


def bytes_per_step(cfg: dict, dtype: torch.dtype, branches: int, context: int) -> int:
    """K/V bytes one decode step reads: every branch's whole context, every layer; an FP8 pool's scales once per
    branch and layer (each branch's programs load their heads' scales). Counted from pools allocated at `cfg`'s
    shapes (one block)."""
    config = LlamaConfig.from_dict(cfg)
    scales = None
    if dtype == FP8_KV_DTYPE:
        one = torch.ones(config.num_key_value_heads)
        scales = [(one, one)] * config.num_hidden_layers
    caches = allocate_kv_caches(config, 1, 1, dtype, torch.device("cpu"), scales)
    per_token = sum(c.k.nbytes + c.v.nbytes for c in caches)
    scale_bytes = sum(c.k_scale.nbytes + c.v_scale.nbytes for c in caches if c.fp8)
    return branches * (context * per_token + scale_bytes)


# ---- run ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[dict]:
    ap = bench_parser(__doc__, "few questions, a small layer, short contexts")
    ap.add_argument("--questions", type=int, default=None, help="held-out world questions")
    ap.add_argument("--long-questions", type=int, default=None, help="of those, how many the long form answers")
    args = parse_bench_args(ap, argv, lambda smoke: "cpu")
    n_q = args.questions or (3 if args.smoke else 120)
    n_long = args.long_questions or (1 if args.smoke else 24)
    n_instr = 2 if args.smoke else 40
    max_new = 8 if args.smoke else 48
    torch.manual_seed(0)
    path = default_model_dir()
    ref = Engine.from_pretrained(path, device="cpu", progress=False)
    fp8 = Engine.from_pretrained(path, device="cpu", progress=False, kv_cache_dtype="fp8")
    model_cfg = {"model": path.name, "dtype": "float32", "kv_scales": "weight bound, powers of two"}
    results: list[dict] = []

    questions, passages, instructions = held_out(n_q, n_instr)
    prompts = [format_prompt(q) for q in questions + instructions]
    # The tightest static rule for comparison: per-head amax of these very prompts.
    amax = observed_amax(fp8, prompts)
    fitted = Engine.from_pretrained(path, device="cpu", progress=False, kv_cache_dtype="fp8")
    calibrate(fitted, amax)
    g, g_fitted = greedy(ref, [fp8, fitted], prompts, max_new)
    record(results, "kv_fp8_greedy_agreement", g["agreement"], "fraction", positions=g["positions"],
           prompts=len(prompts), **model_cfg)
    record(results, "kv_fp8_greedy_same_outputs", g["same_outputs"], "fraction", prompts=len(prompts),
           max_tokens=max_new, **model_cfg)
    record(results, "kv_fp8_logits_rel_err", g["logits_rel_err"], "fraction", positions=g["positions"], **model_cfg)
    fitted_cfg = dict(model_cfg, kv_scales="per-head amax / 448 of these prompts (fitted to them)")
    record(results, "kv_fp8_greedy_agreement_fitted_scales", g_fitted["agreement"], "fraction",
           positions=g_fitted["positions"], **fitted_cfg)
    record(results, "kv_fp8_logits_rel_err_fitted_scales", g_fitted["logits_rel_err"], "fraction", **fitted_cfg)

    decisions: list[bool] = []
    by_part: dict[str, float] = {}
    for compat in ("paper", "released"):
        got = short_form(ref, fp8, questions, passages, compat, max_new)
        for what, same in got.items():
            by_part[f"short {compat}: {what}"] = sum(same) / max(1, len(same))
            record(results, f"kv_fp8_short_{compat}_{what}_agreement", sum(same) / max(1, len(same)), "fraction",
                   cases=len(same), **model_cfg)
        decisions += got["retrieval"] + got["best_branch"]
    got = long_form(ref, fp8, questions[:n_long], passages[:n_long], max_new * 2)
    for what, same in got.items():
        by_part[f"long: {what}"] = sum(same) / max(1, len(same))
        record(results, f"kv_fp8_long_{what}_agreement", sum(same) / max(1, len(same)), "fraction",
               cases=len(same), **model_cfg)
    decisions += got["retrieval"] + got["citations"]
    record(results, "kv_fp8_selfrag_decision_agreement", sum(decisions) / len(decisions), "fraction",
           decisions=len(decisions), what="short form (paper, released) retrieval decisions and best branches, "
           "long-form retrieval decisions and cited passages", **model_cfg)
    median_room, least_room = headroom(fp8, amax)
    record(results, "kv_fp8_scale_headroom_median", median_room, "x", what="weight bound / largest |k| or |v| "
           "seen, per layer and head", **model_cfg)
    record(results, "kv_fp8_scale_headroom_min", least_room, "x", **model_cfg)

    layer_cfg = LLAMA2_7B if not args.smoke else dict(LLAMA2_7B, hidden_size=256, num_attention_heads=2,
                                                      num_key_value_heads=2, intermediate_size=256)
    layer_rows = []
    for context in ((64, 256) if args.smoke else (512, 4096)):
        e = layer_error(context, layer_cfg)
        layer_rows.append((context, e))
        shape = {"shape": "llama2-7b layer" if not args.smoke else "small layer", "context": context,
                 "queries": 16, "weights": "N(0, 0.02) random"}
        record(results, "kv_fp8_attention_logit_max_abs_err", e["logit_max_abs_err"], "logit",
               logit_rms=round(e["logit_rms"], 4), **shape)
        record(results, "kv_fp8_layer_output_rel_err", e["output_rel_err"], "fraction",
               k_amax_over_bound=round(e["k_amax_over_bound"], 4), v_amax_over_bound=round(e["v_amax_over_bound"], 4),
               **shape)

    ratios = []
    for branches in (5, 10):
        for context in (512, 4096):
            fp16 = bytes_per_step(LLAMA2_7B, torch.float16, branches, context)
            f8 = bytes_per_step(LLAMA2_7B, FP8_KV_DTYPE, branches, context)
            ratios.append((branches, context, fp16, f8))
            record(results, "kv_bytes_per_step_fp16_gb", fp16 / 1e9, "GB", branches=branches, context=context)
            record(results, "kv_bytes_per_step_fp8_gb", f8 / 1e9, "GB", branches=branches, context=context)
    worst = max(ratios, key=lambda r: r[3] / r[2])
    record(results, "kv_bytes_per_step_ratio", worst[3] / worst[2], "fraction", branches=worst[0],
           context=worst[1], what="FP8 (scales included) / fp16 K/V bytes read per decode step, the largest of "
           "K = 5, 10 and contexts 512, 4096", shape="llama2-7b")

    def plot(path: Path) -> None:
        plt = pyplot()
        fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 4))
        labels = ["greedy\n(teacher forced)"] + [k.replace(": ", "\n") for k in by_part]
        values = [g["agreement"]] + list(by_part.values())
        ax1.barh(range(len(values)), values, color="tab:blue")
        ax1.set_yticks(range(len(values)), labels, fontsize=7)
        ax1.axvline(0.99, color="tab:red", lw=0.8, label="target 0.99")
        ax1.set_xlim(min(0.8, min(values) - 0.02), 1.0)
        ax1.set_xlabel("agreement, FP8 KV vs full precision")
        ax1.legend(fontsize=7)
        ax2.bar([str(c) for c, _ in layer_rows], [e["output_rel_err"] for _, e in layer_rows], color="tab:orange")
        ax2.set_xlabel("context (tokens)")
        ax2.set_ylabel("attention layer output rel. error vs fp16")
        ax2.set_title("random 7B-shaped layer" if not args.smoke else "small layer", fontsize=9)
        xs = [f"K={b}\nctx {c}" for b, c, _, _ in ratios]
        ax3.bar([i - 0.2 for i in range(len(xs))], [r[2] / 1e9 for r in ratios], 0.4, label="fp16")
        ax3.bar([i + 0.2 for i in range(len(xs))], [r[3] / 1e9 for r in ratios], 0.4, label="FP8 + scales")
        ax3.set_xticks(range(len(xs)), xs, fontsize=8)
        ax3.set_ylabel("K/V GB read per decode step (7B)")
        ax3.legend(fontsize=8)
        save_figure(fig, path)

    write_results("kv_fp8", "cpu", results, args.out, plot)
    return results


if __name__ == "__main__":
    main()
