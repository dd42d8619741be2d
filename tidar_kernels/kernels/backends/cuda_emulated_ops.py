"""The ``cuda_emulated`` backend: the CUDA backend's kernels, run on the CPU by an emulator.

``tidar_kernels._C_emulated`` is built from the very sources of the CUDA kernels
(``csrc/decode_attention.cuh``, ``csrc/accept_drafts.cu``), compiled by the host compiler
against ``csrc/emulation/`` (threads, barriers, warp collectives, shared memory, cp.async,
ldmatrix, mma.sync and fast-math intrinsics on the CPU), behind the CUDA backend's own checks
(``csrc/bindings_common.h``). It registers ``tidar::cached_attention_cuda_emulated`` and
``tidar::accept_drafts_cuda_emulated`` for CPU tensors. It exists to test the kernels where
no GPU is: it is slow (an OS thread per CUDA thread) and never picked automatically; name it
with ``backend="cuda_emulated"``. Without the extension the import fails with ImportError and
the registry treats the backend as unavailable.
"""
from __future__ import annotations

import torch

from ... import _C_emulated  # noqa: F401  (ImportError without the extension: backend unavailable)
from . import Backend, Call
from .cuda_kernels import kernels_support, register_fakes

register_fakes("cuda_emulated")


def _supports(call: Call) -> bool:
    """What the CUDA backend supports, on CPU tensors."""
    return call.device.type == "cpu" and kernels_support(call)


BACKEND = Backend(
    name="cuda_emulated",
    supports=_supports,
    cached_attention=torch.ops.tidar.cached_attention_cuda_emulated.default,
    accept_drafts=torch.ops.tidar.accept_drafts_cuda_emulated.default,
    automatic_on=(),  # a test vehicle for the CUDA kernels, never a default
)
