# Sourced by scripts/demo.sh: creates .venv (once), installs the dependencies and the package in
# editable mode (scripts/test.sh sources the two parts as separate, timed stages).
# shellcheck source=scripts/setup_deps.sh
. scripts/setup_deps.sh
# shellcheck source=scripts/install_package.sh
. scripts/install_package.sh
