"""Where the CUDA headers for a host-compiler build of the kernels are (the emulated backend).

Used by setup.py and scripts (CMake, sanitizer and mutation scripts); as a script it prints
the include directories separated by ';' (nothing and exit 1 when none are found).
The toolkit's include/ when there is one; else, without any toolkit, the CUDA runtime headers
Triton bundles plus CCCL's <nv/target> from NVIDIA's pip runtime package (both come with the
CUDA build of torch).
"""
import glob
import os
import shutil
import sys

NEEDED = ("cuda_runtime.h", os.path.join("crt", "host_defines.h"), "cuda_fp16.h", "cuda_bf16.h",
          os.path.join("nv", "target"))


def find_cuda_home():
    """CUDA_HOME, else the toolkit whose bin/ holds nvcc and include/ cuda_runtime.h."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def find_cuda_headers():
    """Include dirs holding every header of NEEDED, or None."""
    candidates = []
    home = find_cuda_home()
    if home:
        candidates.append([os.path.join(home, "include")])
    try:
        import nvidia
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "include")
        candidates.append([bundled] + sorted(glob.glob(os.path.join(nvidia.__path__[0], "*", "include", "cccl"))))
    except ImportError:
        pass
    for dirs in candidates:
        if all(any(os.path.exists(os.path.join(d, f)) for d in dirs) for f in NEEDED):
            return dirs
    return None


if __name__ == "__main__":
    found = find_cuda_headers()
    if found is None:
        sys.exit(1)
    print(";".join(found))
