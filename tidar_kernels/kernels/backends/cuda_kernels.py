"""What the hand-written CUDA kernels support, shared by the ``cuda`` and ``cuda_emulated`` backends.

Both backends run the same kernel sources behind the same checks (``csrc/bindings_common.h``):
on a GPU (``tidar_kernels._C``) or on the CPU through the emulator
(``tidar_kernels._C_emulated``). This module holds what they have in common: the calls the
kernels implement and the fake (shape-only) implementations of their ops for
torch.compile and opcheck.
"""
from __future__ import annotations

import torch

from ..mask import Layout
from . import ACCEPT_DRAFTS, CACHED_ATTENTION, Call

ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
LOGITS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (64, 128)


def kernels_support(call: Call) -> bool:
    """Whether the kernels implement ``call`` (whatever the device).

    The decode step in fp16/bf16 at head dim 64 or 128 over a contiguous cache or, with a
    ``block_table``, a paged one (the kernel reads and writes cache rows through the table),
    and greedy accept with fp16/bf16/fp32 logits.
    """
    if call.op == CACHED_ATTENTION:
        return call.dtype in ATTENTION_DTYPES and call.head_dim in HEAD_DIMS and call.layout == int(Layout.DECODE)
    if call.op == ACCEPT_DRAFTS:
        return call.dtype in LOGITS_DTYPES
    return False


def register_fakes(suffix: str) -> None:
    """Fake implementations of ``tidar::cached_attention_<suffix>`` and ``tidar::accept_drafts_<suffix>``."""

    @torch.library.register_fake(f"tidar::cached_attention_{suffix}")
    def _(q, k_new, v_new, k_cache, v_cache, cache_seqlens, context_lens, layout, block_size, scale,
          block_table=None):
        return q.new_empty(q.shape)  # contiguous, like the kernel's output

    @torch.library.register_fake(f"tidar::accept_drafts_{suffix}")
    def _(drafts, draft_logits, block_logits, cache_seqlens, active, beta):
        return cache_seqlens.new_empty(cache_seqlens.shape), drafts.new_empty(drafts.shape)
