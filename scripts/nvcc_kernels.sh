# Sourced by scripts/ptxas_report.sh and scripts/sass_counts.sh: compile the kernel files of
# csrc/*.cu on their own with setup.py's nvcc flags (no torch needed: the .cu files include
# only CUDA headers) for TIDAR_CUDA_ARCHS (default "80;90a").
# Sets NVCC, ARCHS, files (the arguments, else csrc/*.cu) and tmp (removed on exit);
# defines compile_kernels FILE OUT.o [extra nvcc flags...].
NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
ARCHS="${TIDAR_CUDA_ARCHS:-80;90a}"
gencode=()
IFS=';' read -ra arch_list <<<"$ARCHS"
for arch in "${arch_list[@]}"; do
  [ -n "$arch" ] && gencode+=(-gencode "arch=compute_${arch},code=sm_${arch}")
done
files=("$@")
[ ${#files[@]} -eq 0 ] && files=(csrc/*.cu)
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

compile_kernels() {
  local source="$1" object="$2"
  shift 2
  "$NVCC" -O3 -std=c++17 --use_fast_math -ftz=false -lineinfo --expt-relaxed-constexpr "${gencode[@]}" "$@" \
    -Icsrc -c "$source" -o "$object"
}
