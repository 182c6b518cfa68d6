#!/usr/bin/env bash
# What a lent GPU machine is for, in stages that fit its ten-minute calls (run from the repository root):
#
#   bash bench/gpu_session.sh tests                          # pytest -m gpu
#   bash bench/gpu_session.sh attention gemm sampler fp8_accuracy
#   bash bench/gpu_session.sh decode
#   bash bench/gpu_session.sh selfrag scheduler
#
# Every call first builds the C++ extension for the machine's python3 when it cannot be imported (the image
# has torch, triton, pybind11 and the test dependencies, and no network). Each stage's output goes to a log;
# the logs and the results the benchmarks wrote (under $OUT/bench/results) are packed into
# $OUT/gpu-session.tar.gz, one file, since the device tool brings back only a few. Unpack it in the repository
# root: the results land in bench/results/. SMOKE=1 passes --smoke to the benchmarks (a check of this script
# on the CPU).
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
SMOKE_ARGS=()
[ "${SMOKE:-0}" = 1 ] && SMOKE_ARGS=(--smoke)
LOGS="$OUT/logs"
RESULTS="$OUT/bench/results"
mkdir -p "$LOGS" "$RESULTS"
STATUS=0

stage() {
  local name=$1
  shift
  local start=$SECONDS
  "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && STATUS=1
  printf '== %-14s rc=%d  %4ds\n' "$name" "$rc" $((SECONDS - start))
  tail -n 6 "$LOGS/$name.log"
}

if ! "$PY" -c "import selfrag_engine._C" 2>/dev/null; then
  stage build "$PY" setup.py build_ext --inplace
fi
"$PY" - >"$LOGS/versions.log" 2>&1 <<'EOF'
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
EOF
cat "$LOGS/versions.log"

for s in "$@"; do
  case $s in
    tests) stage tests "$PY" -m pytest -q -ra -m gpu tests ;;
    attention | decode | fp8_accuracy | gemm | sampler | scheduler | selfrag)
      stage "$s" "$PY" "bench/$s.py" --out "$RESULTS" "${SMOKE_ARGS[@]}" ;;
    *) echo "unknown stage $s (tests, attention, decode, fp8_accuracy, gemm, sampler, scheduler, selfrag)"; STATUS=1 ;;
  esac
done

tar -czf "$OUT/gpu-session.tar.gz" -C "$OUT" bench logs
echo "packed $(find "$RESULTS" -type f | wc -l) result files and the logs into $OUT/gpu-session.tar.gz"
exit $STATUS
