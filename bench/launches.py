"""Kernel launches per decoder layer per decode step, counted on the CPU (device "cpu").

    python bench/launches.py                  # writes bench/results/launches-cpu-<date>.{json,md,png}
    python bench/launches.py --smoke --out /tmp/x

The engine runs with use_kernels=True in the Triton interpreter, and `LaunchCounter`
(selfrag_engine/engine/launch_counter.py) counts every Triton launch and every torch operator that runs a device
kernel, per decoder layer of each decode step. The count depends on the layer's structure, not on its sizes, so a
small random Llama with grouped-query attention stands in for Llama-2-7B. On a GPU, long contexts add one merge
launch to split attention (the interpreter never splits), and CUDA graphs replay a whole step as one launch.
Metric: decode_launches_per_layer (target <= 7), for float32 linears (one aten GEMM each, after their own RMSNorm
launches) and FP8 linears (the Triton GEMV, which runs the RMSNorm before q|k|v and gate|up, and the SiLU-and-mul
before down, as its prologue), at batch 1 and 5.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

# The kernels read this when they are first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import write_results  # noqa: E402
from selfrag_engine import Engine, SamplingParams  # noqa: E402
from selfrag_engine.engine.launch_counter import LaunchCounter  # noqa: E402
from selfrag_engine.kernels import INTERPRET  # noqa: E402
from selfrag_engine.testing import write_tiny_checkpoint  # noqa: E402

KINDS = {
    "_rms_norm_kernel": "RMSNorm (+ residual add)",
    "_fp8_norm_gemv_kernel": "RMSNorm (+ residual add) + projection GEMV",
    "_fp8_gemv_kernel": "projection GEMV/GEMM",
    "_fp8_gemm_kernel_impl": "projection GEMV/GEMM",
    "aten.linear": "projection GEMV/GEMM",
    "aten.mm": "projection GEMV/GEMM",
    "_rotary_store_kernel": "rotary + KV store",
    "_decode_kernel": "attention",
    "_merge_kernel": "attention",
    "_cascade_kernel": "attention",
    "_silu_and_mul_kernel": "SiLU-and-mul",
    "_fp8_silu_gemv_kernel": "SiLU-and-mul + projection GEMV",
}
PROMPTS = ["Where was Ada Lovelace born?", "What is 7 plus 5?", "Write 'green garden' in capital letters.",
           "Hello there!", "Name a city by a river."]


def count(path: Path, quantization: str | None, batch: int, max_tokens: int) -> LaunchCounter:
    engine = Engine.from_pretrained(path, dtype=torch.float32, progress=False, use_kernels=True,
                                    quantization=quantization)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    with LaunchCounter(engine.model) as counter:
        engine.generate(PROMPTS[:batch], params)
    return counter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="fewer tokens, batch 1 only (CI)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not INTERPRET:
        parser.error("the kernels were imported without TRITON_INTERPRET=1; run this script in its own process")
    batches = [1] if args.smoke else [1, 5]
    max_tokens = 3 if args.smoke else 8
    results, rows = [], []
    with tempfile.TemporaryDirectory(prefix="selfrag-bench-launches-") as tmp:
        path = write_tiny_checkpoint(Path(tmp) / "ckpt", seed=0, hidden_size=64, intermediate_size=160,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        for weights, quantization in (("fp8", "fp8"), ("float32", None)):
            for batch in batches:
                counter = count(path, quantization, batch, max_tokens)
                per_layer = counter.per_layer(decode=True)
                total = counter.decode_launches_per_layer()
                config = {"weights": weights, "batch": batch, "backend": "triton-interpreted",
                          "decode_steps": counter.decode_steps(), "num_layers": counter.num_layers,
                          "target": 7}
                results.append({"metric": "decode_launches_per_layer", "value": total, "unit": "launches",
                                "config": config})
                by_kind: dict[str, float] = {}
                for name, n in sorted(per_layer.items()):
                    kind = KINDS.get(name, name)
                    by_kind[kind] = by_kind.get(kind, 0.0) + n
                    results.append({"metric": "decode_layer_launches_by_kernel", "value": n, "unit": "launches",
                                    "config": {"weights": weights, "batch": batch, "kernel": name, "kind": kind}})
                rows.append((f"{weights}\nbatch {batch}", by_kind))
                shown = ", ".join(f"{k} {v:g}" for k, v in by_kind.items())
                print(f"{weights:8s} batch {batch}: {total:g} launches per layer per decode step ({shown})")

    def plot(png: Path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        kinds = list(dict.fromkeys(k for _, by_kind in rows for k in by_kind))
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        bottom = [0.0] * len(rows)
        for kind in kinds:
            values = [by_kind.get(kind, 0.0) for _, by_kind in rows]
            ax.bar([label for label, _ in rows], values, bottom=bottom, label=kind)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.axhline(7, color="black", linestyle="--", linewidth=1, label="target (7)")
        ax.set_ylabel("launches per layer per decode step")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        fig.savefig(png, dpi=120)

    path = write_results("launches", "cpu", results, out_dir=args.out, plot=plot)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
