#!/usr/bin/env bash
# Proof that the emulated build catches kernel bugs: builds the emulated-kernel driver
# (csrc/emulation/driver.cpp) once per fault below with -DTIDAR_MUTATE_<fault>, which turns the
# source's TIDAR_MUTATION(<fault>, normal, mutated) points (csrc/mutation.h) into the fault, and
# requires the run to FAIL, through a wrong result or a sanitizer report:
#   no_refill_barrier  the __syncthreads before a shared K/V stage is refilled, removed  (TSan race)
#   wait_pending       cp.async.wait_group 2 instead of 1 in the key loop                (poison -> NaN)
#   v_not_transposed   ldmatrix without .trans for the V fragments                       (wrong output)
#   key_bound_past_end a tile loads keys up to and including its end bound               (NaN row read)
#   output_row_swap    the output store writes a thread's two rows swapped               (wrong output)
#   paged_wrong_page   a paged tile reads every row from the page of its first row       (wrong output)
#   partial_pair_swap  the 16-bit partial store packs a thread's two columns swapped     (wrong output)
#   merge_word_swap    the merge's 64-bit partial load (head dim 128) swaps its words    (wrong output)
# Before building anything it fails if a fault named here has no point in csrc/ or a point in
# csrc/ has no entry here. The unmutated sources must pass the same build first (CHECK_CLEAN=0
# skips that when the caller has just run them under the sanitizers). Exit 1 if any fault goes
# unnoticed or a point is missing, 2 on an unknown fault name.
# Usage: scripts/emulator_mutations.sh [fault ...]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

# fault -> the build that must catch it (emulated_sanitizers.sh: plain, asan or tsan)
declare -A faults=(
  [no_refill_barrier]=tsan [wait_pending]=plain [v_not_transposed]=plain [key_bound_past_end]=plain
  [output_row_swap]=plain [paged_wrong_page]=plain [partial_pair_swap]=plain [merge_word_swap]=plain
)
order=(no_refill_barrier wait_pending v_not_transposed key_bound_past_end output_row_swap paged_wrong_page
       partial_pair_swap merge_word_swap)
[ $# -gt 0 ] && order=("$@")

points=" $(grep -rhoE 'TIDAR_MUTATION\([A-Za-z0-9_]+' csrc --exclude=mutation.h | sed 's/.*(//' | sort -u | tr '\n' ' ')"
bad=0
for fault in "${order[@]}"; do
  [ -n "${faults[$fault]:-}" ] || { echo "unknown fault '$fault' (known: ${!faults[*]})" >&2; exit 2; }
  case "$points" in
    *" $fault "*) ;;
    *) echo "MISSING $fault: no TIDAR_MUTATION($fault, ...) point in csrc/" >&2; bad=1 ;;
  esac
done
for point in $points; do
  [ -n "${faults[$point]:-}" ] || { echo "MISSING $point: csrc/ marks it, this script does not test it" >&2; bad=1; }
done
[ "$bad" = 0 ] || exit 1

if [ "${CHECK_CLEAN:-1}" = 1 ]; then  # scripts/test.sh sets 0: its sanitizer runs just passed these sources
  echo "== unmutated sources (plain build) must pass"
  bash scripts/emulated_sanitizers.sh csrc "$scratch/build-clean" plain --quick >/dev/null \
    || { echo "the unmutated sources fail: fix them before judging mutations" >&2; exit 1; }
fi
missed=0
for fault in "${order[@]}"; do
  sanitizer="${faults[$fault]}"
  start=$SECONDS
  if EXTRA_CXXFLAGS="-DTIDAR_MUTATE_$fault" bash scripts/emulated_sanitizers.sh csrc "$scratch/build-$fault" \
       "$sanitizer" --quick >"$scratch/$fault.log" 2>&1; then
    echo "MISSED  $fault: the $sanitizer build passed with the fault in place" >&2
    missed=1
  else
    why=$(grep -m1 -E "WARNING: ThreadSanitizer|ERROR: AddressSanitizer|runtime error|FAILED|tidar CUDA emulation" \
          "$scratch/build-$fault/$sanitizer.log" 2>/dev/null || echo "build or run failed")
    echo "caught  $fault ($sanitizer build, $((SECONDS - start)) s): $why"
  fi
done
exit $missed
