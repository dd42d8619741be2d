"""Plain-PyTorch reference of every tidar op: the ground truth for the kernels.

Math is done in fp32 (fp64 when the inputs are fp64), the mask comes from
:mod:`tidar_kernels.kernels.mask` (dense, built from the compact rule), and outputs are
cast back to the input dtype. Slow and memory-hungry by design: it favours
obviously-right over fast. Tensor layout is flash-attn's ``[batch, seq, heads, dim]``.
"""
from __future__ import annotations

import torch

from .. import mask as tidar_mask
from ..mask import Layout


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_kv_heads(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """GQA: ``[B, T, Hkv, D] -> [B, T, Hq, D]``; query head ``h`` uses KV head ``h // (Hq/Hkv)``."""
    return x.repeat_interleave(num_q_heads // x.shape[2], dim=2)


def masked_attention(q, k, v, allowed, scale, dtype=None):
    """Softmax attention with a dense bool mask ``allowed`` of shape broadcastable to ``[B, H, Tq, Tk]``.

    Computes in ``dtype`` (default: fp32/fp64 as :func:`compute_dtype`). Returns
    ``out [B, Tq, Hq, D]`` in that dtype and ``lse [B, Hq, Tq]`` (natural log).
    """
    dtype = dtype or compute_dtype(q.dtype)
    qf, kf, vf = (t.to(dtype) for t in (q, expand_kv_heads(k, q.shape[2]), expand_kv_heads(v, q.shape[2])))
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vf)
    return out, lse


def attention_mask(layout: Layout, num_rows: int, block_size: int) -> torch.Tensor:
    """Dense ``[T, T]`` mask of the cache-free layouts (training, causal)."""
    clean_rows = tidar_mask.layout_clean_rows(layout, num_rows, block_size)
    return tidar_mask.local_mask(layout, num_rows, clean_rows, block_size)


def attention_forward(q, k, v, layout: int, block_size: int, scale: float):
    """Forward of the cache-free op: ``(out [B,T,Hq,D] in q.dtype, lse [B,Hq,T] fp32)``."""
    allowed = attention_mask(Layout(layout), q.shape[1], block_size).to(q.device)
    out, lse = masked_attention(q, k, v, allowed, scale)
    return out.to(q.dtype).contiguous(), lse.float().contiguous()


def attention_backward(dout, q, k, v, out, lse, layout: int, block_size: int, scale: float):
    """Flash-attention style backward from the saved ``lse`` (recomputes the probabilities).

    ``P = exp(S - lse)``, ``dV = P^T dO``, ``dP = dO V^T``, ``dS = P (dP - rowsum(dO*O))``,
    ``dQ = scale dS K``, ``dK = scale dS^T Q``; GQA sums dK/dV over each KV head's group.
    """
    dtype = compute_dtype(q.dtype)
    num_q_heads, num_kv_heads = q.shape[2], k.shape[2]
    allowed = attention_mask(Layout(layout), q.shape[1], block_size).to(q.device)
    qf, of, dof = (t.to(dtype) for t in (q, out, dout))
    kf, vf = (expand_kv_heads(t, num_q_heads).to(dtype) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    probs = torch.exp(scores - lse.to(dtype)[..., None]).masked_fill(~allowed, 0.0)
    dv = torch.einsum("bhqk,bqhd->bkhd", probs, dof)
    dprobs = torch.einsum("bqhd,bkhd->bhqk", dof, vf)
    delta = (dof * of).sum(-1).transpose(1, 2)  # [B, H, Tq]
    dscores = probs * (dprobs - delta[..., None])
    dq = torch.einsum("bhqk,bkhd->bqhd", dscores, kf) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", dscores, qf) * scale
    group = num_q_heads // num_kv_heads
    batch, seq, _, head_dim = k.shape
    dk = dk.reshape(batch, seq, num_kv_heads, group, head_dim).sum(3)
    dv = dv.reshape(batch, seq, num_kv_heads, group, head_dim).sum(3)
    return tuple(g.to(q.dtype).contiguous() for g in (dq, dk, dv))


def cached_mask(layout: Layout, cache_seqlens: torch.Tensor, max_len: int, num_rows: int,
                clean_rows: int, block_size: int, context_lens) -> torch.Tensor:
    """Dense ``[B, 1, T, max_len + T]`` mask: cache rows ``[0, n_b)`` then the step's own keys."""
    cols = torch.arange(max_len, device=cache_seqlens.device)
    cache_part = (cols[None, :] < cache_seqlens.long()[:, None])[:, None, None, :]  # [B,1,1,max_len]
    rows = torch.arange(num_rows, device=cache_seqlens.device)
    context = 0 if context_lens is None else context_lens.long()[:, None, None]
    clean_end, block_start, block_end = tidar_mask.key_ranges(
        layout, rows[None, :, None], clean_rows, block_size, context)
    local_cols = rows[None, None, :]
    local_part = (local_cols < clean_end) | ((local_cols >= block_start) & (local_cols < block_end))
    batch = cache_seqlens.shape[0]
    cache_part = cache_part.expand(batch, 1, num_rows, max_len)
    local_part = local_part.expand(batch, num_rows, num_rows)[:, None]
    return torch.cat([cache_part, local_part], dim=-1)


def cache_capacity(k_cache: torch.Tensor, block_table) -> int:
    """Rows each sequence can hold: ``max_len``, or ``max_pages_per_seq * page_size`` when paged."""
    return k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]


def cache_locations(positions: torch.Tensor, k_cache: torch.Tensor, block_table):
    """Where cache rows ``positions [B, R]`` (per sequence) live: ``k_cache[outer, inner]``.

    Contiguous ``[B, max_len, ...]``: ``(b, t)``. Paged ``[num_pages, page_size, ...]``:
    ``(block_table[b, t // page_size], t % page_size)``. Returns ``(outer, inner, exists)``,
    all ``[B, R]``; a position past the capacity or whose table entry is outside
    ``[0, num_pages)`` does not exist (its indices are clamped so gathers stay in bounds).
    """
    capacity = cache_capacity(k_cache, block_table)
    exists = (positions >= 0) & (positions < capacity)
    positions = positions.clamp(0, capacity - 1)
    if block_table is None:
        batch = torch.arange(positions.shape[0], device=positions.device)[:, None].expand_as(positions)
        return batch, positions, exists
    num_pages, page_size = k_cache.shape[:2]
    page = block_table.long().gather(1, positions // page_size)
    exists &= (page >= 0) & (page < num_pages)
    return page.clamp(0, num_pages - 1), positions % page_size, exists


def read_span(cache_seqlens: torch.Tensor, capacity: int) -> int:
    """How many cache rows per sequence the reference gathers.

    ``max_b n_b`` (clamped to the capacity) where reading the lengths is free (CPU
    tensors): each call costs O(n), not O(capacity). On a GPU reading them would
    synchronise, so the span stays the static capacity; rows past ``n_b`` are still
    replaced by zeros before any arithmetic, so what they hold never matters.
    """
    if cache_seqlens.device.type != "cpu" or cache_seqlens.numel() == 0:
        return capacity
    return max(0, min(capacity, int(cache_seqlens.max())))


def gather_cache(cache: torch.Tensor, cache_seqlens: torch.Tensor, block_table, span: int) -> torch.Tensor:
    """Rows ``[0, span)`` of every sequence as ``[B, span, kv_heads, head_dim]``, rows at or past
    ``n_b`` (and rows without a page) as exact zeros: garbage there (NaN, Inf) is selected away,
    never multiplied."""
    batch = cache_seqlens.shape[0]
    positions = torch.arange(span, device=cache.device).expand(batch, span)
    outer, inner, exists = cache_locations(positions, cache, block_table)
    gathered = cache[outer, inner]
    keep = exists & (positions < cache_seqlens.long()[:, None])
    return torch.where(keep[:, :, None, None], gathered, torch.zeros((), dtype=cache.dtype, device=cache.device))


def cached_attention(q, k_new, v_new, k_cache, v_cache, cache_seqlens, context_lens,
                     layout: int, block_size: int, scale: float, block_table=None):
    """Attention of the step rows over cache ``[0, n_b)`` and their own keys; writes the
    clean step rows' K/V into the cache at ``[n_b, n_b + W)`` in place.

    ``block_table`` (int32 ``[B, max_pages_per_seq]``): the caches are page pools
    ``[num_pages, page_size, ...]`` addressed through it (see :func:`cache_locations`).
    Only rows ``[0, n_b)`` are read. Every written row must exist (``n_b + W`` within the
    capacity, valid table entries: :mod:`tidar_kernels.kernels.validation` checks it); an unchecked bad
    length or entry makes the write raise an index error instead of landing elsewhere.
    """
    layout = Layout(layout)
    batch, num_rows = q.shape[:2]
    clean_rows = tidar_mask.layout_clean_rows(layout, num_rows, block_size)
    span = read_span(cache_seqlens, cache_capacity(k_cache, block_table))
    allowed = cached_mask(layout, cache_seqlens, span, num_rows, clean_rows, block_size, context_lens)
    keys = torch.cat([gather_cache(k_cache, cache_seqlens, block_table, span), k_new.to(k_cache.dtype)], dim=1)
    values = torch.cat([gather_cache(v_cache, cache_seqlens, block_table, span), v_new.to(v_cache.dtype)], dim=1)
    out, _ = masked_attention(q, keys, values, allowed, scale)
    write_clean_rows(k_new, v_new, k_cache, v_cache, cache_seqlens, layout, block_size, block_table)
    return out.to(q.dtype).contiguous()


def write_clean_rows(k_new, v_new, k_cache, v_cache, cache_seqlens, layout: Layout, block_size: int,
                     block_table=None) -> None:
    """Write the clean step rows' K/V (:func:`~tidar_kernels.kernels.mask.rows_written_to_cache`) into
    the caches at ``[n_b, n_b + W)``, in place; a row past the capacity raises, never wraps."""
    written = tidar_mask.rows_written_to_cache(layout, k_new.shape[1], block_size)
    positions = cache_seqlens.long()[:, None] + torch.arange(written, device=k_new.device)  # [B, W]
    outer, inner, exists = cache_locations(positions, k_cache, block_table)
    outer = torch.where(exists, outer, k_cache.shape[0])  # a missing row: out of range, raises, never wraps
    for cache, new in ((k_cache, k_new), (v_cache, v_new)):
        cache.index_put_((outer, inner), new[:, :written].to(cache.dtype))


def accept_drafts(drafts, draft_logits, block_logits, cache_seqlens, active, beta: float):
    """docs/semantics.md#acceptance (greedy): accepted count, commit, and the next first draft.

    ``draft_logits[:, i]`` = ``a_i``; ``block_logits[:, j-1]`` = ``b_{j,0}``. Returns
    ``(accepted int32 [B], targets int64 [B, k])`` with ``targets[:, j-1] = v_j``; the
    next first draft is ``targets[b, accepted_b - 1]``. Advances ``cache_seqlens``
    by ``accepted`` in place; inactive sequences accept 0 and do not move.
    """
    mixed = beta * draft_logits.float() + (1.0 - beta) * block_logits.float()
    targets = mixed.argmax(dim=-1)  # [B, k]: v_1..v_k
    matches = drafts[:, 1:] == targets[:, :-1]  # d_j == v_j for j = 1..k-1
    accepted = 1 + torch.cumprod(matches.int(), dim=1).sum(dim=1)
    if active is not None:
        accepted = accepted * active.int()
    accepted = accepted.int()
    cache_seqlens.add_(accepted)
    return accepted, targets
