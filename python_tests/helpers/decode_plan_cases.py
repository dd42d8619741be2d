"""Cases of the CUDA decode planner shared by the Python and C++ tests.

The CUDA kernel's planner (``csrc/decode_attention_plan.cpp``) runs the roofline model
of :mod:`tidar_kernels.kernels.roofline` mirrored in ``csrc/roofline.h``. :func:`cuda_decode_plan`
states that planner in Python with the kernel's tiling (64-row tiles, 4 warps, shared
memory from ``decode_smem_bytes``, an extra split for the step's own keys, partial outputs
in the 16-bit input dtype) and the Triton planner's ``PARTIAL_SLACK`` rule;
``python python_tests/helpers/decode_plan_cases.py`` rewrites ``csrc/tests/decode_plan_cases.txt``,
``test_roofline.py`` checks the committed file is current, and the CTest binary checks the
C++ planner reproduces every line. Lines:

    plan DEVICE_NAME SM_COUNT SMEM_PER_SM BATCH STEPS DRAFT_LEN Q_HEADS KV_HEADS HEAD_DIM MAX_LEN SPLITS
"""
from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tidar_kernels.kernels import roofline  # noqa: E402

CASES_FILE = ROOT / "csrc" / "tests" / "decode_plan_cases.txt"
BLOCK_M, BLOCK_N, WARPS, MAX_SPLITS = 64, 64, 4, 32  # csrc/decode_attention_plan.{h,cpp}
ELEM_BYTES = 2  # fp16/bf16 inputs and partial outputs: kDecodeElemBytes
# (name as the driver reports it, without spaces; SMs; shared memory per SM; compute capability)
DEVICES = [("NVIDIA_H100_80GB_HBM3", 132, 228 * 1024, 90), ("NVIDIA_H200", 132, 228 * 1024, 90),
           ("NVIDIA_A100-SXM4-80GB", 108, 164 * 1024, 80), ("NVIDIA_L40S", 142, 100 * 1024, 89)]


def decode_smem_bytes(head_dim: int) -> int:
    return (BLOCK_M + 4 * BLOCK_N) * (head_dim + 8) * 2


def cuda_decode_plan(batch, steps, draft_len, q_heads, kv_heads, head_dim, max_len,
                     device) -> tuple[roofline.CachedStep, int, roofline.Estimate]:
    """(step, splits, estimate) of the CUDA planner, ``decode_num_splits``."""
    step = roofline.CachedStep(batch, steps, q_heads, kv_heads, head_dim, max_len, draft_len, ELEM_BYTES)
    kernel = roofline.CachedKernel(BLOCK_M, WARPS, decode_smem_bytes(head_dim), local_split=True,
                                   partial_elem_bytes=ELEM_BYTES)
    _, splits, guess = roofline.plan_splits(step, [kernel], device, MAX_SPLITS, 4 * BLOCK_N, roofline.PARTIAL_SLACK)
    return step, splits, guess



def lines():
    for name, sms, smem, capability in DEVICES:
        device = roofline.device_for(name.replace("_", " "), sms, smem, capability)
        for head_dim in (64, 128):
            for q_heads, kv_heads in [(12, 2), (32, 8), (8, 8)]:
                for batch in (1, 2, 8):
                    for k in (1, 2, 4, 8, 16, 32):
                        for max_len in (300, 4096, 32768):
                            steps = k + k * k
                            _, splits, _ = cuda_decode_plan(batch, steps, k, q_heads, kv_heads, head_dim, max_len,
                                                            device)
                            yield (f"plan {name} {sms} {smem} {batch} {steps} {k} {q_heads} {kv_heads} {head_dim} "
                                   f"{max_len} {splits}")


def render() -> str:
    return "".join(line + "\n" for line in lines())


if __name__ == "__main__":
    CASES_FILE.write_text(render())
    print(f"wrote {CASES_FILE}")
