"""The plan of `bench/gpu_session.sh` on a lent GPU machine: which stages each prepared call runs, each stage's
time limit, and each call's estimated time on a bare H100/H200 with an empty Triton cache.

    python3 bench/session_plan.py                     # the table; exits 1 when a call's estimate is over 8 min
    python3 bench/session_plan.py --stages headline1  # "stage limit_s" lines, what gpu_session.sh runs

Standard library only: gpu_session.sh asks it before anything is built.

A lease is 15 minutes of device time, at most 10 per command, and each call starts a bare machine (minutes of
its own). So the headline figures come in two calls, each of which must end by itself, archive written, in
under 8 minutes: `headline1` (decode, selfrag, attention) and `headline2` (gemm, sampler, fp8_accuracy, then
the fast-path GPU tests, which get whatever time is left and are stopped with SIGINT at the call's deadline).

Estimate of a stage, cold = STAGE_START_S + cold compiles x COMPILE_S + its run time.
- Cold compiles are counted, not guessed: the kernels the stage launches at its shapes, read from the sm_90a
  table of the image's triton (bench/results/aot-sm90-triton3.6.0.json, written by bench/aot_compile.py at the
  engine's Llama-2-7B launches) by the label each compiled kernel carries ("eager decode b=5 c=512, fp16/fp8
  weights", ...). COMPILE_S is the per-kernel compile time of triton 3.6 for sm_90a (~2 s a kernel in that
  table's run on a CPU machine; a GPU machine's CPUs are faster, so this leans long).
- Run times are reasoned from each benchmark's work (model builds, captures, timed loops), not yet measured on
  a GPU: the first session's logs give the real figures to put here.
- A kernel an earlier stage of the same call compiled is a cache hit, not a cold compile (the same entry of the
  table is the same binary in triton's on-disk cache).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
AOT_TABLE = ROOT / "bench" / "results" / "aot-sm90-triton3.6.0.json"

CALL_LIMIT_S = 480  # what each call must end within, by its estimate: 8 minutes
DEADLINE_S = 460  # gpu_session.sh's deadline, counted from its start: every stage has ended by then
PACK_S = 10  # the last archive after the deadline
COMPILE_S = 2.0
STAGE_START_S = 15  # python, torch and the CUDA context of a stage's fresh process
BUILD_S = 60  # the editable install that builds the C++ extension, on a bare machine
# The least the fast-path tests are given in the call that runs them, last: they compile as they go, so in a
# short lease they check what they reach (the kernels' own tests first), and `tests` is a call of its own.
MIN_TESTS_S = 30


def _tiny(label: str) -> bool:
    return "tiny model" in label


def _fp16(label: str) -> bool:
    """A 7B launch with fp16 activations."""
    return ", fp16/" in label and not _tiny(label)


def _at_512(label: str) -> bool:
    return "c=512" in label or "CUDA graph decode" in label or "prompt" in label


@dataclass(frozen=True)
class Stage:
    name: str
    run_s: float  # steady-state work, compiles excluded
    launches: Callable[[str, str], bool] | None = None  # (kernel, label) -> launched by this stage
    limit_factor: float = 1.5  # the stage's timeout over its estimate (the call's deadline caps it too)
    start_s: float = STAGE_START_S


STAGES = {s.name: s for s in (
    # FP16 and FP8 weights, fp16 activations, batches 1 and 5, context 512: graphs, eager, cascade, prefill,
    # the sampler; transformers eager beside it (its automatic compile off).
    Stage("decode", 90, lambda k, lab: (_fp16(lab) and _at_512(lab)) or lab.startswith(("sampler b=1", "sampler b=5"))),
    # The FP8 GEMVs and GEMM (every autotune candidate) against cuBLAS fp16.
    Stage("gemm", 40, lambda k, lab: k.startswith("_fp8_") and _fp16(lab)),
    Stage("sampler", 15, lambda k, lab: k == "_fused_sample_kernel"),
    Stage("attention", 40, lambda k, lab: k in ("_prefill_kernel", "_decode_kernel", "_merge_kernel",
                                                  "_cascade_kernel") and _fp16(lab)),
    # The whole short form at 7B shapes, ours three ways and transformers, fp16 and FP8.
    Stage("selfrag", 60, lambda k, lab: (_fp16(lab) and (_at_512(lab) or "passages" in lab))
          or lab.startswith(("sampler b=1", "sampler b=5"))),
    # The tiny model (head_dim 48), fp16 and FP8 weights: the table's "tiny model" launches; a table written
    # before it had them stands in with one 7B decode path's kernels, about as many.
    Stage("fp8_accuracy", 20, lambda k, lab: _tiny(lab)),
    Stage("fp8_accuracy-proxy", 20, lambda k, lab: _fp16(lab) and "b=1 c=512" in lab),
    Stage("summary", 3, start_s=2),  # reads the results files: no torch
)}

# decode, selfrag and attention launch mostly the same 7B kernels, so they share a call (the later ones find
# them in the cache); the FP8 GEMM/GEMV and sampler benchmarks and the tiny model go with the tests.
CALLS: dict[str, list[str]] = {
    "headline1": ["decode", "selfrag", "attention", "summary"],
    "headline2": ["gemm", "sampler", "fp8_accuracy", "summary", "fast-path-tests"],
}


def compiled_by(stage: Stage, table: dict) -> set[int]:
    """The table's entries (by index) that the stage compiles: each is one binary in triton's cache."""
    if stage.launches is None:
        return set()
    found = {i for i, k in enumerate(table["kernels"]) if any(stage.launches(k["kernel"], lab)
                                                             for lab in k["launched_by"])}
    proxy = STAGES.get(f"{stage.name}-proxy")
    return found if found or proxy is None else compiled_by(proxy, table)


def cold_compiles(stage: Stage, table: dict, seen: set[int] | None = None) -> int:
    """Kernels the stage compiles that no earlier stage of the call did (those are hits in the cache)."""
    return len(compiled_by(stage, table) - (seen or set()))


def estimate_s(stage: Stage, table: dict, seen: set[int] | None = None) -> float:
    return stage.start_s + cold_compiles(stage, table, seen) * COMPILE_S + stage.run_s


def plan(call: str, table: dict) -> list[tuple[str, int, float]]:
    """[(stage, limit_s, estimate_s)] of a call; the tests' limit and estimate are what the deadline leaves."""
    rows, used, seen = [], BUILD_S, set()
    for name in CALLS[call]:
        if name == "fast-path-tests":
            left = DEADLINE_S - used
            rows.append((name, int(left), float(left)))
            used += left
            continue
        stage = STAGES[name]
        est = estimate_s(stage, table, seen)
        seen |= compiled_by(stage, table)
        rows.append((name, int(est * stage.limit_factor), est))
        used += est
    return rows


def call_estimate_s(call: str, table: dict) -> float:
    return BUILD_S + sum(est for _, _, est in plan(call, table)) + PACK_S


def check(table: dict) -> list[str]:
    problems = []
    for call in CALLS:
        total = call_estimate_s(call, table)
        if total > CALL_LIMIT_S:
            problems.append(f"{call}: estimated {total:.0f} s cold, over {CALL_LIMIT_S} s")
        tests = [lim for name, lim, _ in plan(call, table) if name == "fast-path-tests"]
        if tests and tests[0] < MIN_TESTS_S:
            problems.append(f"{call}: the fast-path tests get {tests[0]} s, under {MIN_TESTS_S} s")
    if DEADLINE_S + PACK_S > CALL_LIMIT_S:
        problems.append(f"the deadline {DEADLINE_S} s plus the last pack is over {CALL_LIMIT_S} s")
    return problems


def load_table(path: Path = AOT_TABLE) -> dict:
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", choices=sorted(CALLS), help="print the call's 'stage limit_s' lines only")
    ap.add_argument("--table", type=Path, default=AOT_TABLE)
    args = ap.parse_args(argv)
    table = load_table(args.table)
    if args.stages:
        for name, limit, _ in plan(args.stages, table):
            print(name, limit)
        return 0
    print(f"cold estimates on an H100/H200 (compiles counted from {args.table.name}, {COMPILE_S} s each; "
          f"deadline {DEADLINE_S} s from the call's start)")
    for call in CALLS:
        print(f"{call}: build {BUILD_S} s")
        seen: set[int] = set()
        for name, limit, est in plan(call, table):
            compiles = ""
            if name in STAGES:
                compiles = f"{cold_compiles(STAGES[name], table, seen):3d} cold compiles"
                seen |= compiled_by(STAGES[name], table)
            print(f"  {name:16s} estimate {est:5.0f} s  limit {limit:4d} s  {compiles}")
        print(f"  total {call_estimate_s(call, table):.0f} s (limit {CALL_LIMIT_S} s)")
    problems = check(table)
    for p in problems:
        print("PLAN OVER:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
