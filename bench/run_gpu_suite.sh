#!/usr/bin/env bash
# The GPU run in one command: build the CUDA extension, run the GPU tests, run
# every benchmark. Sized for a single 10-minute device command on an H100
# (about 8 minutes: build ~1-2, tests <=2.5, token_slots ~2.5, decode ~1,
# attention ~2.5); each benchmark stops starting new shapes at its budget and
# says so in its CSV ("truncated").
#
#   bash bench/run_gpu_suite.sh OUT_ROOT [STAGE ...]
#
# OUT_ROOT receives <device>/*.csv|png (results), logs/*.log and, at the end,
# OUT_ROOT.tar.gz of both (one file to copy back). STAGEs, in order, default all:
# build tests token_slots decode attention.
#
# Budgets (env, seconds; a benchmark stops starting new shapes at its budget,
# and `timeout` kills a stage 120 s past it): TESTS_S=150, SLOTS_S=60 (per
# model), ATTENTION_S=120. The attention stage runs a reduced grid by default
# (ATTENTION_ARGS, the headline shapes; flex compiles once per shape, ~5 s);
# the full issue-3 grid takes about 9 minutes on its own:
#   ATTENTION_ARGS="" ATTENTION_S=480 bash bench/run_gpu_suite.sh OUT_ROOT attention
# The CUDA extension is built for TIDAR_CUDA_ARCHS (default here: 90a, the
# H100/H200; the package default builds 80 and 90a, twice the compile time).
# Python: $PYTHON, default python3 (the device image's torch). Nothing is
# downloaded: the build uses the installed torch (--no-build-isolation, --no-index).
#
# The CSVs record the git commit; where the tree was copied without .git, set
# TIDAR_BENCH_COMMIT=<sha> in the command.
#
# To commit results afterwards: copy OUT_ROOT/<device>/ to bench/results/<device>/.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ]; then
  echo "usage: bash bench/run_gpu_suite.sh OUT_ROOT [build|tests|token_slots|decode|attention ...]" >&2
  exit 2
fi
OUT_ROOT=$(mkdir -p "$1" && cd "$1" && pwd)
shift
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build tests token_slots decode attention)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_ROOT/logs"
SUITE_START=$SECONDS

stage() {  # stage NAME CMD...: run, log to OUT_ROOT/logs/NAME.log, report time; a failure does not stop the suite
  local name=$1 start=$SECONDS status=0
  shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$OUT_ROOT/logs/$name.log" || status=$?
  echo "=== $name: exit $status after $((SECONDS - start)) s (suite $((SECONDS - SUITE_START)) s)"
  if [ $status -ne 0 ]; then FAILED="$FAILED $name"; fi
}
FAILED=""
export TIDAR_CUDA_ARCHS="${TIDAR_CUDA_ARCHS:-90a}"  # the build and the test of what was built agree

TESTS_S=${TESTS_S:-150} SLOTS_S=${SLOTS_S:-60} ATTENTION_S=${ATTENTION_S:-120}
ATTENTION_ARGS=${ATTENTION_ARGS-"--batches 1,4 --draft-lens 4,16 --cache-lens 1024,16384 --blocks 16"}
for s in "${STAGES[@]}"; do
  case $s in
    build)
      if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
      stage build env TIDAR_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" \
        "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . ;;
    tests)
      # The kernel test files run whole (fp32/fp16/bf16 on the GPU); elsewhere the `gpu`-marked tests.
      kernel_tests=(python_tests/test_triton_attention.py python_tests/test_cuda_decode_attention.py
                    python_tests/test_accept_drafts.py)
      ignores=("${kernel_tests[@]/#/--ignore=}")
      stage tests timeout "$TESTS_S" bash -c "$PY -m pytest -q -p no:cacheprovider --benchmark-disable \
        ${kernel_tests[*]} && $PY -m pytest python_tests -m gpu -q -p no:cacheprovider --benchmark-disable \
        ${ignores[*]}" ;;
    token_slots)
      stage token_slots timeout $((2 * SLOTS_S + 120)) "$PY" bench/token_slots.py \
        --models qwen2.5-1.5b,qwen3-8b --out "$OUT_ROOT" --max-seconds "$SLOTS_S" ;;
    decode)
      stage decode timeout 300 "$PY" bench/decode.py --models "${DECODE_MODELS:-qwen2.5-1.5b,qwen3-8b}" \
        --out "$OUT_ROOT" ;;
    attention)
      # shellcheck disable=SC2086  # ATTENTION_ARGS is a list of options
      stage attention timeout $((ATTENTION_S + 120)) "$PY" bench/attention.py --refcheck --out "$OUT_ROOT" \
        --max-seconds "$ATTENTION_S" $ATTENTION_ARGS ;;
    *)
      echo "unknown stage '$s' (expected build, tests, token_slots, decode, attention)" >&2
      exit 2 ;;
  esac
done

tar -czf "$OUT_ROOT.tar.gz" -C "$OUT_ROOT" .
echo "suite done in $((SECONDS - SUITE_START)) s; archive: $OUT_ROOT.tar.gz"
if [ -n "$FAILED" ]; then
  echo "failed stages:$FAILED" >&2
  exit 1
fi
