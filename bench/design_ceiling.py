"""The analytic lower bound of one Self-RAG query's time, our order of work against the reference's, at
Llama-2-7B shapes on an H200: a count of the bytes each way must move, not a timing (device "cpu").

A decode step of a 7B model is bound by memory traffic: every forward pass reads the weights once (FP8 linears,
the bf16 embedding-sized head), and every row reads its context's K/V. So each way's time is bounded below by

    (forward passes x weight bytes + K/V bytes read and written + logits bytes) / HBM bandwidth
    + device-to-host bytes / host-link bandwidth

and the ratio of the two bounds is what the design can win at best. Counted for one short-form query (K passages
of ~150 tokens, a ~55-token prompt, 100 new tokens):

  reference (run_short_form.py on vLLM 0.2.6, no prefix caching, no speculation): in adaptive mode a whole
      no-retrieval draft at batch 1 asking for the vocabulary's log-probabilities at every step, then one
      batch of K full prompts (prompt + passage) each asking for 5000; always-retrieve skips the draft. Each
      step's logits go through a log-softmax and a top-k on the device, and the top-n (float32 value, int64
      id) is copied to the host, where a {token id: log-probability} dict is built per row and step.
  ours: the prompt prefilled once (its first position is the gate), the K passages prefilled as one batch of
      forks sharing the prompt's cache, the K branches decoded together; the shared prompt's K/V read once
      per step (cascade attention); speculative decoding makes `passes_per_token` forward passes per
      generated token, measured by bench/spec.py when its results exist (else 1.0, said in the config).
  long form (always-retrieve, as the README runs it): the released script never expands beyond depth 1, so
      it decodes K full answers with 32000 log-probabilities per step; ours runs the paper's tree: at each of
      `segments` depths, every kept node (1, then `beam_width`) forks K children that prefill their passage
      and decode one segment together.

The headline leaves the reference's host-side dict building out (a strict lower bound of our advantage); a
second row adds it at a per-entry cost timed on this machine, said in its config.

Longer contexts and more branches, with an FP8 KV cache: the same counts for K = 5 and 10 passages with the
context of every branch ending at 512 and 4096 tokens (the passages made long enough), our side with the
fp16 cache and with the FP8 one (one byte a K/V element, and each row's per-head scales read once per layer
and pass); the reference keeps its fp16 cache (vLLM 0.2.6 has no FP8 one).
`selfrag_design_ceiling_by_shape_vs_reference` is the reference over ours at each shape and cache,
`selfrag_design_ceiling_fp8_kv_gain` ours with fp16 over ours with FP8.

    python bench/design_ceiling.py               # bench/results/design_ceiling-cpu-<date>.{json,md,png}
    python bench/design_ceiling.py --smoke --out DIR
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS_DIR, bench_parser, parse_bench_args, pyplot, record, save_figure, write_results  # noqa: E402
from bench.workload import LLAMA2_7B  # noqa: E402

# What the reference scripts ask vLLM for at every step (docs/SELFRAG.md).
REFERENCE_DRAFT_LOGPROBS = 32016
REFERENCE_BRANCH_LOGPROBS = 5000
REFERENCE_LONG_FORM_LOGPROBS = 32000
# vLLM 0.2.6 copies each step's top-k to the host as float32 values and int64 ids.
BYTES_PER_HOST_ENTRY = 4 + 8
# One read of the float32 logits by the sampler; vLLM's log-softmax reads and writes them and its top-k reads them.
OUR_LOGITS_PASSES = 1
REFERENCE_LOGITS_PASSES = 3


def weight_bytes(cfg: dict, linear_bytes: int = 1, head_bytes: int = 2) -> int:
    """Bytes one forward pass reads from the weights: the decoder's linears at `linear_bytes` a weight (FP8), the
    LM head at `head_bytes` (bf16); norms at bf16. The embedding table is read a row per token, not counted."""
    h, i, layers, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    linears = layers * (h * h + 2 * h * kv + h * h + 3 * h * i)
    norms = (2 * layers + 1) * h
    return linears * linear_bytes + v * h * head_bytes + norms * 2


def kv_bytes_per_token(cfg: dict, elem_bytes: int = 2) -> int:
    """K and V of one context token, every layer, at bf16 (elem_bytes 1: FP8)."""
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * elem_bytes


def kv_scale_bytes_per_row(cfg: dict) -> int:
    """An FP8 cache's float32 scales of K and V, one per layer and kv head, that a row's attention reads."""
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * 4


@dataclass(frozen=True)
class Shape:
    """What one query costs is counted from these."""
    weight_bytes: int           # read by every forward pass
    kv_bytes: int               # per context token
    vocab: int
    hbm_bytes_per_s: float
    link_bytes_per_s: float     # device to host
    k: int = 5
    prompt_tokens: int = 55
    passage_tokens: int = 150
    new_tokens: int = 100
    passes_per_token: float = 1.0
    beam_width: int = 2
    segments: int = 4           # long-form depths our tree decodes, new_tokens split among them
    draft_logprobs: int = REFERENCE_DRAFT_LOGPROBS
    branch_logprobs: int = REFERENCE_BRANCH_LOGPROBS
    long_form_logprobs: int = REFERENCE_LONG_FORM_LOGPROBS
    kv_scale_bytes: int = 0     # per row and pass: an FP8 cache's scales


@dataclass
class Work:
    """Counted work of one way of answering one query."""
    forwards: float = 0.0
    hbm_bytes: float = 0.0
    host_bytes: float = 0.0
    host_entries: float = 0.0

    def prefill(self, s: Shape, new_tokens: int) -> None:
        """One forward pass over `new_tokens` prompt tokens of any number of rows: the weights once, their K/V
        written (their attention reads stay on chip at these lengths)."""
        self.forwards += 1
        self.hbm_bytes += s.weight_bytes + new_tokens * s.kv_bytes

    def decode(self, s: Shape, contexts: list[int], steps: int, passes_per_token: float, logits_passes: int,
               logprobs: int = 0, shared: int = 0) -> None:
        """`steps` tokens for each row, row r starting from a context of contexts[r] tokens, the first `shared`
        of which every row holds in common and reads once per pass. Each pass reads the weights and the
        rows' contexts; each generated token writes its K/V and its logits are read `logits_passes` times;
        `logprobs` entries per row and step go to the host."""
        rows = len(contexts)
        passes = steps * passes_per_token
        # Context of row r at step j is contexts[r] + j; summed over the steps and rows.
        ctx = sum(c * steps + steps * (steps - 1) // 2 for c in contexts) - (rows - 1) * shared * steps
        self.forwards += passes
        self.hbm_bytes += passes * s.weight_bytes + passes_per_token * ctx * s.kv_bytes
        self.hbm_bytes += passes * rows * s.kv_scale_bytes
        self.hbm_bytes += rows * steps * (s.kv_bytes + logits_passes * s.vocab * 4)
        self.host_entries += rows * steps * logprobs
        self.host_bytes += rows * steps * logprobs * BYTES_PER_HOST_ENTRY

    def seconds(self, s: Shape, host_s_per_entry: float = 0.0) -> float:
        return (self.hbm_bytes / s.hbm_bytes_per_s + self.host_bytes / s.link_bytes_per_s
                + self.host_entries * host_s_per_entry)


def reference_short(s: Shape, mode: str) -> Work:
    w = Work()
    if mode == "adaptive":
        w.prefill(s, s.prompt_tokens)
        w.decode(s, [s.prompt_tokens], s.new_tokens, 1.0, REFERENCE_LOGITS_PASSES, min(s.draft_logprobs, s.vocab))
    full = s.prompt_tokens + s.passage_tokens
    w.prefill(s, s.k * full)
    w.decode(s, [full] * s.k, s.new_tokens, 1.0, REFERENCE_LOGITS_PASSES, min(s.branch_logprobs, s.vocab))
    return w


def ours_short(s: Shape, mode: str) -> Work:
    """Both modes prefill the prompt first: adaptive reads the gate there, always forks from its cache."""
    w = Work()
    w.prefill(s, s.prompt_tokens)
    w.prefill(s, s.k * s.passage_tokens)
    w.decode(s, [s.prompt_tokens + s.passage_tokens] * s.k, s.new_tokens, s.passes_per_token, OUR_LOGITS_PASSES,
             shared=s.prompt_tokens)
    return w


def reference_long(s: Shape) -> Work:
    w = Work()
    full = s.prompt_tokens + s.passage_tokens
    w.prefill(s, s.k * full)
    w.decode(s, [full] * s.k, s.new_tokens, 1.0, REFERENCE_LOGITS_PASSES, min(s.long_form_logprobs, s.vocab))
    return w


def ours_long(s: Shape) -> Work:
    """The paper's tree: depth d's nodes hold the prompt and d segments; each forks K children that prefill a
    passage and decode one segment (new_tokens split evenly, the remainder in the first segments)."""
    w = Work()
    w.prefill(s, s.prompt_tokens)
    done = 0
    for depth in range(s.segments):
        nodes = 1 if depth == 0 else s.beam_width
        seg = s.new_tokens // s.segments + (depth < s.new_tokens % s.segments)
        children = nodes * s.k
        w.prefill(s, children * s.passage_tokens)
        # A node's context is the prompt and its segments so far; its K children share it.
        node_ctx = s.prompt_tokens + done
        w.decode(s, [node_ctx + s.passage_tokens] * children, seg, s.passes_per_token, OUR_LOGITS_PASSES)
        w.hbm_bytes -= nodes * (s.k - 1) * node_ctx * seg * s.passes_per_token * s.kv_bytes
        done += seg
    return w


def measured_passes_per_token(results_dir: Path) -> tuple[float, str] | None:
    """bench/spec.py's forward passes per generated token from its newest CPU results, and the file's name; None
    when there are none."""
    files = sorted(results_dir.glob("spec-cpu-*.json"))
    for path in reversed(files):
        rows = [r for r in json.loads(path.read_text())["results"] if r["metric"] == "spec_forward_passes_per_token"]
        if rows:
            # The short form over every question kind, when the file breaks it down; else the first row.
            row = next((r for r in rows if r["config"].get("kind") in (None, "all")), rows[0])
            return float(row["value"]), path.name
    return None


def host_seconds_per_entry(entries: int = 200_000) -> float:
    """The host cost of one top-n entry, timed here the way vLLM 0.2.6 builds them: lists from the copied
    tensors, then a {token id: log-probability} dict."""
    import torch

    ids, vals = torch.arange(entries), torch.randn(entries)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        _ = {int(t): float(v) for t, v in zip(ids.tolist(), vals.tolist())}
        best = min(best, time.perf_counter() - t0)
    return best / entries


def main(argv: list[str] | None = None) -> list[dict]:
    ap = bench_parser(__doc__, "the same counts (they are cheap); smaller host timing")
    ap.add_argument("--hbm-tb-s", type=float, default=4.3, help="HBM bandwidth, TB/s (H200 measured copy)")
    ap.add_argument("--link-gb-s", type=float, default=55.0, help="device-to-host bandwidth, GB/s (PCIe 5 x16)")
    ap.add_argument("--passes-per-token", type=float, default=None, help="instead of bench/spec.py's")
    args = parse_bench_args(ap, argv, lambda smoke: "cpu")
    measured = ((args.passes_per_token, "command line") if args.passes_per_token is not None
                else measured_passes_per_token(RESULTS_DIR))
    settings = [("off", 1.0, "speculation off" if measured else
                 "speculation off: no bench/results/spec-cpu-*.json to measure it")]
    if measured:
        settings.append(("measured", *measured))
    base = Shape(weight_bytes=weight_bytes(LLAMA2_7B), kv_bytes=kv_bytes_per_token(LLAMA2_7B),
                 vocab=LLAMA2_7B["vocab_size"], hbm_bytes_per_s=args.hbm_tb_s * 1e12,
                 link_bytes_per_s=args.link_gb_s * 1e9)
    per_entry = host_seconds_per_entry(20_000 if args.smoke else 200_000)
    shape_cfg = {"weight_gb": round(base.weight_bytes / 1e9, 3), "kv_mb_per_token": base.kv_bytes / 2**20,
                 "hbm_tb_s": args.hbm_tb_s, "link_gb_s": args.link_gb_s, "k": base.k,
                 "prompt_tokens": base.prompt_tokens, "passage_tokens": base.passage_tokens,
                 "new_tokens": base.new_tokens}
    results: list[dict] = []
    cases = [("adaptive", reference_short(base, "adaptive"), "adaptive"),
             ("always", reference_short(base, "always"), "always"),
             ("long_form", reference_long(base), None)]
    for spec_name, ppt, why in settings:
        s = dataclasses.replace(base, passes_per_token=ppt)
        for mode, ref, short_mode in cases:
            ours = ours_short(s, short_mode) if short_mode else ours_long(s)
            cfg = dict(shape_cfg, mode=mode, speculation=spec_name, passes_per_token=ppt, passes_source=why,
                       ours_forwards=ours.forwards, reference_forwards=ref.forwards,
                       ours_ms=round(ours.seconds(s) * 1e3, 3), reference_ms=round(ref.seconds(s) * 1e3, 3),
                       reference_host_mb=round(ref.host_bytes / 1e6, 2), reference_host_entries=ref.host_entries)
            if mode == "long_form":
                cfg.update(beam_width=s.beam_width, segments=s.segments, reference_depth=1)
            record(results, "selfrag_design_ceiling_vs_reference", ref.seconds(s) / ours.seconds(s), "x",
                   host_dicts="not counted", **cfg)
            record(results, "selfrag_design_ceiling_vs_reference_with_host_dicts",
                   ref.seconds(s, per_entry) / ours.seconds(s, per_entry), "x",
                   host_dicts=f"{per_entry * 1e9:.1f} ns per entry, timed on this machine", **cfg)

    # Longer contexts and more branches, ours with the fp16 and the FP8 cache (speculation as measured, if it is).
    ppt, why = settings[-1][1], settings[-1][2]
    fp8_kv = {"fp16": {}, "fp8": dict(kv_bytes=kv_bytes_per_token(LLAMA2_7B, 1),
                                      kv_scale_bytes=kv_scale_bytes_per_row(LLAMA2_7B))}
    for k in (5, 10):
        for context in (512, 4096):
            shape = dataclasses.replace(base, k=k, passes_per_token=ppt,
                                        passage_tokens=context - base.prompt_tokens - base.new_tokens)
            for mode, short_mode in (("adaptive", "adaptive"), ("always", "always"), ("long_form", None)):
                ref = reference_short(shape, short_mode) if short_mode else reference_long(shape)
                ours_s = {}
                for kv, fields in fp8_kv.items():
                    s = dataclasses.replace(shape, **fields)
                    ours = ours_short(s, short_mode) if short_mode else ours_long(s)
                    ours_s[kv] = ours.seconds(s)
                    cfg = dict(shape_cfg, k=k, context=context, passage_tokens=shape.passage_tokens, mode=mode,
                               kv_cache=kv, passes_per_token=ppt, passes_source=why,
                               ours_ms=round(ours_s[kv] * 1e3, 3), reference_ms=round(ref.seconds(shape) * 1e3, 3),
                               reference_kv_cache="fp16")
                    record(results, "selfrag_design_ceiling_by_shape_vs_reference", ref.seconds(shape) / ours_s[kv],
                           "x", host_dicts="not counted", **cfg)
                record(results, "selfrag_design_ceiling_fp8_kv_gain", ours_s["fp16"] / ours_s["fp8"], "x",
                       k=k, context=context, mode=mode, passes_per_token=ppt,
                       what="our lower bound with the fp16 KV cache over the one with the FP8 cache")

    def plot(path: Path) -> None:
        fig, (ax, ax2) = pyplot().subplots(1, 2, figsize=(13, 4.8))
        rows = [r for r in results if r["metric"] == "selfrag_design_ceiling_vs_reference"]
        labels = [f"{r['config']['mode']}\nspec {r['config']['speculation']}" for r in rows]
        ax.bar(range(len(rows)), [r["value"] for r in rows])
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel("reference / ours (lower bounds)")
        ax.set_title("selfrag_design_ceiling_vs_reference, Llama-2-7B on H200", fontsize=9)
        by_shape = [r for r in results if r["metric"] == "selfrag_design_ceiling_by_shape_vs_reference"]
        groups = sorted({(r["config"]["mode"], r["config"]["k"], r["config"]["context"]) for r in by_shape},
                        key=lambda g: (g[0], g[1], g[2]))
        for j, kv in enumerate(("fp16", "fp8")):
            vals = [next(r["value"] for r in by_shape if (r["config"]["mode"], r["config"]["k"],
                                                           r["config"]["context"]) == g and r["config"]["kv_cache"] == kv)
                    for g in groups]
            ax2.bar([i + (j - 0.5) * 0.4 for i in range(len(groups))], vals, 0.4, label=f"ours, {kv} KV")
        ax2.set_xticks(range(len(groups)), [f"{m} K={k} ctx {c}" for m, k, c in groups], fontsize=7, rotation=50,
                       ha="right")
        ax2.axhline(1.0, color="k", lw=0.8)
        ax2.set_ylabel("reference (fp16 KV) / ours")
        ax2.set_title("longer contexts, 10 branches, FP8 KV", fontsize=9)
        ax2.legend(fontsize=8)
        save_figure(fig, path)

    write_results("design_ceiling", "cpu", results, args.out, plot)
    return results


if __name__ == "__main__":
    main()
