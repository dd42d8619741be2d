#!/usr/bin/env bash
# The whole test suite on a fresh machine: environment, CUDA compile check
# (where a toolkit exists), the C++ mask test (CTest) and pytest. CI runs this.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  export TIDAR_BUILD_CUDA="${TIDAR_BUILD_CUDA:-1}"
fi
# shellcheck source=scripts/setup_env.sh
. scripts/setup_env.sh

if [ "${TIDAR_BUILD_CUDA}" = "1" ]; then
  python -c "import tidar_kernels._C" || { echo "CUDA extension did not build although a toolkit exists" >&2; exit 1; }
  echo "CUDA extension built for TIDAR_CUDA_ARCHS=${TIDAR_CUDA_ARCHS:-80;90a}"
  bash scripts/ptxas_report.sh  # registers per kernel; fails on any spill
  bash scripts/cmake_extension.sh  # the same sources through CMakeLists.txt (find_package(Torch))
fi

# Triton codegen report (docs/codegen.md): every Triton kernel compiled ahead of time for sm_90a and
# sm_80 at the backend's own launch configurations; fails on spills and on compute-bound
# matmuls not on wgmma. No GPU needed.
python scripts/triton_codegen_report.py --json build/triton_codegen_report.jsonl

cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release \
  "-DTIDAR_CUDA_INCLUDE_DIRS=$(python scripts/cuda_headers.py || true)" >/dev/null  # emulated-primitive CTest
cmake --build build/cmake
ctest --test-dir build/cmake --output-on-failure

# --- The CUDA kernels on the CPU (docs/cuda-emulation.md): the emulated build, sanitizers, mutations -------
# (pytest below also runs python_tests/test_cuda_emulated.py against the cuda_emulated backend)
if python scripts/cuda_headers.py >/dev/null; then
  python -c "import tidar_kernels._C_emulated" \
    || { echo "the emulated CUDA kernels did not build although CUDA headers exist" >&2; exit 1; }
  bash scripts/emulated_sanitizers.sh csrc build/sanitizers asan          # ASan+UBSan, full case matrix
  bash scripts/emulated_sanitizers.sh csrc build/sanitizers tsan --quick  # TSan, the quick matrix
  CHECK_CLEAN=0 bash scripts/emulator_mutations.sh  # each injected kernel fault must be caught
fi
# ---------------------------------------------------------------------------------------------

# Triton kernels run on the CPU through the interpreter (fp32/fp16 only there).
export TRITON_INTERPRET=1
python -m pytest python_tests -q -p no:cacheprovider --benchmark-columns=min,median,max "$@"
