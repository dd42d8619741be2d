#!/usr/bin/env bash
# The CUDA kernels on the CPU under sanitizers: builds the stand-alone driver of the emulated
# kernels (csrc/emulation/driver.cpp: a matrix of decode and accept cases, each checked against
# a C++ reference) with AddressSanitizer + UndefinedBehaviorSanitizer (the memcheck equivalent:
# any out-of-bounds global or shared access, misaligned vector access) and with
# ThreadSanitizer (the racecheck equivalent: the emulated CUDA threads are OS threads), runs
# both, and fails on any sanitizer report or wrong result.
#
# Usage: scripts/emulated_sanitizers.sh [SRC_DIR [BUILD_DIR [asan|tsan|both|plain [driver args]]]]
#   SRC_DIR   sources to build (default: this checkout's csrc; the mutation script passes a copy)
#   BUILD_DIR where the binaries go (default build/sanitizers)
# EXTRA_CXXFLAGS (env) is added to every compile: the mutation script passes -DTIDAR_MUTATE_<name>.
# Needs g++ (or CXX) with libasan/libubsan/libtsan and the CUDA headers (scripts/cuda_headers.py).
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:-csrc}"
out="${2:-build/sanitizers}"
which="${3:-both}"
shift $(( $# < 3 ? $# : 3 ))
CXX="${CXX:-g++}"
mkdir -p "$out"
includes=()
IFS=';' read -ra dirs <<<"$(python scripts/cuda_headers.py)"
for d in "${dirs[@]}"; do includes+=(-I"$d"); done
sources=("$src/emulation/driver.cpp" "$src/emulation/kernels_emulated.cpp" "$src/decode_attention_plan.cpp")
common=(-std=c++17 -O1 -g -pthread -ffp-contract=off -Wno-unknown-pragmas -fno-omit-frame-pointer -I"$src" "${includes[@]}")
# shellcheck disable=SC2206
common+=(${EXTRA_CXXFLAGS:-})

run() {  # name, sanitizer flags, env
  local name=$1 flags=$2 env=$3
  shift 3  # the rest: driver arguments
  local start=$SECONDS
  # shellcheck disable=SC2086
  "$CXX" "${common[@]}" $flags "${sources[@]}" -o "$out/driver_$name"
  echo "[$name] built in $((SECONDS - start)) s"
  start=$SECONDS
  if env $env "$out/driver_$name" "$@" >"$out/$name.log" 2>&1; then
    echo "[$name] $(tail -1 "$out/$name.log") in $((SECONDS - start)) s, no sanitizer report"
  else
    tail -40 "$out/$name.log" >&2
    echo "[$name] FAILED (see $out/$name.log)" >&2
    return 1
  fi
}

status=0
if [ "$which" = plain ]; then  # no sanitizer: wrong results only (the mutation script's quick build)
  run plain "" "" "$@" || status=1
fi
if [ "$which" = asan ] || [ "$which" = both ]; then
  run asan "-fsanitize=address,undefined -fno-sanitize-recover=all" \
    "ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1" "$@" || status=1
fi
if [ "$which" = tsan ] || [ "$which" = both ]; then
  run tsan "-fsanitize=thread" "TSAN_OPTIONS=halt_on_error=1:exitcode=66:report_signal_unsafe=0" "$@" || status=1
fi
exit $status
