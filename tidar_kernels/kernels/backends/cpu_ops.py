"""Registers the CPU decode path as the torch op ``tidar::cached_attention_cpu``.

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


def _supports(call: Call) -> bool:
    return call.op == CACHED_ATTENTION and call.device.type == "cpu" and call.dtype.is_floating_point


BACKEND = Backend(
    name="cpu",
    supports=_supports,
    cached_attention=torch.ops.tidar.cached_attention_cpu.default,
    automatic_on=("cpu",),
)
