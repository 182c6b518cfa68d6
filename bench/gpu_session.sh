#!/usr/bin/env bash
# What a lent GPU machine is for. A lease is 15 minutes of device time, at most 10 per command, on a bare
# machine with an empty Triton cache: run these two prepared calls first, in this order, from the repository
# root. Each ends by itself, archive written, inside 8 minutes cold by its own estimate:
#
#   bash bench/gpu_session.sh headline1   # decode (FP16/FP8, batch 1 and 5, context 512, transformers beside
#                                         # it), selfrag, attention, then a summary of their headline metrics
#   bash bench/gpu_session.sh headline2   # gemm, sampler, fp8_accuracy, their summary, then the fast-path GPU
#                                         # tests in whatever time is left (stopped by SIGINT, failures shown)
#
# `bash bench/gpu_session.sh plan` prints each call's stages, limits and cold estimate (bench/session_plan.py:
# cold compiles counted from the sm_90a AOT table of the image's triton, ~2 s each; CI checks the plan).
# Later leases, stage by stage: `tests` (the whole pytest -m gpu), `decode`, `selfrag`, `attention`, `gemm`,
# `sampler`, `fp8_accuracy`, `scheduler`; `headline` runs headline1 then headline2 in one call (for a machine
# without the ten-minute limit).
#
# The deadline is counted from this script's start, the build included: SESSION_BUDGET seconds (default 460,
# twice that for `headline`; tripled with SMOKE=1). A stage's limit is cut to what is left, a stage with under
# 20 s left is skipped, and the archive is rewritten after every stage. Every stage runs under `timeout`: pytest
# gets SIGINT (it stops and prints its failures, --tb=short), the benchmarks SIGTERM, and SIGKILL follows 10-20 s
# later, to the stage's whole process group, so a hang costs one stage, never the lease. STAGE_TIMEOUT overrides
# every stage's limit. The benchmarks write their results file after every measurement.
#
# Every call first makes `selfrag_engine` importable for the machine's python3: when `import
# selfrag_engine.kernels, selfrag_engine._C` fails it installs the working tree in editable mode, offline (the
# image has torch, triton, pybind11, setuptools and the test dependencies, and no network). If that fails, the
# first line printed says so. Logs and results are kept outside $OUT and packed into $OUT/gpu-session.tar.gz,
# the only file under $OUT (the device tool brings back at most 8, two folders deep); unpack it in the
# repository root: the results land in bench/results/, the logs in logs/.
#
# Triton: TRITON_DEFAULT_FP_FUSION=1, pinned (as kernels/__init__.py pins it). When the call carries a folder
# `.triton-cache` (a cache of sm_90a kernels compiled ahead of time on a CPU machine under the image's triton,
# `bench/aot_compile.py --cache-dir .triton-cache`), it is the Triton cache: versions.log says how many entries
# came with it and each stage's log how many were compiled there, i.e. whether the carried ones were hit.
# SMOKE=1 passes --smoke to the benchmarks (a check of this script on the CPU).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
SMOKE_ARGS=()
SCALE=1
if [ "${SMOKE:-0}" = 1 ]; then
  SMOKE_ARGS=(--smoke)
  SCALE=3
fi
mkdir -p "$OUT"
WORK=$(mktemp -d)
LOGS="$WORK/logs"
RESULTS="$WORK/bench/results"
ARCHIVE="$OUT/gpu-session.tar.gz"
mkdir -p "$LOGS" "$RESULTS"
STATUS=0
BUDGET=${SESSION_BUDGET:-460}
case " $* " in *" headline "*) BUDGET=${SESSION_BUDGET:-920} ;; esac
DEADLINE=$((BUDGET * SCALE))  # seconds since the start (bash's SECONDS) by which every stage has ended
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
if [ -d .triton-cache ]; then
  export TRITON_CACHE_DIR="$PWD/.triton-cache"
fi
CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
cache_entries() {  # compiled kernels in the Triton cache (one group file each)
  find "$CACHE_DIR" -name '__grp__*.json' 2>/dev/null | wc -l
}

pack() {
  tar -czf "$ARCHIVE.tmp" -C "$WORK" bench logs && mv "$ARCHIVE.tmp" "$ARCHIVE"
}

# stage NAME LIMIT_SECONDS COMMAND...: runs COMMAND under `timeout` with its output in logs/NAME.log, prints one
# status line and the log's last $TAIL lines (6), and repacks the archive. timeout signals the stage's whole
# process group ($SIGNAL, TERM unless set; KILL $GRACE seconds later, 10 unless set), so children such as pytest
# workers go with it.
stage() {
  local name=$1 limit=$2
  shift 2
  limit=${STAGE_TIMEOUT:-$((limit * SCALE))}
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 20 ]; then
    printf '== %-14s skipped: the session budget is spent\n' "$name" | tee "$LOGS/$name.log"
    STATUS=1
    pack
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS before
  before=$(cache_entries)
  timeout -s "${SIGNAL:-TERM}" -k "${GRACE:-10}" "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "gpu_session: Triton cache entries compiled in this stage: $(($(cache_entries) - before))" >>"$LOGS/$name.log"
  local note=""
  if [ $rc -eq 124 ] || [ $rc -eq 137 ] || { [ "${SIGNAL:-TERM}" = INT ] && [ $((SECONDS - start)) -ge "$limit" ]; }; then
    note="  TIMED OUT after ${limit}s (killed)"
    echo "gpu_session: stage $name killed after its ${limit}s limit" >>"$LOGS/$name.log"
  fi
  [ $rc -ne 0 ] && STATUS=1
  printf '== %-14s rc=%d  %4ds  (limit %ds)%s\n' "$name" "$rc" $((SECONDS - start)) "$limit" "$note"
  tail -n "${TAIL:-6}" "$LOGS/$name.log"
  pack
}

bench() {  # bench NAME LIMIT [ARGS...]: bench/NAME.py writing into $RESULTS
  local name=$1 limit=$2
  shift 2
  stage "$name" "$limit" "$PY" "bench/$name.py" --out "$RESULTS" "${SMOKE_ARGS[@]}" "$@"
}

# pytest under a stage: SIGINT at the limit (pytest stops and reports what failed so far), short tracebacks.
pytest_stage() {  # pytest_stage NAME LIMIT PYTEST_ARGS...
  local name=$1 limit=$2
  shift 2
  SIGNAL=INT GRACE=20 stage "$name" "$limit" "$PY" -m pytest -q -ra --tb=short -p no:cacheprovider "$@"
}

# The fast paths whose correctness the headline figures rest on, kernels first (each compiles little), then
# what runs them together: the tiny model on the kernels, graphs, overlap, cascade, the model against the
# torch path and the tiny Self-RAG model's answers.
FAST_PATH_TESTS=(tests/test_kernels_attention.py tests/test_kernels_elementwise.py tests/test_sampler.py tests/test_fp8.py
                 tests/test_tiny_on_kernels.py tests/test_cuda_graph.py tests/test_engine_overlap.py
                 tests/test_engine_cascade.py tests/test_model_parity.py tests/test_tiny_model.py)

# Every headline metric of DEVELOPERS.md's table, read back from the results files; exits 1 when one is missing.
# The table is read, not copied, so a metric added there is asked for here. Rows recorded on the CPU (`device
# "cpu"`: counts that hold on any device) are not a GPU run's.
SUMMARY_PY=$(cat <<'EOF'
import json, re, sys
from pathlib import Path

results, developers, only = Path(sys.argv[1]), Path(sys.argv[2]), set(sys.argv[3:])
table = re.search(r"^\| bench \| metrics \|\n\|---\|---\|\n((?:\|.*\n)+)", developers.read_text(), re.M)
if table is None:
    sys.exit(f"no '| bench | metrics |' table in {developers}")
headline = {}
for row in table.group(1).splitlines():
    bench, metrics = (cell.strip() for cell in row.strip("|").split("|", 1))
    bench = bench.strip("`")
    if 'device "cpu"' not in metrics and (not only or bench in only):
        headline[bench] = re.findall(r"`(\w+)`", metrics)
missing = []
for bench, metrics in headline.items():
    docs = [json.loads(p.read_text()) for p in sorted(results.glob(f"{bench}-*.json"))]
    for metric in metrics:
        rows = [(d["device"], r) for d in docs for r in d["results"] if r["metric"] == metric]
        if not rows:
            missing.append(metric)
            print(f"{bench:13s} {metric:44s} MISSING")
        for device, r in rows:
            shown = ", ".join(f"{k}={v}" for k, v in r["config"].items())
            print(f"{bench:13s} {metric:44s} {r['value']:10.4g} {r['unit']:9s} {device}  {shown}")
if missing:
    sys.exit(f"{len(missing)} headline metrics missing: {', '.join(missing)}")
EOF
)

# Importable selfrag_engine (with kernels/ mapped to selfrag_engine.kernels and the C++ extension built), first.
if ! "$PY" -c "import selfrag_engine.kernels, selfrag_engine._C" >"$LOGS/build.log" 2>&1; then
  {
    echo "gpu_session: selfrag_engine is not importable; installing the working tree (editable, offline)"
    # Bounded like a stage: a build that hangs must not take the lease either.
    timeout -k 10 300 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . \
      || timeout -k 10 300 "$PY" -m pip install --no-deps --no-build-isolation --no-index --break-system-packages -e .
  } >>"$LOGS/build.log" 2>&1
  if ! "$PY" -c "import selfrag_engine.kernels, selfrag_engine._C" >>"$LOGS/build.log" 2>&1; then
    # The first error line is the build's own (a compiler's, pip's); the import's traceback comes after it.
    reason=$(grep -m 1 -i 'error' "$LOGS/build.log" || tail -n 1 "$LOGS/build.log")
    echo "BUILD FAILED: selfrag_engine (its C++ extension selfrag_engine._C) could not be built or imported:" \
      "$(echo "$reason" | sed 's/^[[:space:]]*//') (logs/build.log)"
    STATUS=1
  fi
fi
"$PY" - >"$LOGS/versions.log" 2>&1 <<'EOF'
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
EOF
echo "Triton cache $CACHE_DIR: $(cache_entries) entries at the start; TRITON_DEFAULT_FP_FUSION=$TRITON_DEFAULT_FP_FUSION" \
  >>"$LOGS/versions.log"
cat "$LOGS/versions.log"
pack

# run_call CALL: the stages bench/session_plan.py lists for the call, with their limits (the plan needs only the
# standard library, so any python3 reads it, before or without the build).
run_call() {
  local call=$1 name limit benches=()
  while read -r name limit; do
    case $name in
      decode) bench decode "$limit" --batches 1,5 --contexts 512; benches+=(decode) ;;
      selfrag) bench selfrag "$limit" --repeats 3; benches+=(selfrag) ;;
      gemm | sampler | attention | fp8_accuracy) bench "$name" "$limit"; benches+=("$name") ;;
      summary) TAIL=40 stage "summary-$call" "$limit" "$PY" -c "$SUMMARY_PY" "$RESULTS" DEVELOPERS.md "${benches[@]}" ;;
      fast-path-tests) pytest_stage fast-path-tests "$limit" -m gpu "${FAST_PATH_TESTS[@]}" ;;
      *) echo "gpu_session: no plan for $call (logs/plan.log)"; STATUS=1 ;;
    esac
  done < <(python3 bench/session_plan.py --stages "$call" 2>>"$LOGS/plan.log" || echo "plan-failed 0")
}

for s in "$@"; do
  case $s in
    plan) stage plan 30 python3 bench/session_plan.py ;;
    tests) pytest_stage tests 540 -m gpu tests ;;
    attention | decode | fp8_accuracy | gemm | sampler | scheduler | selfrag) bench "$s" 540 ;;
    headline1 | headline2) run_call "$s" ;;
    headline) run_call headline1; run_call headline2 ;;
    *) echo "unknown stage $s (headline1, headline2, plan, tests, attention, decode, fp8_accuracy, gemm, sampler," \
         "scheduler, selfrag, headline)"
       STATUS=1 ;;
  esac
done

pack
rm -rf "$WORK"
files=$(find "$OUT" -type f | wc -l)
echo "packed the results and logs into $ARCHIVE ($files file(s) under \$OUT, $SECONDS s since the start)"
if [ "$files" -gt 8 ]; then
  echo "gpu_session: $files files under \$OUT: the device tool brings back at most 8"
  STATUS=1
fi
exit $STATUS
