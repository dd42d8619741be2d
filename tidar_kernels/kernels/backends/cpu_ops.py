"""Registers the CPU decode path as the torch op ``tidar::cached_attention_cpu`` (traced calls; eager
calls skip the op's dispatch, see :func:`eager_or_traced`).

The backend implements the cached op only (decode, prefill, append, the read-only
block); cache-free attention and acceptance fall through to the reference. It is
picked automatically on CPU tensors, ahead of the reference, which stays the ground
truth the tests compare it with.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import CACHED_ATTENTION, Backend, Call
from . import cpu


@torch.library.custom_op("tidar::cached_attention_cpu", mutates_args=("k_cache", "v_cache"), device_types="cpu")
def cached_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, cache_seqlens: torch.Tensor, context_lens: Optional[torch.Tensor],
                     layout: int, block_size: int, scale: float,
                     block_table: Optional[torch.Tensor] = None) -> torch.Tensor:
    return cpu.cached_attention(q, k_new, v_new, k_cache, v_cache, cache_seqlens, context_lens,
                                layout, block_size, scale, block_table)


@cached_attention.register_fake
def _(q, k_new, v_new, k_cache, v_cache, cache_seqlens, context_lens, layout, block_size, scale, block_table=None):
    return torch.empty_like(q)


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
