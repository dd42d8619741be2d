#!/usr/bin/env bash
# The whole test suite on a fresh machine: environment, CUDA compile check
# (where a toolkit exists), the C++ mask test (CTest) and pytest. CI runs this.
# Each stage prints "[stage] NAME: N s" when it ends (or fails), and the run its total.
set -euo pipefail
cd "$(dirname "$0")/.."

STAGE="" STAGE_START=0
stage() {  # stage NAME CMD...: run CMD in this shell (a sourced script's exports stay) and time it
  STAGE=$1 STAGE_START=$SECONDS
  shift
  "$@"
  echo "[stage] $STAGE: $((SECONDS - STAGE_START)) s"
  STAGE=""
}
# A stage that needs one core runs beside the next ones (the machine has two):
# background NAME CMD... starts it, output to build/stage-NAME.log; join NAME waits, prints that
# output and its time, and fails the run if it failed.
declare -A BACKGROUND=()
background() {
  local name=$1
  shift
  mkdir -p build
  ( start=$SECONDS
    "$@" >"build/stage-$name.log" 2>&1 && rc=0 || rc=$?
    echo "[stage] $name: $((SECONDS - start)) s (beside the stages that followed it)" >>"build/stage-$name.log"
    exit "$rc" ) &
  BACKGROUND[$name]=$!
}
join() {
  local name=$1 rc=0
  STAGE=$name STAGE_START=$SECONDS
  wait "${BACKGROUND[$name]}" || rc=$?
  cat "build/stage-$name.log"
  [ "$rc" = 0 ] || exit "$rc"
  STAGE=""
}
trap 'status=$?
      if [ -n "$STAGE" ]; then echo "[stage] $STAGE: failed after $((SECONDS - STAGE_START)) s"; fi
      echo "[stage] total: $SECONDS s"
      exit $status' EXIT

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  export TIDAR_BUILD_CUDA="${TIDAR_BUILD_CUDA:-1}"
fi
stage venv-deps . scripts/setup_deps.sh
stage build . scripts/install_package.sh  # the package, with the CUDA extension where a toolkit exists

# Triton codegen report (docs/codegen.md): every Triton kernel compiled ahead of time for sm_90a and
# sm_80 at the backend's own launch configurations, under the newest Triton and the older ones
# (3.6, 3.8) older torch releases pin; fails on spills and on compute-bound matmuls not on
# wgmma. No GPU needed. One core: it runs beside the compile-bound stages below.
background triton-codegen bash scripts/codegen_all_tritons.sh

if [ "${TIDAR_BUILD_CUDA}" = "1" ]; then
  python -c "import tidar_kernels._C" || { echo "CUDA extension did not build although a toolkit exists" >&2; exit 1; }
  echo "CUDA extension built for TIDAR_CUDA_ARCHS=${TIDAR_CUDA_ARCHS:-80;90a}"
  stage ptxas-report bash scripts/ptxas_report.sh  # registers per kernel; fails on any spill
  stage cmake-extension bash scripts/cmake_extension.sh  # the same sources through CMakeLists.txt (find_package(Torch))
fi

ctest_mask() {  # the emulated-primitive and mask C++ tests
  cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release \
    "-DTIDAR_CUDA_INCLUDE_DIRS=$(python scripts/cuda_headers.py || true)" >/dev/null
  cmake --build build/cmake
  ctest --test-dir build/cmake --output-on-failure
}
stage ctest ctest_mask

# --- The CUDA kernels on the CPU (docs/cuda-emulation.md): the emulated build, sanitizers, mutations ---
# (pytest below also runs python_tests/test_cuda_emulated.py against the cuda_emulated backend)
if python scripts/cuda_headers.py >/dev/null; then
  python -c "import tidar_kernels._C_emulated" \
    || { echo "the emulated CUDA kernels did not build although CUDA headers exist" >&2; exit 1; }
  stage sanitizers-asan bash scripts/emulated_sanitizers.sh csrc build/sanitizers asan  # ASan+UBSan, full case matrix
  stage sanitizers-tsan bash scripts/emulated_sanitizers.sh csrc build/sanitizers tsan --quick  # TSan, the quick matrix
  stage mutations env CHECK_CLEAN=0 bash scripts/emulator_mutations.sh  # each injected kernel fault must be caught
fi
# ---------------------------------------------------------------------------------------------

join triton-codegen

# Triton kernels run on the CPU through the interpreter (fp32/fp16 only there). Two workers
# (pytest-xdist), whole files each so module fixtures load once; TEST_WORKERS=0 runs in-process.
export TRITON_INTERPRET=1
workers=(-n "${TEST_WORKERS:-2}" --dist loadfile)
[ "${TEST_WORKERS:-2}" = 0 ] && workers=()
stage pytest python -m pytest python_tests -q -p no:cacheprovider --benchmark-columns=min,median,max \
  "${workers[@]}" "$@"
