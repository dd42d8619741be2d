#!/usr/bin/env bash
# SASS instruction count per (kernel, arch) of csrc/*.cu, to show that a source
# change leaves the machine code alone (e.g. routing PTX through csrc/ptx.cuh).
#
# Compiles each kernel file with the nvcc flags of csrc/nvcc_flags.txt for TIDAR_CUDA_ARCHS
# (default "80;90a") and counts the instructions cuobjdump -sass lists per
# function. Needs nvcc and cuobjdump (the toolkit's, else the one Triton ships).
# Output: "arch  count  opcode-histogram-hash  kernel", sorted; diff two runs to compare.
# Usage: scripts/sass_counts.sh [file.cu ...]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/nvcc_kernels.sh
. scripts/nvcc_kernels.sh "$@"
CUOBJDUMP="${CUOBJDUMP:-$(command -v cuobjdump || true)}"
if [ -z "$CUOBJDUMP" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/cuobjdump" ]; then
  CUOBJDUMP="${CUDA_HOME:-/usr/local/cuda}/bin/cuobjdump"
fi
if [ -z "$CUOBJDUMP" ]; then
  CUOBJDUMP="$(python -c 'import triton, os; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))')"
fi
for f in "${files[@]}"; do
  compile_kernels "$f" "$tmp/out.o"
  # cuobjdump prints "arch = sm_XX", "Function : NAME", then lines "/*0040*/ OPCODE ... ;".
  "$CUOBJDUMP" -sass "$tmp/out.o" | awk '
    /arch = sm_/ { if (name != "") emit(); name = ""; arch = $3 }
    /Function :/ { if (name != "") emit(); name = $3; n = 0; delete ops }
    /^[[:space:]]+\/\*[0-9a-f]+\*\/[[:space:]]/ {
      line = $0; sub(/^[[:space:]]+\/\*[0-9a-f]+\*\/[[:space:]]+/, "", line)
      sub(/^@!?U?P[T0-9]+[[:space:]]+/, "", line); split(line, w, /[[:space:];]+/)
      n++; ops[w[1]]++
    }
    function emit(   k, h) { h = ""; for (k in ops) h = h k "=" ops[k] " "; print arch, n, name, h }
    END { if (name != "") emit() }
  ' | while read -r arch n name hist; do
    printf '%-7s %6s %s  %s\n' "$arch" "$n" "$(printf '%s' "$hist" | tr ' ' '\n' | sort | md5sum | cut -c1-8)" "$name"
  done
done | sort -k4
