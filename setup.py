"""Build tidar-kernels: the CUDA extension ahead of time when possible, else pure Python.

Environment (all documented in docs/ENVIRONMENT.md):
  TIDAR_BUILD_CUDA   "1" forces the CUDA build (error if impossible), "0" skips it;
                     unset: build when a CUDA toolkit and a CUDA-enabled torch exist.
  TIDAR_CUDA_ARCHS   semicolon list of targets, default "80;90a" (sm_80 and sm_90a).
  TIDAR_PTXAS_VERBOSE  "1" prints ptxas register/spill reports for every kernel.
  TIDAR_BUILD_EMULATED "1" forces the emulated extension tidar_kernels._C_emulated (the CUDA
                     kernels compiled for the CPU, backend "cuda_emulated"), "0" skips it; unset:
                     build it when CUDA headers are found (no GPU or nvcc needed).
  CUDA_HOME          the toolkit; if unset we take it from the real nvcc (torch's own
                     guess from a wrapper in /usr/local/bin is wrong on some machines).
No GPU is needed to build. Install with `pip install --no-build-isolation .` so
the extension is compiled against the torch you run.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from cuda_headers import find_cuda_headers, find_cuda_home  # noqa: E402  (shared with the scripts)


def skipped_build(switch: str, reason: str) -> str:
    """Why an optional extension is not built; exits instead when ``switch`` (an env var) forces it ("1")."""
    if os.environ.get(switch) == "1":
        sys.exit(f"{switch}=1 but {reason}")
    return reason


def want_cuda_build():
    """(build?, reason) following TIDAR_BUILD_CUDA and what this machine has."""
    if os.environ.get("TIDAR_BUILD_CUDA") == "0":
        return False, "TIDAR_BUILD_CUDA=0"
    try:
        import torch
    except ImportError:
        return False, skipped_build("TIDAR_BUILD_CUDA", "torch is not importable at build time (install torch "
                                    "first, use --no-build-isolation)")
    cuda_home = find_cuda_home()
    if torch.version.cuda is None or cuda_home is None:
        reason = "no CUDA-enabled torch" if torch.version.cuda is None else "no CUDA toolkit found (set CUDA_HOME)"
        return False, skipped_build("TIDAR_BUILD_CUDA", reason)
    os.environ["CUDA_HOME"] = cuda_home
    return True, f"CUDA toolkit at {cuda_home}, torch CUDA {torch.version.cuda}"


def nvcc_flags():
    """The kernels' nvcc flags from csrc/nvcc_flags.txt (shared with CMakeLists.txt and scripts/nvcc_kernels.sh)."""
    with open(os.path.join(ROOT, "csrc", "nvcc_flags.txt")) as lines:
        return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def cuda_extension():
    from torch.utils.cpp_extension import CUDAExtension

    archs = os.environ.get("TIDAR_CUDA_ARCHS", "80;90a").split(";")
    gencode = []
    for arch in filter(None, (a.strip() for a in archs)):
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    flags = nvcc_flags() + gencode
    if os.environ.get("TIDAR_PTXAS_VERBOSE") == "1":
        flags.append("-Xptxas=-v")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    return CUDAExtension(
        name="tidar_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": flags},
    )


def want_emulated_build():
    """(include dirs or None, reason) following TIDAR_BUILD_EMULATED and what this machine has."""
    if os.environ.get("TIDAR_BUILD_EMULATED") == "0":
        return None, "TIDAR_BUILD_EMULATED=0"
    try:
        import torch  # noqa: F401
    except ImportError:
        return None, skipped_build("TIDAR_BUILD_EMULATED", "torch is not importable at build time")
    headers = find_cuda_headers()
    if headers is None:
        return None, skipped_build("TIDAR_BUILD_EMULATED", "no CUDA headers (toolkit, or Triton's bundled ones)")
    return headers, f"CUDA headers from {headers[0]}"


def emulated_extension(headers):
    """The CUDA kernel sources compiled by the host compiler against csrc/emulation/ (CPU backend)."""
    from torch.utils.cpp_extension import CppExtension

    sources = [os.path.join("csrc", "emulation", "bindings_emulated.cpp"),
               os.path.join("csrc", "emulation", "kernels_emulated.cpp"),
               os.path.join("csrc", "decode_attention_plan.cpp")]
    # Hidden symbols: the kernels keep the CUDA build's names (tidar::run_decode_attention, ...).
    # No FMA contraction: the kernels' __fadd_rn/__fmul_rn and the emulated rounding stay exact.
    flags = ["-O2", "-std=c++20", "-fvisibility=hidden", "-ffp-contract=off", "-pthread", "-Wno-unknown-pragmas"]
    return CppExtension(
        name="tidar_kernels._C_emulated",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + headers,
        extra_compile_args={"cxx": flags},
        extra_link_args=["-pthread"],
    )


build_cuda, reason = want_cuda_build()
emulated_headers, emulated_reason = want_emulated_build()
ext_modules, cmdclass = [], {}
if build_cuda:
    ext_modules.append(cuda_extension())
    print(f"tidar-kernels: building the CUDA extension ({reason})", flush=True)
else:
    print(f"tidar-kernels: installing the pure-Python package without the CUDA extension ({reason})", flush=True)
if emulated_headers is not None:
    ext_modules.append(emulated_extension(emulated_headers))
    print(f"tidar-kernels: building the emulated CUDA kernels for the CPU ({emulated_reason})", flush=True)
else:
    print(f"tidar-kernels: not building the emulated CUDA kernels ({emulated_reason})", flush=True)
if ext_modules:
    from torch.utils.cpp_extension import BuildExtension

    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(
    packages=find_packages(include=["tidar_kernels", "tidar_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
