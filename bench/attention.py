"""Attention kernels benchmark: prefill vs SDPA, decode bandwidth, cascade vs plain paged decode.

    python bench/attention.py                 # GPU: full sweep, results under bench/results/
    python bench/attention.py --smoke --out DIR   # tiny shapes; on a CPU through the Triton interpreter

Headline metrics:
  prefill_attn_speedup_vs_sdpa  SDPA time / our time, causal prompt of 2,048 tokens, 32 heads, head_dim 128, fp16
                                (our kernel reads K/V from a paged pool with shuffled blocks; SDPA from
                                contiguous tensors)
  decode_attn_bw_fraction       K/V bytes read per second / copy bandwidth measured in the same run, 2k context,
                                batch 32, Llama-2-7B shapes (32 heads, 32 kv heads, head_dim 128, fp16)
  cascade_speedup_k5            plain paged decode time / cascade time, K=5 branches sharing a 1,500-token prompt,
                                50 new tokens each (the prompt's last partial block is each branch's own)

Timing: on CUDA each measured call is captured in a CUDA graph and replayed (the kernels are shorter than the
Python that launches them), and decode/cascade cycle through enough copies of the pool ("layers") that the
data read is never still in L2, as in a model where every layer has its own pool. Copy bandwidth is
bench.common.copy_bandwidth_gbps (bytes read + written per second); decode moves only reads.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (bench_parser, copy_bandwidth_gbps, cuda_if_available, interpret_kernels,  # noqa: E402
                          parse_bench_args, pyplot, save_figure, time_fn, write_results)

if not torch.cuda.is_available():
    interpret_kernels()

from selfrag_engine.kernels.decode_attention import (cascade_decode_attention, default_num_splits,  # noqa: E402
                                                      paged_decode_attention)
from selfrag_engine.kernels.prefill_attention import prefill_attention  # noqa: E402


def kernel_ms(fn, device: str, timing: dict, reps: int = 1) -> float:
    """Device time of one fn() call / reps, in ms.

    On CUDA the calls are captured in a CUDA graph and replayed: the kernels take tens of microseconds, less
    than the Python wrappers need to launch them, and the engine replays graphs for decode steps too.
    """
    if not device.startswith("cuda"):
        return time_fn(fn, device, **timing) / reps
    fn()  # compiles outside the capture
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_fn(graph.replay, device, **timing) / reps


def layers_for(bytes_per_layer: int, device: str) -> int:
    """Copies of the data to cycle through so that none is still in L2 when it is read again.

    A model reads a different KV pool per layer; timing one pool over and over would measure L2, which holds
    a whole shared-prefix pool (tens of MB) on an H100.
    """
    if not device.startswith("cuda"):
        return 1
    l2 = torch.cuda.get_device_properties(torch.device(device)).L2_cache_size
    return max(1, min(32, math.ceil(4 * l2 / max(1, bytes_per_layer))))


def _paged_pool(rows_lens: list[int], block_size: int, kv_heads: int, head_dim: int, dtype, device,
                shared_prefix_blocks: int = 0):
    """A pool with shuffled physical blocks; rows share their first `shared_prefix_blocks` blocks when > 0."""
    own = [math.ceil(n / block_size) - shared_prefix_blocks for n in rows_lens]
    num_blocks = shared_prefix_blocks + sum(own)
    perm = torch.randperm(num_blocks, device="cpu").to(torch.int32)
    shared, at = perm[:shared_prefix_blocks], shared_prefix_blocks
    width = max(shared_prefix_blocks + n for n in own)
    table = torch.full((len(rows_lens), width), -1, dtype=torch.int32)
    for i, n in enumerate(own):
        table[i, :shared_prefix_blocks] = shared
        table[i, shared_prefix_blocks:shared_prefix_blocks + n] = perm[at:at + n]
        at += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k = torch.randn(shape, dtype=dtype, device=device)
    v = torch.randn(shape, dtype=dtype, device=device)
    ctx = torch.tensor(rows_lens, dtype=torch.int32, device=device)
    return k, v, table.to(device), ctx


def bench_prefill(cfg, device, timing) -> list[dict]:
    results = []
    heads, head_dim, dtype, block_size = cfg["heads"], cfg["head_dim"], cfg["dtype"], 16
    scale = head_dim ** -0.5
    for n in cfg["prefill_lens"]:
        k_cache, v_cache, table, ctx = _paged_pool([n], block_size, heads, head_dim, dtype, device)
        q = torch.randn(n, heads, head_dim, dtype=dtype, device=device)
        cu = torch.tensor([0, n], dtype=torch.int32, device=device)
        k = k_cache[table[0].long()].flatten(0, 1)[:n]
        v = v_cache[table[0].long()].flatten(0, 1)[:n]
        qs, ks, vs = (t.transpose(0, 1).unsqueeze(0).contiguous() for t in (q, k, v))
        ours_fn = lambda: prefill_attention(q, k_cache, v_cache, table, cu, ctx, scale, n)  # noqa: E731
        sdpa_fn = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            qs, ks, vs, is_causal=True, scale=scale)
        err = (ours_fn().float() - sdpa_fn()[0].transpose(0, 1).float()).abs().max().item()
        ours, sdpa = kernel_ms(ours_fn, device, timing), kernel_ms(sdpa_fn, device, timing)
        flops = 4 * heads * head_dim * n * n / 2  # causal: half the score matrix
        config = dict(tokens=n, heads=heads, head_dim=head_dim, dtype=str(dtype).removeprefix("torch."))
        results += [
            dict(metric="prefill_attn_ms", value=ours, unit="ms", config=config),
            dict(metric="sdpa_ms", value=sdpa, unit="ms", config=config),
            dict(metric="prefill_attn_tflops", value=flops / (ours * 1e-3) / 1e12, unit="TFLOP/s", config=config),
            dict(metric="prefill_attn_max_abs_diff_vs_sdpa", value=err, unit="abs", config=config),
            dict(metric="prefill_attn_speedup_vs_sdpa_sweep", value=sdpa / ours, unit="x", config=config),
        ]
        if n == cfg["prefill_headline"]:
            results.append(dict(metric="prefill_attn_speedup_vs_sdpa", value=sdpa / ours, unit="x", config=config))
    return results


def _kv_bytes(token_count: int, kv_heads: int, head_dim: int, dtype) -> int:
    return 2 * token_count * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def bench_decode(cfg, device, timing, copy_gbps) -> list[dict]:
    results = []
    heads, kv_heads, head_dim, dtype = cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["dtype"]
    scale = head_dim ** -0.5
    for ctx_len in cfg["decode_ctx"]:
        for batch in cfg["decode_batch"]:
            kv_bytes = _kv_bytes(batch * ctx_len, kv_heads, head_dim, dtype)
            layers = [_paged_pool([ctx_len] * batch, 16, kv_heads, head_dim, dtype, device)
                      for _ in range(layers_for(kv_bytes, device))]
            q = torch.randn(batch, heads, head_dim, dtype=dtype, device=device)
            splits = default_num_splits(batch, kv_heads, ctx_len, device)

            def step():
                for k_cache, v_cache, table, ctx in layers:
                    paged_decode_attention(q, k_cache, v_cache, table, ctx, scale, num_splits=splits)

            ms = kernel_ms(step, device, timing, reps=len(layers))
            gbps = kv_bytes / (ms * 1e-3) / 1e9
            config = dict(context=ctx_len, batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                          num_splits=splits, layers=len(layers), copy_gbps=round(copy_gbps, 1))
            results += [
                dict(metric="decode_attn_ms", value=ms, unit="ms", config=config),
                dict(metric="decode_attn_gbps", value=gbps, unit="GB/s", config=config),
                dict(metric="decode_attn_bw_fraction_sweep", value=gbps / copy_gbps, unit="fraction", config=config),
            ]
            if (ctx_len, batch) == cfg["decode_headline"]:
                results.append(dict(metric="decode_attn_bw_fraction", value=gbps / copy_gbps, unit="fraction",
                                    config=config))
            del layers
    return results


def _cascade_layer(groups, branches, ctx_len, prefix_blocks, kv_heads, head_dim, dtype, device):
    """One pool holding `groups` independent prompts, each shared by `branches` rows."""
    pools = [_paged_pool([ctx_len] * branches, 16, kv_heads, head_dim, dtype, device, prefix_blocks)
             for _ in range(groups)]
    offset, tables = 0, []
    for k, _, table, _ in pools:
        tables.append(torch.where(table >= 0, table + offset, table))
        offset += k.shape[0]
    k_cache = torch.cat([p[0] for p in pools])
    v_cache = torch.cat([p[1] for p in pools])
    width = max(t.shape[1] for t in tables)
    table = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1) for t in tables])
    return k_cache, v_cache, table


def bench_cascade(cfg, device, timing) -> list[dict]:
    results = []
    heads, kv_heads, head_dim, dtype, block_size = cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["dtype"], 16
    branches, prompt, new = cfg["cascade_branches"], cfg["cascade_prompt"], cfg["cascade_new"]
    prefix_blocks = prompt // block_size  # only full blocks are shared; the partial one is copied per branch
    shared = prefix_blocks * block_size
    ctx_len = prompt + new
    scale = head_dim ** -0.5
    for groups in cfg["cascade_groups"]:
        batch = groups * branches
        plain_bytes = _kv_bytes(batch * ctx_len, kv_heads, head_dim, dtype)
        cascade_bytes = _kv_bytes(groups * shared + batch * (ctx_len - shared), kv_heads, head_dim, dtype)
        # Sized by the cascade's footprint so that neither path finds the previous layer's K/V in L2.
        layers = [_cascade_layer(groups, branches, ctx_len, prefix_blocks, kv_heads, head_dim, dtype, device)
                  for _ in range(layers_for(cascade_bytes, device))]
        ctx = torch.full((batch,), ctx_len, dtype=torch.int32, device=device)
        group_start = torch.arange(0, batch + 1, branches, dtype=torch.int32, device=device)
        prefix = torch.full((groups,), prefix_blocks, dtype=torch.int32, device=device)
        q = torch.randn(batch, heads, head_dim, dtype=dtype, device=device)
        splits = default_num_splits(batch, kv_heads, ctx_len, device)

        def plain_step():
            for k_cache, v_cache, table in layers:
                paged_decode_attention(q, k_cache, v_cache, table, ctx, scale, num_splits=splits)

        def cascade_step():
            for k_cache, v_cache, table in layers:
                cascade_decode_attention(q, k_cache, v_cache, table, ctx, group_start, prefix, scale,
                                         max_group_size=branches, max_context_len=ctx_len)

        k_cache, v_cache, table = layers[0]
        err = (paged_decode_attention(q, k_cache, v_cache, table, ctx, scale, num_splits=splits).float()
               - cascade_decode_attention(q, k_cache, v_cache, table, ctx, group_start, prefix, scale,
                                          max_group_size=branches, max_context_len=ctx_len).float()).abs().max()
        plain = kernel_ms(plain_step, device, timing, reps=len(layers))
        cascade = kernel_ms(cascade_step, device, timing, reps=len(layers))
        config = dict(groups=groups, branches=branches, prompt=prompt, new_tokens=new, shared_tokens=shared,
                      heads=heads, kv_heads=kv_heads, head_dim=head_dim, layers=len(layers))
        results += [
            dict(metric="plain_decode_ms", value=plain, unit="ms", config=config),
            dict(metric="cascade_decode_ms", value=cascade, unit="ms", config=config),
            dict(metric="plain_decode_kv_mbytes", value=plain_bytes / 1e6, unit="MB", config=config),
            dict(metric="cascade_decode_kv_mbytes", value=cascade_bytes / 1e6, unit="MB", config=config),
            dict(metric="cascade_max_abs_diff_vs_plain", value=float(err), unit="abs", config=config),
            dict(metric="cascade_speedup_sweep", value=plain / cascade, unit="x", config=config),
        ]
        if groups == 1:
            results.append(dict(metric="cascade_speedup_k5", value=plain / cascade, unit="x", config=config))
        del layers
    return results


def plot(results: list[dict]):
    def draw(path: Path) -> None:
        fig, axes = pyplot().subplots(1, 3, figsize=(16, 4.5))
        rows = lambda name: [r for r in results if r["metric"] == name]  # noqa: E731
        ax = axes[0]
        for name, label in (("prefill_attn_ms", "ours (paged)"), ("sdpa_ms", "torch SDPA")):
            pts = rows(name)
            ax.plot([r["config"]["tokens"] for r in pts], [r["value"] for r in pts], marker="o", label=label)
        ax.set(xlabel="prompt tokens", ylabel="ms", title="causal prefill attention", xscale="log", yscale="log")
        ax.legend()
        ax = axes[1]
        sweep = rows("decode_attn_bw_fraction_sweep")
        for batch in sorted({r["config"]["batch"] for r in sweep}):
            pts = [r for r in sweep if r["config"]["batch"] == batch]
            ax.plot([r["config"]["context"] for r in pts], [r["value"] for r in pts], marker="o",
                    label=f"batch {batch}")
        ax.set(xlabel="context", ylabel="KV bytes/s / copy bandwidth", title="paged decode", xscale="log")
        ax.legend()
        ax = axes[2]
        plain, cascade = rows("plain_decode_ms"), rows("cascade_decode_ms")
        labels = [f"{r['config']['groups']}x{r['config']['branches']}" for r in plain]
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], [r["value"] for r in plain], width=0.4, label="plain paged decode")
        ax.bar([x + 0.2 for x in xs], [r["value"] for r in cascade], width=0.4, label="cascade")
        ax.set_xticks(list(xs), labels)
        ax.set(xlabel="groups x branches", ylabel="ms", title="shared-prefix decode")
        ax.legend()
        save_figure(fig, path)

    return draw


FULL = dict(heads=32, kv_heads=32, head_dim=128, dtype=torch.float16,
            prefill_lens=[512, 1024, 2048, 4096], prefill_headline=2048,
            decode_ctx=[512, 1024, 2048, 4096, 8192], decode_batch=[1, 4, 8, 16, 32], decode_headline=(2048, 32),
            cascade_branches=5, cascade_prompt=1500, cascade_new=50, cascade_groups=[1, 4])
SMOKE = dict(heads=2, kv_heads=2, head_dim=64, dtype=torch.float32,
             prefill_lens=[16, 40], prefill_headline=40,
             decode_ctx=[40], decode_batch=[1, 2], decode_headline=(40, 2),
             cascade_branches=5, cascade_prompt=40, cascade_new=5, cascade_groups=[1])


def main(argv: list[str] | None = None) -> Path:
    parser = bench_parser(__doc__, "tiny shapes (runs on the CPU interpreter)")
    args = parse_bench_args(parser, argv, cuda_if_available, needs_cuda=True)
    cfg = SMOKE if args.smoke else FULL
    torch.manual_seed(0)
    timing = dict(warmup=1, iters=1) if args.smoke else dict(warmup=5, iters=30)
    copy_gbps = copy_bandwidth_gbps(args.device, nbytes=1 << 20 if args.smoke else 1 << 30)
    results = [dict(metric="copy_bandwidth", value=copy_gbps, unit="GB/s", config={})]
    results += bench_prefill(cfg, args.device, timing)
    results += bench_decode(cfg, args.device, timing, copy_gbps)
    results += bench_cascade(cfg, args.device, timing)
    if args.smoke:
        for r in results:
            r["config"]["smoke"] = True
    path = write_results("attention", args.device, results, out_dir=args.out, plot=plot(results))
    for r in results:
        if r["metric"] in ("prefill_attn_speedup_vs_sdpa", "decode_attn_bw_fraction", "cascade_speedup_k5"):
            print(f"{r['metric']}: {r['value']:.3f} {r['unit']}")
    return path


if __name__ == "__main__":
    main()
