# Sourced by scripts/ptxas_report.sh and scripts/sass_counts.sh: compile the kernel files of
# csrc/*.cu on their own with the nvcc flags of csrc/nvcc_flags.txt (those of setup.py and
# CMakeLists.txt; no torch needed: the .cu files include only CUDA headers) for
# TIDAR_CUDA_ARCHS (default "80;90a"). Run from the repository root.
# Sets NVCC, ARCHS, files (the arguments, else csrc/*.cu) and tmp (removed on exit);
# defines compile_kernels FILE OUT.o [extra nvcc flags...].
NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
ARCHS="${TIDAR_CUDA_ARCHS:-80;90a}"
gencode=()
IFS=';' read -ra arch_list <<<"$ARCHS"
for arch in "${arch_list[@]}"; do
  [ -n "$arch" ] && gencode+=(-gencode "arch=compute_${arch},code=sm_${arch}")
done
mapfile -t nvcc_flags < <(grep -v -e '^#' -e '^[[:space:]]*$' csrc/nvcc_flags.txt)
files=("$@")
[ ${#files[@]} -eq 0 ] && files=(csrc/*.cu)
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

compile_kernels() {
  local source="$1" object="$2"
  shift 2
  "$NVCC" "${nvcc_flags[@]}" "${gencode[@]}" "$@" \
    -Icsrc -c "$source" -o "$object"
}
