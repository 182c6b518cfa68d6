"""Shared helpers of the benchmark scripts: device description, timing, and the results files.

Each benchmark writes bench/results/<bench>-<device>-<YYYYMMDD>.json with the schema
{"bench", "device", "versions": {torch, triton, cuda, driver}, "date", "command",
 "results": [{"metric", "value", "unit", "config"}]}
plus a markdown table (.md) and a plot (.png) beside it.
"""
from __future__ import annotations

import datetime as _dt
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def write_results(bench: str, device: str, results: list[dict], out_dir: Path | None = None,
                  plot: Callable[[Path], None] | None = None) -> Path:
    """Write the JSON, a markdown table and (if `plot` is given) a PNG; returns the JSON path."""
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
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
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
    return json_path
