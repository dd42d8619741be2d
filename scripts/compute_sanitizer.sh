#!/usr/bin/env bash
# Run the CUDA backend's GPU tests under compute-sanitizer: memcheck (out-of-bounds
# and misaligned accesses, also in the cp.async / ldmatrix paths), racecheck
# (shared-memory hazards between the warps of a CTA) and synccheck. Needs a GPU and
# the built extension; bench/run_gpu_suite.sh runs it as its `sanitizer` stage.
# Exit status: 1 if any tool reports an error, 4 if compute-sanitizer is not found
# (COMPUTE_SANITIZER, else PATH, else $CUDA_HOME/bin).
#
# Usage: scripts/compute_sanitizer.sh [pytest -k expression]
#   default: the gpu_quick cases (one per kernel path) but the CUDA-graph tests (capture needs
#   the caching allocator this disables) and opcheck (registration, not memory: slow here);
#   given an expression: the gpu tests it selects.
set -euo pipefail
cd "$(dirname "$0")/.."
SANITIZER="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}"
[ -x "$SANITIZER" ] || { echo "compute-sanitizer not found ($SANITIZER)" >&2; exit 4; }
PYTHON="${PYTHON:-python}"
if [ $# -gt 0 ]; then
  SELECT=(-m gpu -k "$1")
else
  SELECT=(-m "gpu and gpu_quick" -k "not graph and not opcheck")
fi
TESTS=(python_tests/test_cuda_decode_attention.py python_tests/test_accept_drafts.py)

status=0
for tool in memcheck racecheck synccheck; do
  echo "=== compute-sanitizer --tool $tool ==="
  extra=()
  [ "$tool" = memcheck ] && extra=(--leak-check no)
  # --error-exitcode makes a report fail the run even when pytest itself passes;
  # PYTORCH_NO_CUDA_MEMORY_CACHING lets memcheck see each tensor's real bounds.
  if ! PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" "${extra[@]}" --error-exitcode 99 \
      --target-processes all "$PYTHON" -m pytest -q -x -p no:cacheprovider "${SELECT[@]}" "${TESTS[@]}"; then
    echo "compute-sanitizer $tool: FAILED"
    status=1
  fi
done
exit $status
