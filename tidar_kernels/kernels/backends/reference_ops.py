"""Registers the PyTorch reference as torch ops ``tidar::*_reference``.

Registered ops (rather than plain functions) so the reference is checked with
``torch.library.opcheck`` like every kernel and ``torch.compile`` sees the same
graph whichever backend runs.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import Backend, Call, register_attention_autograd, register_cached_attention
from . import reference


@torch.library.custom_op("tidar::attention_fwd_reference", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: int, block_size: int,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.attention_forward(q, k, v, layout, block_size, scale)


@attention_fwd.register_fake
def _(q, k, v, layout, block_size, scale):
    batch, seq, heads, _ = q.shape
    return torch.empty_like(q), q.new_empty((batch, heads, seq), dtype=torch.float32)


@torch.library.custom_op("tidar::attention_bwd_reference", mutates_args=())
def attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, layout: int, block_size: int,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return reference.attention_backward(dout, q, k, v, out, lse, layout, block_size, scale)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, layout, block_size, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


register_attention_autograd(attention_fwd, attention_bwd)


register_cached_attention("reference", reference.cached_attention)


@torch.library.custom_op("tidar::accept_drafts_reference", mutates_args=("cache_seqlens",))
def accept_drafts(drafts: torch.Tensor, draft_logits: torch.Tensor, block_logits: torch.Tensor,
                  cache_seqlens: torch.Tensor, active: Optional[torch.Tensor],
                  beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.accept_drafts(drafts, draft_logits, block_logits, cache_seqlens, active, beta)


@accept_drafts.register_fake
def _(drafts, draft_logits, block_logits, cache_seqlens, active, beta):
    return cache_seqlens.new_empty(cache_seqlens.shape), drafts.new_empty(drafts.shape, dtype=torch.long)


def _supports(call: Call) -> bool:
    return True


BACKEND = Backend(
    name="reference",
    supports=_supports,
    attention=lambda q, k, v, layout, block_size, scale: attention_fwd(q, k, v, layout, block_size, scale)[0],
    cached_attention=torch.ops.tidar.cached_attention_reference.default,
    accept_drafts=torch.ops.tidar.accept_drafts_reference.default,
    automatic_on=("cpu", "cuda"),
)
