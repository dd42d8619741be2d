"""The CPU decode path of the cached attention op: the reference's rule without its copies.

A decode step on the CPU attends a handful of query rows over a few hundred cached
keys, so the cost is not arithmetic but the reference's extra work: it gathers every
cache row into a new tensor through an index, repeats the KV heads for GQA, builds
the ``[B, H, T, n + T]`` scores with two einsums and a separate softmax. Here a
contiguous cache is read through views of rows ``[0, max_b n_b)`` (copied only when a
ragged batch needs another sequence's unused rows zeroed), and
``scaled_dot_product_attention`` does GQA, the masked softmax and the value sum in
one call. The visibility mask is the reference's (:func:`reference.cached_mask`, the
compact rule of :mod:`tidar_kernels.kernels.mask`), the math runs in the same
precision (fp32, fp64 for fp64), and the cache write is the reference's own
(:func:`reference.write_clean_rows`). Paged caches are gathered as the reference does.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import mask as tidar_mask
from ..mask import Layout
from . import reference


def committed_rows(cache: torch.Tensor, cache_seqlens: torch.Tensor, block_table, span: int,
                   ragged: bool) -> torch.Tensor:
    """Cache rows ``[0, span)`` of every sequence ``[B, span, kv_heads, head_dim]``, rows at or past a
    sequence's ``n_b`` exact zeros (garbage there, NaN or Inf, must never reach the softmax or the
    value sum). A contiguous cache of equal lengths is a view: every row below ``span`` is committed."""
    if block_table is None and not ragged:
        return cache[:, :span]
    return reference.gather_cache(cache, cache_seqlens, block_table, span)


@functools.lru_cache(maxsize=64)
def step_mask(layout: Layout, num_rows: int, clean_rows: int, block_size: int, context_len: int) -> torch.Tensor:
    """The step rows' mask over their own keys ``[T, T]`` (the compact rule); a step's shape repeats
    every decode step, so it is built once. Callers never write to it."""
    return tidar_mask.local_mask(layout, num_rows, clean_rows, block_size, context_len)


def visibility(layout: Layout, cache_seqlens, span: int, num_rows: int, clean_rows: int, block_size: int,
               context_lens, ragged: bool) -> torch.Tensor:
    """Mask broadcastable to ``[B, H, T, span + T]``: cache columns, then the step's own keys.

    Equal cache lengths and one context length for the batch (a decode step, an AR step, the
    read-only block): every cache column is visible and the step part is :func:`step_mask`.
    Otherwise the reference's per-sequence mask.
    """
    context = 0
    if context_lens is not None and context_lens.numel() > 0:
        context = int(context_lens.max())
        if int(context_lens.min()) != context:
            ragged = True
    if ragged:
        return reference.cached_mask(layout, cache_seqlens, span, num_rows, clean_rows, block_size, context_lens)
    local = step_mask(layout, num_rows, clean_rows, block_size, context)
    return torch.cat([local.new_ones(num_rows, span), local], dim=1)


def write_clean_rows(k_new, v_new, k_cache, v_cache, cache_seqlens, layout: Layout, block_size: int,
                     block_table) -> None:
    """The reference's cache write (:func:`reference.write_clean_rows`) as slice copies on a contiguous
    cache; a row past the capacity raises before anything is written."""
    if block_table is not None:
        return reference.write_clean_rows(k_new, v_new, k_cache, v_cache, cache_seqlens, layout, block_size,
                                          block_table)
    written = tidar_mask.rows_written_to_cache(layout, k_new.shape[1], block_size)
    lengths = cache_seqlens.tolist()
    if written == 0 or not lengths:
        return None
    if max(lengths) + written > k_cache.shape[1] or min(lengths) < 0:
        raise IndexError(f"cache rows [n_b, n_b + {written}) must lie in [0, {k_cache.shape[1]}), "
                         f"got cache_seqlens {lengths}")
    for cache, new in ((k_cache, k_new), (v_cache, v_new)):
        if min(lengths) == max(lengths):
            cache[:, lengths[0]:lengths[0] + written] = new[:, :written]
        else:
            for b, n in enumerate(lengths):
                cache[b, n:n + written] = new[b, :written]
    return None


def cached_attention(q, k_new, v_new, k_cache, v_cache, cache_seqlens, context_lens,
                     layout: int, block_size: int, scale: float, block_table=None):
    """Same contract as :func:`reference.cached_attention` (read cache ``[0, n_b)`` and the step's own
    keys under the layout's rule; write the clean rows at ``[n_b, n_b + W)``), for CPU tensors."""
    layout = Layout(layout)
    if q.shape[0] == 0:
        return torch.empty_like(q)
    num_rows = q.shape[1]
    clean_rows = tidar_mask.layout_clean_rows(layout, num_rows, block_size)
    # CPU tensors: reading the lengths costs no device synchronisation.
    span = reference.read_span(cache_seqlens, reference.cache_capacity(k_cache, block_table))
    ragged = int(cache_seqlens.min()) != span
    dtype = reference.compute_dtype(q.dtype)
    keys, values = (torch.cat([committed_rows(cache, cache_seqlens, block_table, span, ragged), new.to(cache.dtype)],
                              dim=1).to(dtype)
                    for cache, new in ((k_cache, k_new), (v_cache, v_new)))
    allowed = visibility(layout, cache_seqlens, span, num_rows, clean_rows, block_size, context_lens, ragged)
    out = F.scaled_dot_product_attention(q.to(dtype).transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=allowed, scale=scale, enable_gqa=True)
    # keys/values are copies (torch.cat), so the write below cannot change what was read.
    write_clean_rows(k_new, v_new, k_cache, v_cache, cache_seqlens, layout, block_size, block_table)
    return out.transpose(1, 2).to(q.dtype).contiguous()
