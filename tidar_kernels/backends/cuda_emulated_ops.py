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

from .. import _C_emulated  # noqa: F401  (ImportError without the extension: backend unavailable)
from ..mask import Layout
from . import ACCEPT_DRAFTS, CACHED_ATTENTION, Backend, Call

ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
LOGITS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (64, 128)


@torch.library.register_fake("tidar::cached_attention_cuda_emulated")
def _(q, k_new, v_new, k_cache, v_cache, cache_seqlens, context_lens, layout, block_size, scale):
    return q.new_empty(q.shape)  # contiguous, like the kernel's output


@torch.library.register_fake("tidar::accept_drafts_cuda_emulated")
def _(drafts, draft_logits, block_logits, cache_seqlens, active, beta):
    return cache_seqlens.new_empty(cache_seqlens.shape), drafts.new_empty(drafts.shape)


def _supports(call: Call) -> bool:
    """What the CUDA backend supports, on CPU tensors."""
    if call.device.type != "cpu":
        return False
    if call.op == CACHED_ATTENTION:
        return call.dtype in ATTENTION_DTYPES and call.head_dim in HEAD_DIMS and call.layout == int(Layout.DECODE)
    if call.op == ACCEPT_DRAFTS:
        return call.dtype in LOGITS_DTYPES
    return False


BACKEND = Backend(
    name="cuda_emulated",
    supports=_supports,
    cached_attention=torch.ops.tidar.cached_attention_cuda_emulated.default,
    accept_drafts=torch.ops.tidar.accept_drafts_cuda_emulated.default,
    automatic_on=(),  # a test vehicle for the CUDA kernels, never a default
)
