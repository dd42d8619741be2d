#!/usr/bin/env bash
# Builds the torch extension through CMakeLists.txt (find_package(Torch)) from the
# same csrc/ sources as setup.py, and checks the result loads and registers the
# tidar ops. Needs the environment of scripts/setup_env.sh and a CUDA toolkit.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CUDA_HOME:=/usr/local/cuda}"
archs="${TIDAR_CUDA_ARCHS:-80;90a}"
# torch's CMake wants "8.0;9.0a" where we write "80;90a"
torch_archs=$(echo "$archs" | sed -E 's/([0-9])([0-9]a?)(;|$)/\1.\2\3/g')
prefix=$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')
args=(-DTIDAR_BUILD_EXTENSION=ON "-DTIDAR_CUDA_ARCHS=$archs" "-DCMAKE_PREFIX_PATH=$prefix"
      "-DCUDA_TOOLKIT_ROOT_DIR=$CUDA_HOME" "-DCMAKE_CUDA_COMPILER=$CUDA_HOME/bin/nvcc"
      "-DPython3_EXECUTABLE=$(command -v python)")
if ! ls "$CUDA_HOME"/lib64/libnvrtc.so* >/dev/null 2>&1; then
  # Toolkits without NVRTC: the one torch's pip dependencies ship.
  nvrtc=$(python -c 'import glob, os, nvidia; print(next(iter(sorted(glob.glob(os.path.join(nvidia.__path__[0], "*", "lib", "libnvrtc.so*")))), ""))')
  [ -n "$nvrtc" ] && args+=("-DCUDA_nvrtc_LIBRARY=$nvrtc")
fi
TORCH_CUDA_ARCH_LIST="$torch_archs" cmake -S . -B build/cmake-ext -G Ninja "${args[@]}" >build/cmake-ext.log 2>&1 \
  || { tail -30 build/cmake-ext.log >&2; exit 1; }
cmake --build build/cmake-ext -j "${MAX_JOBS:-2}" >>build/cmake-ext.log 2>&1 || { tail -30 build/cmake-ext.log >&2; exit 1; }
python - <<'PY'
import sys
sys.path.insert(0, "build/cmake-ext")
import torch  # noqa: F401  (loads libtorch for the module)
import _C
assert hasattr(torch.ops.tidar, "cached_attention_cuda") and hasattr(torch.ops.tidar, "accept_drafts_cuda")
print(f"CMake build of the extension: loads, ops registered, archs {_C.compiled_archs()}")
PY
