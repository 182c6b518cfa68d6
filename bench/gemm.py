"""FP8 (e4m3, per-channel) weight-only linears against fp16 cuBLAS, for Llama-2-7B's shapes.

    python bench/gemm.py                      # GPU: writes bench/results/gemm-<device>-<date>.{json,md,png}
    python bench/gemm.py --smoke --out DIR    # tiny shapes; on a machine without CUDA, the Triton interpreter (CI)

Decode (M = 1, 2, 4, 8, 16 rows) reads every weight once per token, so its figure of merit is the fraction
of the device's copy bandwidth (measured in the same run) that the GEMV sustains, counting weight, scale,
activation and output bytes. Decode calls are timed inside a CUDA graph over enough distinct weight copies
that nothing is served from L2, as the engine's graphed decode step would see them. Prefill (2048 rows) is
compute-bound and compared with cuBLAS fp16 on the same shapes; the W8A8 `torch._scaled_mm` path is timed
and its error reported beside ours. Finally a Llama-2-7B-shaped model with FP8 decoder linears is built
(on the meta device with --smoke, so only its byte count is real there) and its weight bytes reported.

Summary metrics: fp8_gemv_bw_fraction (worst shape, M=1), fp8_gemv_speedup_vs_fp16 (geometric mean, M=1),
fp8_prefill_gemm_time_ratio_vs_cublas_fp16 (ours / cuBLAS, worst shape), fp8_7b_weight_gb.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (bench_parser, cuda_if_available, interpret_kernels, parse_bench_args,  # noqa: E402
                          pyplot, save_figure, time_fn, write_results)

SHAPES_7B = {"qkvo": (4096, 4096), "gate_up": (11008, 4096), "down": (4096, 11008), "lm_head": (32016, 4096)}
SHAPES_SMOKE = {"qkvo": (48, 64), "gate_up": (96, 64), "down": (64, 96), "lm_head": (160, 64)}
# Candidate GEMV launch parameters tried at M=1 on the GPU, to show how far the default heuristic is from
# the best one on this device.
SWEEP = [dict(BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=False, num_warps=w, num_stages=1)
         for bn, bk, w in [(8, 512, 4), (16, 512, 4), (32, 256, 4), (8, 1024, 4), (16, 1024, 8), (4, 1024, 4)]]
SWEEP_DOT = [dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=True, num_warps=w, num_stages=s)
             for bn, bk, w, s in [(16, 256, 4, 4), (16, 256, 2, 4), (32, 256, 4, 4), (16, 512, 4, 3), (32, 128, 2, 5)]]
SWEEP += SWEEP_DOT


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _per_call_ms(calls, device: str, iters: int) -> float:
    """Milliseconds per call of `calls` (each a zero-argument callable), run back to back."""
    def run_all():
        for c in calls:
            c()

    if not device.startswith("cuda"):
        return time_fn(run_all, device, warmup=1, iters=iters) / len(calls)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run_all()
        run_all()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    # A graph removes the Python launch cost, which would otherwise exceed a 5 us GEMV.
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            run_all()
    except RuntimeError as e:
        print(f"  CUDA graph capture failed ({e}); timing eager launches instead", flush=True)
        return time_fn(run_all, device, warmup=1, iters=iters) / len(calls)
    return time_fn(graph.replay, device, warmup=3, iters=iters) / len(calls)


def _copies(n: int, k: int, device: str, smoke: bool) -> int:
    if smoke:
        return 2
    l2 = getattr(torch.cuda.get_device_properties(torch.device(device)), "L2_cache_size", 50 << 20)
    return max(2, math.ceil(4 * l2 / (n * k)))


def bench_decode(shapes, ms_list, device, smoke, results, iters):
    from selfrag_engine.kernels.fp8_linear import fp8_linear, gemv_config
    from selfrag_engine.layers.fp8_linear import quantize_fp8_per_channel

    from bench.common import copy_bandwidth_gbps

    bw = copy_bandwidth_gbps(device, nbytes=(1 << 22) if smoke else (1 << 30))
    results.append({"metric": "copy_bandwidth", "value": bw, "unit": "GB/s", "config": {}})
    dtype = torch.float16
    rows = []
    for label, (n, k) in shapes.items():
        copies = _copies(n, k, device, smoke)
        w16 = [torch.randn(n, k, dtype=dtype, device=device) for _ in range(copies)]
        qs = [quantize_fp8_per_channel(w) for w in w16]
        for m in ms_list:
            x = torch.randn(m, k, dtype=dtype, device=device)
            ref = x.double() @ (qs[0][0].double() * qs[0][1].double()[:, None]).T
            err = _rel(fp8_linear(x, *qs[0]), ref)
            t8 = _per_call_ms([lambda q=q, s=s: fp8_linear(x, q, s) for q, s in qs], device, iters)
            t16 = _per_call_ms([lambda w=w: torch.matmul(x, w.T) for w in w16], device, iters)
            nbytes = n * k + 4 * n + 2 * m * k + 2 * m * n
            frac = nbytes / (t8 * 1e-3) / 1e9 / bw
            frac16 = (2 * n * k + 2 * m * k + 2 * m * n) / (t16 * 1e-3) / 1e9 / bw
            cfg = {"shape": label, "N": n, "K": k, "M": m, "gemv": gemv_config(m, n, k, torch.device(device))}
            results += [
                {"metric": "gemv_fp8_time", "value": t8 * 1e3, "unit": "us", "config": cfg},
                {"metric": "gemv_fp16_matmul_time", "value": t16 * 1e3, "unit": "us", "config": cfg},
                {"metric": "gemv_fp8_bw_fraction", "value": frac, "unit": "fraction", "config": cfg},
                {"metric": "gemv_fp16_bw_fraction", "value": frac16, "unit": "fraction", "config": cfg},
                {"metric": "gemv_fp8_rel_err", "value": err, "unit": "rel", "config": cfg},
            ]
            rows.append({"shape": label, "m": m, "t8": t8, "t16": t16, "frac": frac, "frac16": frac16})
            print(f"gemv {label:8s} M={m:2d}: fp8 {t8 * 1e3:8.2f} us ({frac:.2f} of copy bw), "
                  f"fp16 {t16 * 1e3:8.2f} us ({frac16:.2f}), err {err:.1e}", flush=True)
        # The interpreter is slow: in a smoke run, sweep two configs on the first shape only.
        first = label == next(iter(shapes))
        for m, configs in ((1, SWEEP), (8, SWEEP_DOT)):
            if smoke:
                configs = configs[:2] if first and m == 1 else []
            x = torch.randn(m, k, dtype=dtype, device=device)
            best = None
            for cfg in configs:
                calls = [lambda q=q, s=s, cfg=cfg: fp8_linear(x, q, s, path="gemv", gemv_cfg=cfg) for q, s in qs]
                try:
                    t = _per_call_ms(calls, device, iters)
                except Exception as e:  # a config that does not compile on this device is skipped
                    print(f"  sweep {cfg} failed: {type(e).__name__}: {e}", flush=True)
                    continue
                if best is None or t < best[0]:
                    best = (t, cfg)
            if best is not None:
                frac = (n * k + 4 * n + 2 * m * k + 2 * m * n) / (best[0] * 1e-3) / 1e9 / bw
                results.append({"metric": "gemv_fp8_best_swept_bw_fraction", "value": frac, "unit": "fraction",
                                "config": {"shape": label, "M": m, "gemv": best[1]}})
                print(f"  best swept config at M={m}: {best[1]} -> {frac:.2f} of copy bw", flush=True)
        del w16, qs
    m1 = [r for r in rows if r["m"] == 1]
    worst = min(m1, key=lambda r: r["frac"])
    results.append({"metric": "fp8_gemv_bw_fraction", "value": worst["frac"], "unit": "fraction of copy bandwidth",
                    "config": {"M": 1, "worst_shape": worst["shape"], "dtype": "float16"}})
    geo = math.exp(sum(math.log(r["t16"] / r["t8"]) for r in m1) / len(m1))
    results.append({"metric": "fp8_gemv_speedup_vs_fp16", "value": geo, "unit": "x",
                    "config": {"M": 1, "mean": "geometric over shapes", "baseline": "torch.matmul fp16"}})
    return rows


def bench_prefill(shapes, m, device, smoke, results, iters):
    from selfrag_engine.kernels.fp8_linear import fp8_linear, fp8_linear_w8a8
    from selfrag_engine.layers.fp8_linear import quantize_fp8_per_channel

    dtype = torch.float16
    ratios = []
    for label, (n, k) in shapes.items():
        w16 = torch.randn(n, k, dtype=dtype, device=device)
        q, s = quantize_fp8_per_channel(w16)
        x = torch.randn(m, k, dtype=dtype, device=device)
        ref = x.double() @ (q.double() * s.double()[:, None]).T
        ours = fp8_linear(x, q, s)  # also runs the autotuner before timing
        err = _rel(ours, ref)
        t8 = time_fn(lambda: fp8_linear(x, q, s), device, warmup=1 if smoke else 5, iters=iters)
        t16 = time_fn(lambda: torch.matmul(x, w16.T), device, warmup=1 if smoke else 5, iters=iters)
        cfg = {"shape": label, "N": n, "K": k, "M": m}
        from selfrag_engine.kernels.fp8_linear import _fp8_gemm_kernel

        chosen = getattr(_fp8_gemm_kernel, "best_config", None)
        if chosen is not None:
            cfg["autotuned"] = str(chosen)
        ratios.append((t8 / t16, label))
        results += [
            {"metric": "prefill_fp8_gemm_time", "value": t8, "unit": "ms", "config": cfg},
            {"metric": "prefill_cublas_fp16_time", "value": t16, "unit": "ms", "config": cfg},
            {"metric": "prefill_fp8_gemm_rel_err", "value": err, "unit": "rel", "config": cfg},
        ]
        line = f"prefill {label:8s} M={m}: fp8 {t8:.3f} ms, cuBLAS fp16 {t16:.3f} ms, err {err:.1e}"
        try:
            y = fp8_linear_w8a8(x, q, s)
            werr = _rel(y, ref)
            tw = time_fn(lambda: fp8_linear_w8a8(x, q, s), device, warmup=1 if smoke else 5, iters=iters)
            results += [{"metric": "prefill_w8a8_scaled_mm_time", "value": tw, "unit": "ms", "config": cfg},
                        {"metric": "prefill_w8a8_scaled_mm_rel_err", "value": werr, "unit": "rel", "config": cfg}]
            line += f"; W8A8 _scaled_mm {tw:.3f} ms, err {werr:.1e}"
        except (RuntimeError, ValueError) as e:
            results.append({"metric": "prefill_w8a8_scaled_mm_time", "value": "unavailable", "unit": "ms",
                            "config": {**cfg, "error": str(e).splitlines()[0][:120]}})
            line += "; W8A8 unavailable"
        print(line, flush=True)
    worst = max(ratios)
    results.append({"metric": "fp8_prefill_gemm_time_ratio_vs_cublas_fp16", "value": worst[0], "unit": "x",
                    "config": {"M": m, "worst_shape": worst[1], "dtype": "float16"}})
    return ratios


def llama2_7b_fp8_bytes(device: str, allocate: bool) -> tuple[float, float | None]:
    """(weight GB, allocated GB or None) of a Llama-2-7B-shaped model (Self-RAG's 32016-token vocabulary)
    with FP8 decoder linears and fp16 embedding, norms and lm_head."""
    from selfrag_engine.config import LlamaConfig
    from selfrag_engine.models.llama import Llama
    from selfrag_engine.layers.fp8_linear import Fp8Linear, quantize_fp8_per_channel, replace_linears_with_fp8

    cfg = LlamaConfig(vocab_size=32016, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, torch_dtype=torch.float16)
    with torch.device("meta"):
        model = Llama(cfg)
    model.to(torch.float16)
    replace_linears_with_fp8(model)
    allocated = None
    if allocate:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        model.to_empty(device=device)
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, Fp8Linear):
                    q, s = quantize_fp8_per_channel(torch.randn(mod.out_features, mod.in_features,
                                                                dtype=torch.float16, device=device))
                    mod.weight.copy_(q)
                    mod.weight_scale.copy_(s)
                    del q, s
            for p in model.parameters():
                p.normal_(0, 0.02)
        torch.cuda.synchronize()
        allocated = (torch.cuda.memory_allocated(device) - before) / 1e9
    tensors = list(model.parameters()) + [b for name, b in model.named_buffers()
                                          if not name.endswith(("rope_cos", "rope_sin"))]
    total = sum(t.numel() * t.element_size() for t in tensors) / 1e9
    del model
    return total, allocated


def _plot(rows, ratios):
    def plot(path):
        fig, axes = pyplot().subplots(1, 3, figsize=(16, 4.5))
        labels = sorted({r["shape"] for r in rows}, key=[r["shape"] for r in rows].index)
        m1 = {r["shape"]: r for r in rows if r["m"] == 1}
        xs = range(len(labels))
        axes[0].bar([i - 0.2 for i in xs], [m1[s]["frac"] for s in labels], 0.4, label="FP8 GEMV (ours)")
        axes[0].bar([i + 0.2 for i in xs], [m1[s]["frac16"] for s in labels], 0.4, label="fp16 torch.matmul")
        axes[0].axhline(1.0, color="k", lw=0.8)
        axes[0].set_xticks(list(xs), labels)
        axes[0].set_ylabel("fraction of copy bandwidth")
        axes[0].set_title("decode, M=1")
        axes[0].legend()
        for s in labels:
            pts = sorted((r["m"], r["t8"] * 1e3, r["t16"] * 1e3) for r in rows if r["shape"] == s)
            line, = axes[1].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{s} fp8")
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], "x--", color=line.get_color(), label=f"{s} fp16")
        axes[1].set_xscale("log", base=2)
        axes[1].set_yscale("log")
        axes[1].set_xlabel("rows M")
        axes[1].set_ylabel("time per call (us)")
        axes[1].set_title("decode time vs rows")
        axes[1].legend(fontsize=7)
        axes[2].bar([r[1] for r in ratios], [r[0] for r in ratios])
        axes[2].axhline(1.0, color="k", lw=0.8)
        axes[2].set_ylabel("FP8 GEMM time / cuBLAS fp16 time")
        axes[2].set_title("prefill")
        save_figure(fig, path, dpi=110)

    return plot


def main(argv=None) -> int:
    parser = bench_parser(__doc__, "tiny shapes on the CPU (Triton interpreter)")
    args = parse_bench_args(parser, argv, cuda_if_available, needs_cuda=True)
    device = args.device
    if device == "cpu":
        # The kernel modules are imported inside the benchmarks, after this.
        interpret_kernels()

    torch.manual_seed(0)
    smoke = args.smoke
    shapes = SHAPES_SMOKE if smoke else SHAPES_7B
    ms_list = [1, 2] if smoke else [1, 2, 4, 8, 16]
    iters = 2 if smoke else 20
    results: list[dict] = []
    rows = bench_decode(shapes, ms_list, device, smoke, results, iters)
    ratios = bench_prefill(shapes, 32 if smoke else 2048, device, smoke, results, iters)
    gb, allocated = llama2_7b_fp8_bytes(device, allocate=device.startswith("cuda") and not smoke)
    results.append({"metric": "fp8_7b_weight_gb", "value": gb, "unit": "GB (1e9 bytes)",
                    "config": {"model": "Llama-2-7B shapes, vocab 32016", "linears": "e4m3 + fp32 scales",
                               "embedding/lm_head/norms": "float16", "target": "<= 7.2",
                               "allocated_on_device": allocated is not None}})
    if allocated is not None:
        results.append({"metric": "fp8_7b_allocated_gb", "value": allocated, "unit": "GB (1e9 bytes)",
                        "config": {"source": "torch.cuda.memory_allocated delta"}})
    print(f"Llama-2-7B FP8 weights: {gb:.3f} GB" + (f" ({allocated:.3f} GB allocated)" if allocated else ""))
    write_results("gemm", device, results, out_dir=args.out, plot=_plot(rows, ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
