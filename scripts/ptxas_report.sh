#!/usr/bin/env bash
# Print ptxas' register / spill report for every kernel of csrc/*.cu and fail if
# any of them spills (or uses a stack frame for spilling).
#
# Compiles each kernel file on its own with the nvcc flags of csrc/nvcc_flags.txt
# (scripts/nvcc_kernels.sh), for TIDAR_CUDA_ARCHS (default "80;90a").
# Output: one line per (kernel, arch). Exit 1 on spills.
# Usage: scripts/ptxas_report.sh [file.cu ...]      (CUDA_HOME defaults to /usr/local/cuda)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/nvcc_kernels.sh
. scripts/nvcc_kernels.sh "$@"

status=0
# Demangle the kernel names when c++filt is around.
demangle() { if command -v c++filt >/dev/null; then c++filt; else cat; fi; }
printf '%-7s %5s %6s %7s %7s  %s\n' arch regs stack spill_st spill_ld kernel
for f in "${files[@]}"; do
  log="$tmp/$(basename "$f").log"
  compile_kernels "$f" "$tmp/out.o" -Xptxas=-v >"$log" 2>&1 || { cat "$log"; echo "FAILED to compile $f"; exit 1; }
  # ptxas prints, per entry: "Compiling entry function 'NAME' for 'sm_XX'", then
  # "N bytes stack frame, S bytes spill stores, L bytes spill loads", then "Used R registers".
  set +e
  awk -v file="$f" '
    /Compiling entry function/ { split($0, q, "'"'"'"); name = q[2]; arch = q[4] }
    /bytes stack frame/ { stack = $1; spill_s = $5; spill_l = $9 }
    /Used [0-9]+ registers/ {
      for (i = 1; i <= NF; i++) if ($i == "Used") regs = $(i + 1)
      printf "%-7s %5s %6s %7s %7s  %s\n", arch, regs, stack, spill_s, spill_l, name
      if (spill_s + 0 > 0 || spill_l + 0 > 0) bad = 1
    }
    END { exit bad }
  ' "$log" | demangle
  spilled=${PIPESTATUS[0]}
  set -e
  [ "$spilled" -eq 0 ] || { echo "SPILLS in $f"; status=1; }
done
[ $status -eq 0 ] && echo "ptxas: no spills in ${#files[@]} file(s) for archs ${ARCHS}"
exit $status
