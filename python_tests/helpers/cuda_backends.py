"""The backends of the CUDA kernels as test parameters: ``cuda`` (the GPU; ``ON_GPU`` marks a case
``gpu`` and ``gpu_quick``) and ``cuda_emulated`` (the same sources on the CPU; ``EMULATED`` skips a
case where ``tidar_kernels._C_emulated`` is not built), each backend's device, and its raw ops
(for accept-and-commit also the PyTorch twin, ``reference``)."""
import pytest
import torch

import tidar_kernels as tk
from tidar_kernels.kernels import backends

EMULATED = pytest.mark.skipif(backends.load("cuda_emulated") is None,
                              reason="the emulated extension tidar_kernels._C_emulated is not built")
ON_GPU = (pytest.mark.gpu, pytest.mark.gpu_quick)


def device_of(backend: str) -> str:
    """Where ``backend``'s tensors live: the GPU for ``cuda``, else the CPU."""
    return "cuda" if backend == "cuda" else "cpu"


def _needs_built(backend: str) -> None:
    if backend == "cuda":
        pytest.importorskip("tidar_kernels._C", reason="CUDA extension not built")


def cached_attention_op(backend: str):
    """``tidar::cached_attention_<backend>`` (skips the test where the CUDA extension is not built)."""
    _needs_built(backend)
    return getattr(torch.ops.tidar, f"cached_attention_{backend}").default


def accept_drafts_op(backend: str):
    """``tidar::accept_drafts_<backend>``; for ``reference`` the public op on the PyTorch twin, called
    the same way: ``op(drafts, draft_logits, block_logits, cache_seqlens, active, beta)``."""
    if backend == "reference":
        return lambda drafts, a, b, lengths, active, beta: tk.accept_drafts(drafts, a, b, lengths, beta=beta,
                                                                            active=active, backend="reference")
    _needs_built(backend)
    return getattr(torch.ops.tidar, f"accept_drafts_{backend}").default
