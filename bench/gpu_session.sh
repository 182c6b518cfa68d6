#!/usr/bin/env bash
# What a lent GPU machine is for (run from the repository root):
#
#   bash bench/gpu_session.sh headline      # one call: every headline figure, about 6 minutes on an H100/H200
#
# or stage by stage, each call well inside the device tool's ten-minute limit:
#
#   bash bench/gpu_session.sh tests                          # the whole pytest -m gpu
#   bash bench/gpu_session.sh attention gemm sampler fp8_accuracy
#   bash bench/gpu_session.sh decode
#   bash bench/gpu_session.sh selfrag scheduler
#
# `headline` runs, in this order: the GPU tests that guard the fast paths (CUDA graphs, overlapped stepping, FP8
# kernels, attention kernels, the sampler); decode (FP16 and FP8, batch 1 and 5, context 512, transformers
# beside it); gemm; sampler; attention; selfrag; fp8_accuracy; then a summary that fails when a headline metric
# of DEVELOPERS.md is missing. Every stage runs under its own `timeout` (its limit is printed with it; STAGE_TIMEOUT
# overrides them all), and `headline` keeps the stages' limits inside HEADLINE_BUDGET seconds (default 540), so a
# hang costs one stage, never the lease, and the archive is always written.
#
# Every call first makes `selfrag_engine` importable for the machine's python3: when `import
# selfrag_engine.kernels, selfrag_engine._C` fails it installs the working tree in editable mode, offline (the
# image has torch, triton, pybind11, setuptools and the test dependencies, and no network). If that fails, the
# first line printed says so. Each stage's output goes to a log; the logs and the results the benchmarks wrote
# (under $OUT/bench/results) are packed into $OUT/gpu-session.tar.gz after every stage, one file, since the
# device tool brings back only a few. Unpack it in the repository root: the results land in bench/results/.
# SMOKE=1 passes --smoke to the benchmarks (a check of this script on the CPU; limits are then tripled).
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
LOGS="$OUT/logs"
RESULTS="$OUT/bench/results"
ARCHIVE="$OUT/gpu-session.tar.gz"
mkdir -p "$LOGS" "$RESULTS"
STATUS=0
DEADLINE=""  # seconds since start (bash's SECONDS) by which every stage must have ended; set by `headline`

pack() {
  tar -czf "$ARCHIVE.tmp" -C "$OUT" bench logs && mv "$ARCHIVE.tmp" "$ARCHIVE"
}

# stage NAME LIMIT_SECONDS COMMAND...: runs COMMAND under `timeout` with its output in logs/NAME.log, prints one
# status line and the log's last $TAIL lines (6), and repacks the archive. timeout kills the stage's whole process group
# (SIGTERM, then SIGKILL 10 s later), so children such as pytest workers go with it.
stage() {
  local name=$1 limit=$2
  shift 2
  limit=${STAGE_TIMEOUT:-$((limit * SCALE))}
  if [ -n "$DEADLINE" ]; then
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 20 ]; then
      printf '== %-14s skipped: the session budget is spent\n' "$name" | tee "$LOGS/$name.log"
      STATUS=1
      pack
      return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
  fi
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  local note=""
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
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

# The fast paths whose correctness the headline figures rest on: graphs, overlap, FP8, attention, sampler, the
# kernels against the torch path, and the tiny Self-RAG model's answers with all of them on.
FAST_PATH_TESTS=(tests/test_cuda_graph.py tests/test_engine_overlap.py tests/test_engine_cascade.py tests/test_fp8.py
                 tests/test_kernels_attention.py tests/test_kernels_elementwise.py tests/test_sampler.py
                 tests/test_model_parity.py tests/test_tiny_model.py)

# Every headline metric of DEVELOPERS.md's table, read back from the results files; exits 1 when one is missing.
# The table is read, not copied, so a metric added there is asked for here. Rows recorded on the CPU (`device
# "cpu"`: counts that hold on any device) are not a GPU run's.
SUMMARY_PY=$(cat <<'EOF'
import json, re, sys
from pathlib import Path

results, developers = Path(sys.argv[1]), Path(sys.argv[2])
table = re.search(r"^\| bench \| metrics \|\n\|---\|---\|\n((?:\|.*\n)+)", developers.read_text(), re.M)
if table is None:
    sys.exit(f"no '| bench | metrics |' table in {developers}")
headline = {}
for row in table.group(1).splitlines():
    bench, metrics = (cell.strip() for cell in row.strip("|").split("|", 1))
    if 'device "cpu"' not in metrics:
        headline[bench.strip("`")] = re.findall(r"`(\w+)`", metrics)
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
cat "$LOGS/versions.log"
pack

for s in "$@"; do
  case $s in
    tests) stage tests 540 "$PY" -m pytest -q -ra -m gpu tests ;;
    attention | decode | fp8_accuracy | gemm | sampler | scheduler | selfrag) bench "$s" 540 ;;
    headline)
      DEADLINE=$((SECONDS + ${HEADLINE_BUDGET:-540} * SCALE))
      # Limits: about twice what each stage should take on an H100/H200 (Triton compiling its kernels on first
      # use is most of the tests' and decode's time), ~6 minutes in all; the budget caps their sum.
      stage fast-path-tests 120 "$PY" -m pytest -q -ra -m gpu "${FAST_PATH_TESTS[@]}"
      bench decode 150 --batches 1,5 --contexts 512
      bench gemm 60
      bench sampler 40
      bench attention 60
      bench selfrag 90 --repeats 3
      bench fp8_accuracy 40
      TAIL=40 stage summary 20 "$PY" -c "$SUMMARY_PY" "$RESULTS" DEVELOPERS.md
      DEADLINE=""
      ;;
    *) echo "unknown stage $s (headline, tests, attention, decode, fp8_accuracy, gemm, sampler, scheduler, selfrag)"
       STATUS=1 ;;
  esac
done

pack
echo "packed $(find "$RESULTS" -type f | wc -l) result files and the logs into $ARCHIVE"
exit $STATUS
