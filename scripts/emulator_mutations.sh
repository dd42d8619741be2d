#!/usr/bin/env bash
# Proof that the emulated build catches kernel bugs: applies each fault below to a scratch copy
# of csrc/, builds the emulated-kernel driver (csrc/emulation/driver.cpp) from it and requires
# the run to FAIL, through a wrong result or a sanitizer report:
#   no_refill_barrier  the __syncthreads before a shared K/V stage is refilled, removed  (TSan race)
#   wait_pending       cp.async.wait_group 2 instead of 1 in the key loop                (poison -> NaN)
#   v_not_transposed   ldmatrix without .trans for the V fragments                       (wrong output)
#   key_bound_past_end a tile loads keys up to and including its end bound         (NaN row read)
#   output_row_swap    the output store writes a thread's two rows swapped               (wrong output)
#   paged_wrong_page   a paged tile reads every row from the page of its first row       (wrong output)
#   partial_pair_swap  the 16-bit partial store packs a thread's two columns swapped     (wrong output)
#   merge_word_swap    the merge's 64-bit partial load (head dim 128) swaps its words    (wrong output)
# The unmutated sources must pass the same build first (CHECK_CLEAN=0 skips that when the caller
# has just run them under the sanitizers). Exit 1 if any fault goes unnoticed.
# Usage: scripts/emulator_mutations.sh [fault ...]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

# fault -> "sanitizer|file|original text|replacement"
declare -A faults=(
  [no_refill_barrier]="tsan|decode_attention.cuh|    __syncthreads();  // every warp is done with this stage before it is refilled|"
  [wait_pending]="plain|decode_attention.cuh|    cp_async_wait<1>();  // this stage has landed|    cp_async_wait<2>();  // this stage has landed"
  [v_not_transposed]="plain|decode_attention.cuh|ldmatrix_x4_trans(vb, smem_addr(|ldmatrix_x4(vb, smem_addr("
  [key_bound_past_end]="plain|decode_attention.cuh|const bool valid = first + row < end;|const bool valid = first + row <= end;"
  [output_row_swap]="plain|decode_attention.cuh|    const int r = row0 + warp * 16 + quad_row + 8 * h;
    if (r >= rows) continue;|    const int r = row0 + warp * 16 + quad_row + 8 * (1 - h);
    if (r >= rows) continue;"
  [paged_wrong_page]="plain|decode_attention.cuh|        page = page_of(pages, p, t);|        page = page_of(pages, p, first);"
  [partial_pair_swap]="plain|decode_attention.cuh|pack(o_acc[i][2 * h] * inv, o_acc[i][2 * h + 1] * inv)|pack(o_acc[i][2 * h + 1] * inv, o_acc[i][2 * h] * inv)"
  [merge_word_swap]="plain|decode_attention.cuh|pairs[0] = static_cast<uint32_t>(bits), pairs[1] = static_cast<uint32_t>(bits >> 32);|pairs[1] = static_cast<uint32_t>(bits), pairs[0] = static_cast<uint32_t>(bits >> 32);"
)
order=(no_refill_barrier wait_pending v_not_transposed key_bound_past_end output_row_swap paged_wrong_page
       partial_pair_swap merge_word_swap)
[ $# -gt 0 ] && order=("$@")

mutate() {  # file, original, replacement -> exactly one occurrence replaced
  python3 - "$1" "$2" "$3" <<'PY'
import sys
path, old, new = sys.argv[1:]
text = open(path).read()
count = text.count(old)
if count != 1:
    sys.exit(f"mutation not applicable: {count} occurrences of {old!r} in {path}")
open(path, "w").write(text.replace(old, new))
PY
}

if [ "${CHECK_CLEAN:-1}" = 1 ]; then  # scripts/test.sh sets 0: its sanitizer runs just passed these sources
  echo "== unmutated sources (plain build) must pass"
  cp -r csrc "$scratch/clean"
  bash scripts/emulated_sanitizers.sh "$scratch/clean" "$scratch/build-clean" plain --quick >/dev/null \
    || { echo "the unmutated sources fail: fix them before judging mutations" >&2; exit 1; }
fi
missed=0
for fault in "${order[@]}"; do
  spec="${faults[$fault]}"  # fields may span lines: split on '|' by hand
  sanitizer="${spec%%|*}"; rest="${spec#*|}"; file="${rest%%|*}"; rest="${rest#*|}"
  original="${rest%%|*}"; replacement="${rest#*|}"
  src="$scratch/$fault"
  cp -r csrc "$src"
  mutate "$src/$file" "$original" "$replacement"
  start=$SECONDS
  if bash scripts/emulated_sanitizers.sh "$src" "$scratch/build-$fault" "$sanitizer" --quick >"$scratch/$fault.log" 2>&1; then
    echo "MISSED  $fault: the $sanitizer build passed with the fault in place" >&2
    missed=1
  else
    why=$(grep -m1 -E "WARNING: ThreadSanitizer|ERROR: AddressSanitizer|runtime error|FAILED|tidar CUDA emulation" \
          "$scratch/build-$fault/$sanitizer.log" 2>/dev/null || echo "build or run failed")
    echo "caught  $fault ($sanitizer build, $((SECONDS - start)) s): $why"
  fi
done
exit $missed
