# Sourced by scripts/setup_env.sh and scripts/test.sh after scripts/setup_deps.sh: installs the
# package in editable mode into the active environment.
#
# The CUDA extension is built when a CUDA toolkit is found and either a GPU is
# present or the caller asks for the compile check (TIDAR_BUILD_CUDA=1, which
# scripts/test.sh sets on machines with a toolkit). TIDAR_BUILD_CUDA=0 skips it.
set -euo pipefail

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda  # torch guesses wrong from a wrapper in /usr/local/bin
fi
if [ -z "${TIDAR_BUILD_CUDA:-}" ]; then
  if [ -n "${CUDA_HOME:-}" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    export TIDAR_BUILD_CUDA=1
  else
    export TIDAR_BUILD_CUDA=0
  fi
fi
mkdir -p build
python -m pip install -v --no-build-isolation --no-deps -e . > build/pip-install.log 2>&1 \
  || { tail -50 build/pip-install.log >&2; exit 1; }
grep -h "tidar-kernels:" build/pip-install.log | head -2
python -c "import tidar_kernels" || { echo "tidar_kernels failed to import" >&2; exit 1; }
