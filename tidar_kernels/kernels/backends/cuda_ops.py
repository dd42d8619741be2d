"""The ``cuda`` backend: hand-written CUDA kernels from the ``tidar_kernels._C`` extension.

Importing ``tidar_kernels._C`` registers the ops ``tidar::cached_attention_cuda``
(the fused decode step, :data:`~tidar_kernels.kernels.mask.Layout.DECODE` only) and
``tidar::accept_drafts_cuda`` (greedy accept and in-place commit) with their
schemas and CUDA kernels (``csrc/bindings.cpp``). This module adds their fake
implementations (shapes only, for torch.compile and opcheck) and says which calls
the kernels support. When the extension was not built the import fails with
ImportError and the registry treats the backend as unavailable.
"""
from __future__ import annotations

import functools

import torch

from ... import _C  # noqa: F401  (ImportError without the extension: backend unavailable)
from . import Backend, Call
from .cuda_kernels import kernels_support, register_fakes

register_fakes("cuda")


def kernels_run_on(archs: str, capability: tuple[int, int]) -> bool:
    """Whether machine code compiled for ``archs`` (nvcc's list, e.g. ``"800,900"``) runs on ``capability``.

    The extension embeds SASS only (``code=sm_XY``, no PTX to JIT), and SASS for sm_XY runs on
    compute capability X.Z with Z >= Y, never on another major. Arch-specific targets (sm_90a)
    run only on their exact capability; the list does not show the suffix, so from major 9 on an
    entry counts for its exact capability only. ``"unknown"`` (no list) answers no.
    """
    major, minor = capability
    for item in archs.split(","):
        item = item.strip()
        if not item.isdigit():
            continue
        value = int(item)
        built_major, built_minor = value // 100, value % 100 // 10
        if built_major == major and (minor == built_minor or (built_major < 9 and minor > built_minor)):
            return True
    return False


@functools.lru_cache(maxsize=None)
def _has_kernels_for(device_index: int) -> bool:
    """Whether the archs compiled into this extension run on that GPU (else the backend declines)."""
    return kernels_run_on(_C.compiled_archs(), torch.cuda.get_device_capability(device_index))


def _supports(call: Call) -> bool:
    if call.device.type != "cuda" or not kernels_support(call):
        return False
    index = call.device.index if call.device.index is not None else torch.cuda.current_device()
    return _has_kernels_for(index)


def compiled_archs() -> str:
    """Compute capabilities the extension was built for, as nvcc lists them (e.g. ``"800,900"``)."""
    return _C.compiled_archs()


BACKEND = Backend(
    name="cuda",
    supports=_supports,
    cached_attention=torch.ops.tidar.cached_attention_cuda.default,
    accept_drafts=torch.ops.tidar.accept_drafts_cuda.default,
    # Opt-in (backend="cuda" or TIDAR_BACKEND=cuda) until the kernels have been checked
    # against the reference and timed on a GPU; bench/attention.py then decides.
    automatic_on=(),
)
