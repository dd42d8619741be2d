#!/usr/bin/env bash
# Run the CUDA backend's GPU tests under compute-sanitizer: memcheck (out-of-bounds
# and misaligned accesses, also in the cp.async / ldmatrix paths), racecheck
# (shared-memory hazards between the warps of a CTA) and synccheck. Needs a GPU and
# the built extension. Exit status: non-zero if any tool reports an error.
#
# Usage: scripts/compute_sanitizer.sh [pytest -k expression]
#   default expression keeps the run short: one shape per kernel path.
set -euo pipefail
cd "$(dirname "$0")/.."
SANITIZER="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}"
PYTHON="${PYTHON:-python}"
# (CUDA-graph tests are left out: capture needs the caching allocator this disables.)
EXPR="${1:-k1-mha-n0 or k4-gqa4 or k16-gqa4 or long-many-splits or strided or cuda_matches_twin or ties or inactive}"
TESTS=(python_tests/test_cuda_decode_attention.py python_tests/test_accept_drafts.py)

status=0
for tool in memcheck racecheck synccheck; do
  echo "=== compute-sanitizer --tool $tool ==="
  extra=()
  [ "$tool" = memcheck ] && extra=(--leak-check no)
  # --error-exitcode makes a report fail the run even when pytest itself passes;
  # PYTORCH_NO_CUDA_MEMORY_CACHING lets memcheck see each tensor's real bounds.
  if ! PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" "${extra[@]}" --error-exitcode 99 \
      --target-processes all "$PYTHON" -m pytest -q -x -m gpu -k "$EXPR" "${TESTS[@]}"; then
    echo "compute-sanitizer $tool: FAILED"
    status=1
  fi
done
exit $status
