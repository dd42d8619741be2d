#!/usr/bin/env bash
# The Triton codegen report (scripts/triton_codegen_report.py) under every Triton users get
# from the supported torch range: the project environment's own (the newest, what pip pairs
# with the newest torch), then each older Triton that an older torch pins (torch 2.11 -> 3.6,
# torch 2.13 -> 3.8). Fails when any of them fails (a spill, a compute-bound matmul off wgmma,
# partials over the ideal bytes); every version is reported first. Prints the time per version.
#
# An older Triton is a light overlay, not a second torch: `pip install --no-deps --target
# build/triton-X triton==X` put first on PYTHONPATH of the project environment's python.
# The report's figures come from Triton's compiler alone (torch only provides meta tensors
# and the op registration), and the torch wheels of the older releases that pip offers
# here are CUDA builds with gigabytes of CUDA libraries.
#
# The newest Triton runs the full report (JSON lines: build/triton_codegen_report.jsonl);
# the older ones run the headline rows only (every shape but the opt-in `-tma` ones, which
# never fail the report), JSON lines in build/triton_codegen_report-X.jsonl.
#
#   bash scripts/codegen_all_tritons.sh            # CI
#   OLD_TRITONS="3.8.0" bash scripts/codegen_all_tritons.sh --arch sm_90a   # extra args go to the report
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON_BIN:-python}"  # the project environment (scripts/setup_env.sh activates .venv)
OLD_TRITONS="${OLD_TRITONS:-3.6.0 3.8.0}"
HEADLINE='^(?!.*-tma$)'
mkdir -p build
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

status=0
summary=()
report() {  # report LABEL JSON [report args...]; PYTHONPATH as set by the caller
  local label=$1 json=$2 start=$SECONDS rc=0
  shift 2
  echo "=== Triton codegen report: $label"
  "$PY" scripts/triton_codegen_report.py --json "$json" "$@" || rc=$?
  [ "$rc" = 0 ] || status=1
  summary+=("$label: report $((SECONDS - start)) s, $([ "$rc" = 0 ] && echo clean || echo FAILED)")
}

newest=$("$PY" -c "import triton; print(triton.__version__)")
report "Triton $newest (project environment, full report)" build/triton_codegen_report.jsonl "$@"

for version in $OLD_TRITONS; do
  overlay="build/triton-$version"
  start=$SECONDS
  if [ ! -f "$overlay/.installed" ]; then
    rm -rf "$overlay"
    PIP_CACHE_DIR="$PWD/build/pip-cache" "$PY" -m pip install -q --no-deps --no-compile \
      --target "$overlay" "triton==$version" >"build/triton-$version-install.log" 2>&1 \
      || { cat "build/triton-$version-install.log" >&2; echo "could not install Triton $version" >&2; exit 1; }
    touch "$overlay/.installed"
  fi
  got=$(PYTHONPATH="$PWD/$overlay:$PYTHONPATH" "$PY" -c "import triton; print(triton.__version__)")
  [ "$got" = "$version" ] || { echo "build/triton-$version imports Triton $got, not $version" >&2; exit 1; }
  setup_s=$((SECONDS - start))
  PYTHONPATH="$PWD/$overlay:$PYTHONPATH" report "Triton $version (headline rows)" \
    "build/triton_codegen_report-$version.jsonl" --only "$HEADLINE" "$@"
  summary[-1]="${summary[-1]}, install ${setup_s} s"
done

echo "=== Triton codegen report per version"
printf '  %s\n' "${summary[@]}"
exit "$status"
