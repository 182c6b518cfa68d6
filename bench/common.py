"""The harness every benchmark script shares: its command line (`--smoke`, `--out`, `--device`), timing, the
results files and their plot.

Each benchmark writes bench/results/<bench>-<device>-<YYYYMMDD>.json with the schema
{"bench", "device", "versions": {torch, triton, cuda, driver}, "date", "command",
 "results": [{"metric", "value", "unit", "config"}]}
plus a markdown table (.md) and a plot (.png) beside it.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

T = TypeVar("T")


# ---- command line -------------------------------------------------------------------------------------


def cuda_if_available(smoke: bool) -> str:
    """The default device of the kernel benchmarks: their smoke run uses the GPU too when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_for_smoke(smoke: bool) -> str:
    """The default device of the end-to-end benchmarks: their smoke run's tiny model runs on the CPU."""
    return "cpu" if smoke or not torch.cuda.is_available() else "cuda"


def bench_parser(doc: str, smoke_help: str, device_help: str | None = None) -> argparse.ArgumentParser:
    """The arguments every benchmark takes; a script adds its own before `parse_bench_args`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    parser.add_argument("--device", default=None, help=device_help)
    return parser


def parse_bench_args(parser: argparse.ArgumentParser, argv: list[str] | None,
                     default_device: Callable[[bool], str] = cuda_if_available,
                     needs_cuda: bool = False) -> argparse.Namespace:
    """Parsed arguments, `device` filled in from `default_device(smoke)` when not given. `needs_cuda`: only
    the smoke run may go without a CUDA device."""
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = default_device(args.smoke)
    if needs_cuda and not args.smoke and not args.device.startswith("cuda"):
        parser.error("the full benchmark needs a CUDA device; use --smoke on a CPU (the Triton interpreter)")
    return args


def if_importable(build: Callable[[], T], what: str) -> T | None:
    """build(), or None (said on stdout) when it needs a package that cannot be imported: a comparison with
    an optional library is skipped, not failed."""
    try:
        return build()
    except ImportError as e:
        print(f"{what} is not available ({e}); skipping it", flush=True)
        return None


# transformers compiles a model's forward by itself when `generate` runs a static cache on CUDA (30-90 s per
# batch shape, and again for each new one): a benchmark measures transformers as run, eager, unless it compiles
# on purpose (decode.py --hf-compile). Every `generate` call of a benchmark goes through hf_generate.
HF_GENERATE_KWARGS = {"disable_compile": True}


def hf_generate(hf: Any, **kwargs: Any) -> Any:
    """hf.generate(**kwargs) with transformers' automatic compilation off (HF_GENERATE_KWARGS)."""
    return hf.generate(**HF_GENERATE_KWARGS, **kwargs)


def interpret_kernels() -> None:
    """Runs the Triton kernels in the interpreter (no CUDA). Read when the kernels are decorated, so it must be
    called before their modules are first imported."""
    os.environ.setdefault("TRITON_INTERPRET", "1")


# ---- timing -------------------------------------------------------------------------------------------


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    driver = None
    if torch.cuda.is_available():
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10,
            )
            driver = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            driver = None
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda, "driver": driver}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_ms(fn: Callable[[], T], device: str) -> tuple[float, T]:
    """(wall milliseconds, result) of one fn() call, the device synchronized before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3, out


def median_ms(fn: Callable[[], T], device: str, repeats: int) -> tuple[float, T]:
    """(median wall milliseconds, result of the last run) over `repeats` runs after one warm-up run."""
    fn()
    runs = [timed_ms(fn, device) for _ in range(repeats)]
    return statistics.median(ms for ms, _ in runs), runs[-1][1]


def time_fn(fn: Callable[[], object], device: str, warmup: int = 3, iters: int = 20) -> float:
    """Median wall time of fn() in milliseconds (device events on CUDA, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.startswith("cuda"):
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth_gbps(device: str, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (bytes read + bytes written per second), in GB/s."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device, warmup=3, iters=10)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


# ---- results ------------------------------------------------------------------------------------------


# (bench, device, out_dir, results) of the benchmark whose rows `record` writes out as they come; see autosave.
_autosave: tuple[str, str, Path | None, list[dict]] | None = None


def autosave(bench: str, device: str, results: list[dict], out_dir: Path | None = None) -> None:
    """From now on every `record` into `results` also rewrites the results file (JSON and markdown, no plot):
    a benchmark stopped by its time limit keeps every figure it measured. `write_results` at the end writes
    the same files again, with the plot."""
    global _autosave
    _autosave = (bench, device, out_dir, results)


def record(results: list[dict], metric: str, value: float, unit: str, **config: Any) -> None:
    """Appends one result row (the schema of `write_results`) and prints it; writes the results file too when
    `autosave` was called for this list."""
    results.append({"metric": metric, "value": value, "unit": unit, "config": config})
    shown = ", ".join(f"{k}={v}" for k, v in config.items())
    print(f"{metric:38s} {value:12.4g} {unit:10s} {shown}", flush=True)
    if _autosave is not None and _autosave[3] is results:
        bench, device, out_dir, _ = _autosave
        write_results(bench, device, results, out_dir, quiet=True)


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (matplotlib is the `bench` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 120) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def write_results(bench: str, device: str, results: list[dict], out_dir: Path | None = None,
                  plot: Callable[[Path], None] | None = None, quiet: bool = False) -> Path:
    """Write the JSON, a markdown table and (if `plot` is given) a PNG, and say where; returns the JSON path."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    name = device_name(device)
    today = _dt.date.today()
    stem = f"{bench}-{_slug(name)}-{today.strftime('%Y%m%d')}"
    doc = {
        "bench": bench,
        "device": name,
        "versions": versions(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "results": results,
    }
    json_path = out_dir / f"{stem}.json"
    # Written beside and renamed: a run killed mid-write leaves the previous complete file.
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(json_path)
    lines = [f"# {bench} on {name} ({doc['date']})", "", f"`{doc['command']}`", "",
             "| metric | value | unit | config |", "|---|---|---|---|"]
    for r in results:
        value = r["value"]
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        config = ", ".join(f"{k}={v}" for k, v in r.get("config", {}).items())
        lines.append(f"| {r['metric']} | {shown} | {r['unit']} | {config} |")
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    if plot is not None:
        plot(out_dir / f"{stem}.png")
    if not quiet:
        print(f"wrote {json_path}", flush=True)
    return json_path
