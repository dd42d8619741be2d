#!/usr/bin/env bash
# The main job on a fresh machine: environment, then the TiDAR demo
# (trains a small model on the Python standard library, decodes with AR and TiDAR).
set -euo pipefail
cd "$(dirname "$0")/.."
# The demo needs no emulated CUDA kernels: skip their compile (scripts/test.sh builds them).
export TIDAR_BUILD_EMULATED="${TIDAR_BUILD_EMULATED:-0}"
# shellcheck source=scripts/setup_env.sh
. scripts/setup_env.sh
python -m tidar_kernels demo "$@"
