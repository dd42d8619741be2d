#!/usr/bin/env bash
# The GPU run in one command, within a time budget:
#
#   bash bench/run_gpu_suite.sh [--dry-run] [--budget S] OUT_ROOT [full|quick] [STAGE ...]
#
#   full  (default) the test files holding GPU tests run whole (fp32/fp16/bf16 on the GPU), the
#         CUDA kernels under compute-sanitizer, then the benchmarks on reduced grids.
#   quick the tests marked gpu_quick: one case per GPU code path (each kernel, layout, dtype
#         family, head dim 64/128, split and no split, CUDA graphs, torch.compile, the CUDA
#         extension's ops; python_tests/test_bench.py checks on the CPU that every gpu-marked
#         test function has one), then the headline benchmark rows (bench/README.md's results
#         table, 1.5B rows for decode and token slots).
#
# --budget S (or env BUDGET_S; default 480 full, 240 quick): the seconds the whole run may take.
# The suite's deadline is S - 15 (the 15 s are a killed stage's 10 s grace and the archive): a
# stage gets min(its limit, time left) and is skipped when under MIN_STAGE_S (10) s are left,
# so the suite ends in time whatever hangs.
#
# Stages, in order (default all but sanitizer in quick mode):
#   build tests-triton tests-cuda sanitizer attention decode token_slots
# `build` runs in the background beside `tests-triton` (the Triton kernels need no
# extension); the later stages wait for it. `sanitizer` runs scripts/compute_sanitizer.sh
# (memcheck, racecheck, synccheck over the quick cases of the CUDA kernels) on the extension
# just built: it checks on the hardware what the CPU's emulated sanitizer builds cannot
# (real cp.async, ldmatrix, warp scheduling); without compute-sanitizer it is recorded as
# no-tool and does not fail the suite. The benchmarks stop starting new shapes before their
# limit (--max-seconds) and write their CSVs; the first shape always runs. Stages named on the
# command line run in that order.
#
# Limits (env, seconds)       full   quick
#   BUILD_S                    180    150   (expected ~60-90: 7 translation units, sm_90a only)
#   TRITON_TESTS_S             240    120   (compile-bound: pytest-xdist workers if installed)
#   CUDA_TESTS_S               120     75   (the paged Triton cases run here too: their file
#                                            holds the paged CUDA kernel's tests)
#   SANITIZER_S                 90     60   (three tools, one process each)
#   ATTENTION_S                120     70   (flex compiles once per shape, ~5-20 s)
#   DECODE_S                   120     45
#   SLOTS_S                     90     30
#   NEMOTRON_S                 120     60   (only with TIDAR_NEMOTRON_DIR: bench/decode.py --model on
#                                            that diffusion checkpoint, its spec LoRA if present)
# The time estimates come from the test counts and shapes; no GPU has run this yet. Each run
# prints the 25 slowest tests (logs/*.log) to size the next one.
#
# OUT_ROOT receives <device>/*.csv|png (results), logs/*.log, logs/*.xml (JUnit) and
# logs/stages.txt (each stage's outcome and seconds); at the end, always (a failed or killed
# stage included), OUT_ROOT.tar.gz of all of it. Exit status 1 if a stage failed, timed out
# or was skipped for time, 2 on bad arguments.
# --dry-run prints the deadline and each stage's limit and command and runs nothing.
#
# On a machine reached without git (the tree copied, one file brought back):
#   TIDAR_BENCH_COMMIT=<sha> bash bench/run_gpu_suite.sh /tmp/g quick; cp /tmp/g.tar.gz <back>/
# The CUDA extension is built for TIDAR_CUDA_ARCHS (default here 90a, the H100/H200). Python:
# $PYTHON, default python3 (the device image's torch). Nothing is downloaded. To commit
# results: copy OUT_ROOT/<device>/ to bench/results/<device>/.
set -uo pipefail
cd "$(dirname "$0")/.."

ALL_STAGES=(build tests-triton tests-cuda sanitizer attention decode token_slots nemotron)
usage() {
  echo "usage: bash bench/run_gpu_suite.sh [--dry-run] [--budget S] OUT_ROOT [full|quick] [${ALL_STAGES[*]} ...]" >&2
  exit 2
}
DRY_RUN=0
BUDGET_S=${BUDGET_S:-}
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY_RUN=1; shift ;;
    --budget) [ $# -ge 2 ] || usage; BUDGET_S=$2; shift 2 ;;
    --budget=*) BUDGET_S=${1#--budget=}; shift ;;
    -*) echo "unknown option '$1'" >&2; usage ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || usage
OUT_ARG=$1
shift
MODE=full
case "${1:-}" in full|quick) MODE=$1; shift ;; esac
STAGES=("$@")
if [ ${#STAGES[@]} -eq 0 ]; then
  STAGES=(build tests-triton tests-cuda sanitizer attention decode token_slots)
  [ "$MODE" = quick ] && STAGES=(build tests-triton tests-cuda attention decode token_slots)
  [ -n "${TIDAR_NEMOTRON_DIR:-}" ] && STAGES+=(nemotron)  # a local diffusion checkpoint to decode
fi
for s in "${STAGES[@]}"; do
  case " ${ALL_STAGES[*]} " in
    *" $s "*) ;;
    *) echo "unknown stage '$s' (expected full, quick or stages from: ${ALL_STAGES[*]})" >&2; usage ;;
  esac
done

PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export TIDAR_CUDA_ARCHS="${TIDAR_CUDA_ARCHS:-90a}"  # the build and the test of what was built agree
RESERVE_S=15  # a killed stage's grace (timeout --kill-after=10) and the archive
if [ "$MODE" = quick ]; then
  BUDGET_S=${BUDGET_S:-240} BUILD_S=${BUILD_S:-150} TRITON_TESTS_S=${TRITON_TESTS_S:-120}
  CUDA_TESTS_S=${CUDA_TESTS_S:-75} SANITIZER_S=${SANITIZER_S:-60} ATTENTION_S=${ATTENTION_S:-70}
  DECODE_S=${DECODE_S:-45} SLOTS_S=${SLOTS_S:-30} NEMOTRON_S=${NEMOTRON_S:-60}
else
  BUDGET_S=${BUDGET_S:-480} BUILD_S=${BUILD_S:-180} TRITON_TESTS_S=${TRITON_TESTS_S:-240}
  CUDA_TESTS_S=${CUDA_TESTS_S:-120} SANITIZER_S=${SANITIZER_S:-90} ATTENTION_S=${ATTENTION_S:-120}
  DECODE_S=${DECODE_S:-120} SLOTS_S=${SLOTS_S:-90} NEMOTRON_S=${NEMOTRON_S:-120}
fi
case $BUDGET_S in
  ''|*[!0-9]*) echo "--budget wants whole seconds, got '$BUDGET_S'" >&2; usage ;;
esac
[ "$BUDGET_S" -gt "$RESERVE_S" ] || { echo "--budget must exceed the ${RESERVE_S} s reserve" >&2; usage; }
SUITE_S=$((BUDGET_S - RESERVE_S))
MIN_STAGE_S=${MIN_STAGE_S:-10}  # a stage with less time than this left is skipped

# ---------------------------------------------------------------------------------------------
# What each stage runs
# ---------------------------------------------------------------------------------------------
T=python_tests
# Every file with gpu-marked tests (python_tests/test_bench.py checks that none lies elsewhere).
# The Triton stage runs the first two (no extension needed); the CUDA stage, after the build, the
# rest (test_paged_kv.py holds the paged CUDA kernel's GPU tests besides the Triton ones). Quick
# mode runs the gpu_quick cases of the same files; gpu_quick rather than "gpu and gpu_quick"
# because some quick cases run on the GPU without the gpu marker (fp32 Triton cases, which also
# run on the CPU under the interpreter, and the check that the extension just built imports).
GPU_TEST_FILES=("$T/test_triton_attention.py" "$T/test_triton_tma.py" "$T/test_paged_kv.py" "$T/test_cuda_decode_attention.py"
                "$T/test_accept_drafts.py" "$T/test_generate.py" "$T/test_hf_integration.py" "$T/test_fsdp.py")
QUICK=() TRITON_WORKERS=8
if [ "$MODE" = quick ]; then QUICK=(-m gpu_quick) TRITON_WORKERS=6; fi
NO_TOOL_EXIT=4  # scripts/compute_sanitizer.sh's exit status when it finds no compute-sanitizer

pytest_cmd() {  # pytest_cmd NAME WORKERS ARGS...: pytest with JUnit output and the slowest tests listed
  local name=$1 workers=$2
  shift 2
  local parallel=()
  if [ "$workers" -gt 1 ] && [ "$DRY_RUN" = 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
    parallel=(-n "$workers")
  elif [ "$workers" -gt 1 ] && [ "$DRY_RUN" = 1 ]; then
    parallel=("[-n $workers if pytest-xdist is installed]")
  fi
  CMD=("$PY" -m pytest -q -p no:cacheprovider --benchmark-disable "${parallel[@]}" --durations=25
       --junitxml="$OUT_ROOT/logs/$name.xml" "$@")
}

stage_command() {  # stage_command NAME CAP: set LIMIT (the stage's, at most CAP s) and CMD (argv)
  local own
  case $1 in
    build) own=$BUILD_S ;;
    tests-triton) own=$TRITON_TESTS_S ;;
    tests-cuda) own=$CUDA_TESTS_S ;;
    sanitizer) own=$SANITIZER_S ;;
    attention) own=$ATTENTION_S ;;
    decode) own=$DECODE_S ;;
    token_slots) own=$SLOTS_S ;;
    nemotron) own=$NEMOTRON_S ;;
  esac
  LIMIT=$((own < $2 ? own : $2))
  case $1 in
    build)
      CMD=(env TIDAR_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-8}" "$PY" -m pip install --no-build-isolation --no-deps
           --no-index -e .) ;;
    tests-triton)
      pytest_cmd tests-triton "$TRITON_WORKERS" "${QUICK[@]}" "${GPU_TEST_FILES[@]:0:2}" ;;
    tests-cuda)  # the files holding the extension's, the decode loop's and the integrations' GPU tests
      pytest_cmd tests-cuda 4 "${QUICK[@]}" "${GPU_TEST_FILES[@]:2}" ;;
    sanitizer)
      CMD=(env PYTHON="$PY" bash scripts/compute_sanitizer.sh) ;;
    attention)
      # new shapes start until LIMIT - 45 s: room for the last shape (a training shape ~30 s)
      CMD=("$PY" bench/attention.py --refcheck --out "$OUT_ROOT" --max-seconds $((LIMIT > 45 ? LIMIT - 45 : 0)))
      if [ "$MODE" = quick ]; then  # the two headline rows of bench/README.md
        CMD+=(--models qwen2.5-1.5b --train-models qwen3-8b --modes decode,train-fwdbwd --batches 1
              --draft-lens 16 --cache-lens 16384 --seq-lens 8192 --blocks 16)
      else
        CMD+=(--batches 1,4 --draft-lens 4,16 --cache-lens 1024,16384 --seq-lens 8192 --blocks 16)
      fi ;;
    decode)
      if [ "$MODE" = quick ]; then
        CMD=("$PY" bench/decode.py --models qwen2.5-1.5b --draft-lens 4,8,16 --repeats 1 --new-tokens 16,64
             --out "$OUT_ROOT")
      else
        CMD=("$PY" bench/decode.py --models qwen2.5-1.5b,qwen3-8b --draft-lens 2,4,6,8,12,16 --out "$OUT_ROOT")
      fi ;;
    token_slots)
      if [ "$MODE" = quick ]; then  # batch 1, cache 4k: the flat region of the headline table
        CMD=("$PY" bench/token_slots.py --models qwen2.5-1.5b --batches 1 --cache-lens 4096 --max-tokens 256
             --out "$OUT_ROOT" --max-seconds $((LIMIT > 15 ? LIMIT - 15 : 0)))
      else
        CMD=("$PY" bench/token_slots.py --models qwen2.5-1.5b,qwen3-8b --batches 1,4 --cache-lens 4096
             --out "$OUT_ROOT" --max-seconds $((LIMIT > 30 ? (LIMIT - 30) / 2 : 0)))
      fi ;;
    nemotron)  # AR, quadratic B = 4/8/16/32 and linear spec, batch 1 and 8, on the real weights
      [ -n "${TIDAR_NEMOTRON_DIR:-}" ] || { echo "the nemotron stage needs TIDAR_NEMOTRON_DIR" >&2; exit 2; }
      CMD=("$PY" bench/decode.py --model "$TIDAR_NEMOTRON_DIR" --draft-lens 4,8 --repeats 1 --new-tokens 64
           --out "$OUT_ROOT")
      if [ -d "$TIDAR_NEMOTRON_DIR/linear_spec_lora" ]; then
        CMD+=(--spec-lora "$TIDAR_NEMOTRON_DIR/linear_spec_lora")
      fi ;;
  esac
}

if [ "$DRY_RUN" = 1 ]; then
  OUT_ROOT=$OUT_ARG
  echo "mode $MODE, budget ${BUDGET_S} s, suite deadline ${SUITE_S} s"
  for s in "${STAGES[@]}"; do
    stage_command "$s" "$SUITE_S"
    printf 'stage %s (limit %s s):' "$s" "$LIMIT"
    printf ' %q' "${CMD[@]}"
    printf '\n'
  done
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
OUT_ROOT=$(mkdir -p "$OUT_ARG" && cd "$OUT_ARG" && pwd)
mkdir -p "$OUT_ROOT/logs"
STATUS_FILE="$OUT_ROOT/logs/stages.txt"
: > "$STATUS_FILE"
DEADLINE=$((SECONDS + SUITE_S))
BUILD_PID=""

run_stage() {  # run_stage NAME [--quiet]: run the stage within its limit, log it, record its outcome
  local name=$1 quiet=${2:-} start=$SECONDS status=0 outcome
  local left=$((DEADLINE - SECONDS))
  stage_command "$name" "$left"
  local limit=$LIMIT
  if [ "$limit" -lt "$MIN_STAGE_S" ]; then
    echo "=== $name: skipped, ${left} s left of the suite's ${SUITE_S} s"
    echo "$name skipped-for-time 0" >> "$STATUS_FILE"
    return
  fi
  echo "=== $name (limit $limit s): ${CMD[*]}"
  if [ -n "$quiet" ]; then
    timeout --kill-after=10 "$limit" "${CMD[@]}" > "$OUT_ROOT/logs/$name.log" 2>&1 || status=$?
  else
    timeout --kill-after=10 "$limit" "${CMD[@]}" 2>&1 | tee "$OUT_ROOT/logs/$name.log" || status=$?
  fi
  case $status in
    0) outcome=passed ;;
    124|137) outcome=timed-out ;;
    "$NO_TOOL_EXIT") [ "$name" = sanitizer ] && outcome=no-tool || outcome="failed(exit-$status)" ;;
    *) outcome="failed(exit-$status)" ;;
  esac
  echo "=== $name: $outcome after $((SECONDS - start)) s (suite $((SECONDS - SUITE_START)) s)"
  echo "$name $outcome $((SECONDS - start))" >> "$STATUS_FILE"
}

finish() {  # always: stop what still runs, pack OUT_ROOT, say what happened
  trap - EXIT INT TERM
  if [ -n "$BUILD_PID" ] && kill -0 "$BUILD_PID" 2>/dev/null; then  # the build's `timeout`, then its shell
    pkill -TERM -P "$BUILD_PID" 2>/dev/null
    kill "$BUILD_PID" 2>/dev/null
    wait "$BUILD_PID"
  fi
  tar -czf "$OUT_ROOT.tar.gz" -C "$OUT_ROOT" .
  echo "suite ($MODE) done in $((SECONDS - SUITE_START)) s; archive: $OUT_ROOT.tar.gz"
  cat "$STATUS_FILE"
  if grep -v " no-tool " "$STATUS_FILE" | grep -qv " passed "; then exit 1; fi
  exit 0
}
SUITE_START=$SECONDS
trap finish EXIT
trap 'echo "interrupted" >&2; exit 1' INT TERM

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
for s in "${STAGES[@]}"; do
  case $s in
    build)
      run_stage build --quiet &  # beside the Triton tests; its log is logs/build.log
      BUILD_PID=$! ;;
    tests-cuda)
      if [ -n "$BUILD_PID" ]; then wait "$BUILD_PID"; BUILD_PID=""; fi
      run_stage tests-cuda ;;
    *)
      if [ -n "$BUILD_PID" ] && [ "$s" != tests-triton ]; then wait "$BUILD_PID"; BUILD_PID=""; fi
      run_stage "$s" ;;
  esac
done
if [ -n "$BUILD_PID" ]; then wait "$BUILD_PID"; BUILD_PID=""; fi
