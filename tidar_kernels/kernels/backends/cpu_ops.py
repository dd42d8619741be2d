"""Registers the CPU decode path as the torch op ``tidar::cached_attention_cpu`` (traced calls; eager
calls skip the op's dispatch, see :func:`eager_or_traced`).

The backend implements the cached op only (decode, prefill, append, the read-only
block); cache-free attention and acceptance fall through to the reference. It is
picked automatically on CPU tensors, ahead of the reference, which stays the ground
truth the tests compare it with.
"""
from __future__ import annotations

import torch

from . import CACHED_ATTENTION, Backend, Call, register_cached_attention
from . import cpu


register_cached_attention("cpu", cpu.cached_attention, device_types="cpu")


def eager_or_traced(*args, **kwargs) -> torch.Tensor:
    """Eager calls run :func:`cpu.cached_attention` directly: at decode sizes the registered op's
    Python dispatch costs about as much as the attention itself. Traced calls (torch.compile)
    see the op, as with every backend."""
    if torch.compiler.is_compiling():
        return torch.ops.tidar.cached_attention_cpu.default(*args, **kwargs)
    return cpu.cached_attention(*args, **kwargs)


def _supports(call: Call) -> bool:
    return call.op == CACHED_ATTENTION and call.device.type == "cpu" and call.dtype.is_floating_point


BACKEND = Backend(
    name="cpu",
    supports=_supports,
    cached_attention=eager_or_traced,
    automatic_on=("cpu",),
)
