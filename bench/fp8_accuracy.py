"""Accuracy of FP8 weights: the same checkpoint loaded in the activation dtype and with FP8 (e4m3,
per-output-channel) decoder linears, compared on the same prompts in one run.

    python bench/fp8_accuracy.py                      # the embedded tiny Self-RAG model, CUDA if present
    python bench/fp8_accuracy.py --model DIR          # any checkpoint
    python bench/fp8_accuracy.py --smoke --out DIR    # a random tiny checkpoint (CI)

For each prompt the unquantized model decodes greedily; both models then score prompt + that continuation
(teacher forcing, so one disagreement does not change what follows). Metrics:
fp8_logits_rel_err = ||logits_fp8 - logits_ref||_F / ||logits_ref||_F over the continuation's positions, and
fp8_greedy_agreement = fraction of those positions where both models' argmax agree.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (bench_parser, cuda_if_available, parse_bench_args, pyplot, save_figure,  # noqa: E402
                          write_results)
from selfrag_engine.engine.llm_engine import Engine  # noqa: E402
from selfrag_engine.engine.sampling_params import SamplingParams  # noqa: E402
from selfrag_engine.testing import write_tiny_checkpoint  # noqa: E402
from selfrag_engine.tiny.assets import default_corpus_path, default_model_dir  # noqa: E402

# Both engines share the device: each gets this pool, not a share of the card.
KV_BYTES = 256 << 20

PROMPTS = [
    "Where was {name} born?", "What is the occupation of {name}?", "In what year was {name} born?",
    "What is 7 plus 5?", "Write 'green garden' in capital letters.", "Hello there!",
]


def default_prompts(engine: Engine, n: int) -> list[str]:
    """Instruction prompts of the Self-RAG format, with entity names from the embedded corpus if there is one."""
    names = ["Ada Lovelace", "Nubes Gedri", "Keistei"]
    try:
        with open(default_corpus_path(), encoding="utf-8") as f:
            names = [json.loads(line)["title"] for _, line in zip(range(200), f)][::17] or names
    except (OSError, KeyError):
        pass
    out = []
    for i in range(n):
        q = PROMPTS[i % len(PROMPTS)].format(name=names[i % len(names)])
        out.append(f"### Instruction:\n{q}\n\n### Response:\n")
    return out


def measure(ref: Engine, fp8: Engine, prompts: list[str], max_tokens: int) -> tuple[float, float, list[float]]:
    """(relative error over all positions, greedy agreement, per-position relative errors)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False)
    num = den = 0.0
    agree = total = 0
    per_position: list[float] = []
    for prompt, out in zip(prompts, ref.generate(prompts, params)):
        ids = ref.tokenizer.encode(prompt) + list(out.token_ids)
        p = len(ids) - len(out.token_ids) - 1  # the position that predicts the first generated token
        a = ref.score(ids)[p:-1].double()
        b = fp8.score(ids)[p:-1].double()
        num += float(((b - a) ** 2).sum())
        den += float((a ** 2).sum())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
        per_position += ((b - a).norm(dim=-1) / a.norm(dim=-1)).tolist()
    return (num / den) ** 0.5, agree / total, per_position


def plot(per_position: list[float], rel: float):
    def draw(path: Path) -> None:
        fig, ax = pyplot().subplots(figsize=(6, 3.5))
        ax.hist(per_position, bins=30, color="tab:blue")
        ax.axvline(rel, color="tab:red", label=f"over all positions: {rel:.4f}")
        ax.set_xlabel("relative logits error of one position, FP8 vs unquantized")
        ax.set_ylabel("positions")
        ax.legend()
        save_figure(fig, path)
    return draw


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__, "a random tiny checkpoint, few prompts")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny model)")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    args = parse_bench_args(ap, argv, cuda_if_available)
    n_prompts = args.prompts or (3 if args.smoke else 24)
    max_tokens = args.max_tokens or (8 if args.smoke else 48)
    if args.model:
        path = Path(args.model)
    elif args.smoke:
        path = Path(tempfile.mkdtemp()) / "tiny"
        write_tiny_checkpoint(path, seed=0)
    else:
        path = default_model_dir()
    # The reference runs in the dtype the FP8 model's activations use: fp16 on CUDA, float32 on the CPU.
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    # An explicit KV budget: the two engines share the device.
    ref = Engine.from_pretrained(path, device=args.device, dtype=dtype, progress=False, kv_cache_bytes=KV_BYTES)
    fp8 = Engine.from_pretrained(path, device=args.device, dtype=dtype, quantization="fp8", progress=False,
                                 kv_cache_bytes=KV_BYTES)
    prompts = default_prompts(ref, n_prompts)
    rel, agreement, per_position = measure(ref, fp8, prompts, max_tokens)
    positions = len(per_position)
    config = {"model": path.name if args.smoke or not args.model else str(path), "dtype": str(dtype).split(".")[-1],
              "prompts": n_prompts, "positions": positions, "smoke": args.smoke}
    results = [
        {"metric": "fp8_logits_rel_err", "value": rel, "unit": "fraction", "config": config},
        {"metric": "fp8_greedy_agreement", "value": agreement, "unit": "fraction", "config": config},
    ]
    path_json = write_results("fp8_accuracy", args.device, results, args.out, plot(per_position, rel))
    print(f"fp8_logits_rel_err {rel:.4f}  fp8_greedy_agreement {agreement:.4f} over {positions} positions "
          f"-> {path_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
