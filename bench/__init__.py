"""Benchmarks of tidar-kernels (see bench/README.md); run each script with ``--smoke`` on a CPU."""
