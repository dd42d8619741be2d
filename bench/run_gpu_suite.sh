#!/usr/bin/env bash
# The GPU run in one command, sized for a 15-minute GPU slot (in all, the
# machine's start and the transfers included):
#
#   bash bench/run_gpu_suite.sh [--dry-run] OUT_ROOT [full|quick] [STAGE ...]
#
#   full  (default) <= 8 min on one H100/H200 (16 cores): the test files holding GPU tests
#         run whole (fp32/fp16/bf16 on the GPU), then the benchmarks on reduced grids.
#   quick <= 4 min: every GPU code path once (each kernel, layout, dtype family, head dim
#         64/128, split and no split, CUDA graphs, torch.compile, the CUDA extension's ops) and
#         the headline benchmark rows (bench/README.md's results table, 1.5B rows for decode
#         and token slots).
#
# Stages, in order (default all): build tests-triton tests-cuda attention decode token_slots.
# `build` runs in the background beside `tests-triton` (the Triton kernels need no
# extension); `tests-cuda` waits for it. Every stage has a wall-clock limit (`timeout`), and
# the whole suite a deadline (SUITE_S, default 465 full / 225 quick, leaving 15 s for a
# killed stage's grace period and the archive): a stage gets min(its limit, time left) and is
# skipped when under MIN_STAGE_S (10) s are left, so the suite ends in time whatever hangs.
# The benchmarks stop starting new shapes before their limit (--max-seconds) and write their
# CSVs; the first shape always runs. Stages named on the command line run in that order.
#
# Limits (env, seconds)       full   quick
#   BUILD_S                    180    150   (expected ~60-90: 7 translation units, sm_90a only)
#   TRITON_TESTS_S             240    120   (compile-bound: pytest-xdist workers if installed)
#   CUDA_TESTS_S               120     60
#   ATTENTION_S                120     70   (flex compiles once per shape, ~5-20 s)
#   DECODE_S                   120     45
#   SLOTS_S                     90     30
# The time estimates come from the test counts and shapes; no GPU has run this yet. Each run
# prints the 25 slowest tests (logs/*.log) to size the next one.
#
# OUT_ROOT receives <device>/*.csv|png (results), logs/*.log, logs/*.xml (JUnit) and
# logs/stages.txt (each stage's outcome and seconds); at the end, always (a failed or killed
# stage included), OUT_ROOT.tar.gz of all of it. Exit status 1 if a stage failed, timed out
# or was skipped for time, 2 on bad arguments.
# --dry-run prints each stage's limit and command and runs nothing.
#
# On a copy of the tree without .git (the archive is the one file to fetch back):
#   TIDAR_BENCH_COMMIT=<sha> bash bench/run_gpu_suite.sh /tmp/g quick
# The CUDA extension is built for TIDAR_CUDA_ARCHS (default here 90a, the H100/H200). Python:
# $PYTHON, default python3 (the device image's torch). Nothing is downloaded. To commit
# results: copy OUT_ROOT/<device>/ to bench/results/<device>/.
set -uo pipefail
cd "$(dirname "$0")/.."

ALL_STAGES=(build tests-triton tests-cuda attention decode token_slots)
usage() {
  echo "usage: bash bench/run_gpu_suite.sh [--dry-run] OUT_ROOT [full|quick] [${ALL_STAGES[*]} ...]" >&2
  exit 2
}
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
[ $# -ge 1 ] || usage
OUT_ARG=$1
shift
MODE=full
case "${1:-}" in full|quick) MODE=$1; shift ;; esac
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=("${ALL_STAGES[@]}")
for s in "${STAGES[@]}"; do
  case " ${ALL_STAGES[*]} " in
    *" $s "*) ;;
    *) echo "unknown stage '$s' (expected full, quick or stages from: ${ALL_STAGES[*]})" >&2; usage ;;
  esac
done

PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export TIDAR_CUDA_ARCHS="${TIDAR_CUDA_ARCHS:-90a}"  # the build and the test of what was built agree
if [ "$MODE" = quick ]; then
  SUITE_S=${SUITE_S:-225} BUILD_S=${BUILD_S:-150} TRITON_TESTS_S=${TRITON_TESTS_S:-120}
  CUDA_TESTS_S=${CUDA_TESTS_S:-60} ATTENTION_S=${ATTENTION_S:-70} DECODE_S=${DECODE_S:-45} SLOTS_S=${SLOTS_S:-30}
else
  SUITE_S=${SUITE_S:-465} BUILD_S=${BUILD_S:-180} TRITON_TESTS_S=${TRITON_TESTS_S:-240}
  CUDA_TESTS_S=${CUDA_TESTS_S:-120} ATTENTION_S=${ATTENTION_S:-120} DECODE_S=${DECODE_S:-120} SLOTS_S=${SLOTS_S:-90}
fi
MIN_STAGE_S=${MIN_STAGE_S:-10}  # a stage with less time than this left is skipped

# ---------------------------------------------------------------------------------------------
# What each stage runs
# ---------------------------------------------------------------------------------------------
T=python_tests
# quick: one test per GPU code path (the kernel test files' ids; python_tests/test_bench.py
# checks on the CPU that each id exists and that every gpu-marked test function is here).
QUICK_TRITON_TESTS=(
  "$T/test_triton_attention.py::test_training_forward_backward[S150-B6-gqa2-multitile-fp32]"
  "$T/test_triton_attention.py::test_training_forward_backward[S150-B6-gqa2-multitile-bf16]"
  "$T/test_triton_attention.py::test_causal_forward_backward[T133-multitile-bf16]"
  "$T/test_triton_attention.py::test_decode_step[k1-n0,1,37-mha-bf16]"
  "$T/test_triton_attention.py::test_decode_step[k4-n1029,3-gqa4-split-bf16]"
  "$T/test_triton_attention.py::test_decode_step[k16-n37-gqa2-fp32]"
  "$T/test_triton_attention.py::test_prefill[P37-k3-cached-split-bf16]"
  "$T/test_triton_attention.py::test_causal_append[T1-ar-step-bf16]"
  "$T/test_triton_attention.py::test_opcheck_every_triton_op"
  "$T/test_triton_attention.py::test_backend_support_matrix"
  "$T/test_triton_attention.py::test_model_shapes[qwen8b-bf16-128]"
  "$T/test_triton_attention.py::test_model_shapes[qwen1.5b-fp16-64]"
  "$T/test_triton_attention.py::test_decode_step_cuda_graph_replay_with_changing_lengths[pointer]"
  "$T/test_triton_attention.py::test_decode_step_cuda_graph_replay_with_changing_lengths[tma]"
  "$T/test_triton_attention.py::test_torch_compile_fullgraph_over_triton_ops"
  "$T/test_paged_kv.py::test_paged_triton_on_gpu[decode-k3-page16-bf16]"
  "$T/test_paged_kv.py::test_paged_triton_on_gpu[prefill-P9-k2-page1-fp16]"
  "$T/test_paged_kv.py::test_paged_triton_on_gpu_long_cache[page64]"
  "$T/test_paged_kv.py::test_paged_decode_step_cuda_graph_replay_with_changing_tables[triton]"
  "$T/test_paged_kv.py::test_paged_loops_on_gpu_match_contiguous"
  "$T/test_paged_kv.py::test_paged_step_never_syncs"
  "$T/test_triton_tma.py::test_tma_on_gpu_matches_pointer_loop[qwen1.5b-k16-bf16]"
  "$T/test_triton_tma.py::test_tma_decode_step_under_torch_compile"
)
QUICK_CUDA_TESTS=(
  "$T/test_cuda_decode_attention.py::test_extension_imports_and_registers_ops"
  "$T/test_cuda_decode_attention.py::test_matches_reference[k4-long-many-splits-d64-fp16]"
  "$T/test_cuda_decode_attention.py::test_matches_reference[k4-long-many-splits-d128-bf16]"
  "$T/test_cuda_decode_attention.py::test_matches_reference[k16-mha-full-and-empty-d128-fp16]"
  "$T/test_cuda_decode_attention.py::test_matches_reference[k16-mha-full-and-empty-d64-bf16]"
  "$T/test_cuda_decode_attention.py::test_cuda_backend_supports_decode_on_this_gpu"
  "$T/test_cuda_decode_attention.py::test_strided_inputs_and_custom_scale"
  "$T/test_cuda_decode_attention.py::test_public_api_uses_cuda_backend"
  "$T/test_cuda_decode_attention.py::test_cuda_graph_replay_with_commit_over_many_steps"
  "$T/test_cuda_decode_attention.py::test_opcheck[bf16]"
  "$T/test_cuda_decode_attention.py::test_bad_input_raises_before_any_write"
  "$T/test_cuda_decode_attention.py::test_skewed_split_magnitudes_within_rule[bf16]"
  "$T/test_paged_kv.py::test_paged_cuda_kernel_on_gpu[page3-bf16-d128-gqa3-3splits-bf16]"
  "$T/test_paged_kv.py::test_paged_cuda_kernel_on_gpu_long_cache[page16]"
  "$T/test_paged_kv.py::test_bad_paged_kernel_input_raises_before_any_write_on_gpu"
  "$T/test_paged_kv.py::test_paged_decode_step_cuda_graph_replay_with_changing_tables[cuda]"
  "$T/test_accept_drafts.py::test_cuda_matches_twin[beta0.5-B16-k16-V152064-fp16]"
  "$T/test_accept_drafts.py::test_cuda_matches_twin[beta0.5-B16-k16-V152064-bf16]"
  "$T/test_accept_drafts.py::test_cuda_matches_twin[beta0.3-B3-k4-V32001-odd-fp32]"
  "$T/test_accept_drafts.py::test_cuda_ties_go_to_lowest_index[V100003]"
  "$T/test_accept_drafts.py::test_cuda_inactive_and_strided_logits"
  "$T/test_accept_drafts.py::test_cuda_mixed_logit_dtypes"
  "$T/test_accept_drafts.py::test_cuda_nan_wins_like_torch_argmax"
  "$T/test_accept_drafts.py::test_cuda_subnormal_logits_compare_exactly"
  "$T/test_accept_drafts.py::test_cuda_public_api_selects_cuda"
  "$T/test_accept_drafts.py::test_cuda_opcheck"
  "$T/test_accept_drafts.py::test_cuda_bad_input_raises_before_launch"
  "$T/test_accept_drafts.py::test_cuda_graph_replay_advances_lengths"
  "$T/test_generate.py::test_cuda_graph_step_matches_eager"
  "$T/test_generate.py::test_bf16_agreement_rate"
  "$T/test_generate.py::test_step_never_syncs[greedy]"
  "$T/test_generate.py::test_step_never_syncs[sampled]"
  "$T/test_hf_integration.py::test_cuda_generate_and_loss"
  "$T/test_fsdp.py::test_fsdp_bf16_mixed_precision_on_cuda_trains_like_autocast"
)
# Every file with gpu-marked tests (python_tests/test_bench.py checks that none lies elsewhere).
# The Triton stage runs the first (no extension needed); the CUDA stage, after the build, the rest
# (test_paged_kv.py holds the paged CUDA kernel's GPU tests besides the Triton ones).
GPU_TEST_FILES=("$T/test_triton_attention.py" "$T/test_triton_tma.py" "$T/test_paged_kv.py" "$T/test_cuda_decode_attention.py"
                "$T/test_accept_drafts.py" "$T/test_generate.py" "$T/test_hf_integration.py" "$T/test_fsdp.py")

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

stage_command() {  # stage_command NAME: set CMD (argv) and LIMIT for the stage in this mode
  case $1 in
    build)
      LIMIT=$BUILD_S
      CMD=(env TIDAR_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-8}" "$PY" -m pip install --no-build-isolation --no-deps
           --no-index -e .) ;;
    tests-triton)
      LIMIT=$TRITON_TESTS_S
      if [ "$MODE" = quick ]; then
        pytest_cmd tests-triton 6 "${QUICK_TRITON_TESTS[@]}"
      else
        pytest_cmd tests-triton 8 "${GPU_TEST_FILES[@]:0:2}"
      fi ;;
    tests-cuda)
      LIMIT=$CUDA_TESTS_S
      if [ "$MODE" = quick ]; then
        pytest_cmd tests-cuda 4 "${QUICK_CUDA_TESTS[@]}"
      else  # the files holding the extension's, the decode loop's and the integrations' GPU tests, whole
        pytest_cmd tests-cuda 4 "${GPU_TEST_FILES[@]:2}"
      fi ;;
    attention)
      LIMIT=$ATTENTION_S
      # new shapes start until LIMIT - 45 s: room for the last shape (a training shape ~30 s)
      CMD=("$PY" bench/attention.py --refcheck --out "$OUT_ROOT" --max-seconds $((LIMIT > 45 ? LIMIT - 45 : 0)))
      if [ "$MODE" = quick ]; then  # the two headline rows of bench/README.md
        CMD+=(--models qwen2.5-1.5b --train-models qwen3-8b --modes decode,train-fwdbwd --batches 1
              --draft-lens 16 --cache-lens 16384 --seq-lens 8192 --blocks 16)
      else
        CMD+=(--batches 1,4 --draft-lens 4,16 --cache-lens 1024,16384 --seq-lens 8192 --blocks 16)
      fi ;;
    decode)
      LIMIT=$DECODE_S
      if [ "$MODE" = quick ]; then
        CMD=("$PY" bench/decode.py --models qwen2.5-1.5b --draft-lens 4,8,16 --repeats 1 --new-tokens 16,64
             --out "$OUT_ROOT")
      else
        CMD=("$PY" bench/decode.py --models qwen2.5-1.5b,qwen3-8b --draft-lens 2,4,6,8,12,16 --out "$OUT_ROOT")
      fi ;;
    token_slots)
      LIMIT=$SLOTS_S
      if [ "$MODE" = quick ]; then  # batch 1, cache 4k: the flat region of the headline table
        CMD=("$PY" bench/token_slots.py --models qwen2.5-1.5b --batches 1 --cache-lens 4096 --max-tokens 256
             --out "$OUT_ROOT" --max-seconds $((LIMIT > 15 ? LIMIT - 15 : 0)))
      else
        CMD=("$PY" bench/token_slots.py --models qwen2.5-1.5b,qwen3-8b --batches 1,4 --cache-lens 4096
             --out "$OUT_ROOT" --max-seconds $((LIMIT > 30 ? (LIMIT - 30) / 2 : 0)))
      fi ;;
  esac
}

if [ "$DRY_RUN" = 1 ]; then
  OUT_ROOT=$OUT_ARG
  echo "mode $MODE, suite deadline ${SUITE_S} s"
  for s in "${STAGES[@]}"; do
    stage_command "$s"
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
  stage_command "$name"
  local left=$((DEADLINE - SECONDS))
  local limit=$((LIMIT < left ? LIMIT : left))
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
  if grep -qv " passed " "$STATUS_FILE"; then exit 1; fi
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
