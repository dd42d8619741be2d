"""Public attention and commit ops: validate, pick a backend, call it once.

Tensor layout as flash-attn: ``q [batch, seq, q_heads, head_dim]``, K/V with
``kv_heads`` dividing ``q_heads`` (GQA), caches ``[batch, max_len, kv_heads,
head_dim]`` and committed lengths ``cache_seqlens`` int32 ``[batch]`` on the
device. Every check (:mod:`.validation`, the same for every backend) runs before
any backend writes anything; an empty batch returns an empty result.

Paged KV (flash-attn's ``flash_attn_with_kvcache`` convention): the cached ops take
an optional ``block_table`` int32 ``[batch, max_pages_per_seq]``; the caches are
then page pools ``[num_pages, page_size, kv_heads, head_dim]`` and token ``t`` of
sequence ``b`` lives in page ``block_table[b, t // page_size]``, slot
``t % page_size`` (page sizes 1 to 256). Each sequence's capacity is ``max_pages_per_seq * page_size``
rows; only the table columns covering rows ``[0, n_b + rows)`` are read, and they
must hold distinct pages in ``[0, num_pages)`` (checked with the lengths).

Value checks on ``cache_seqlens`` (``n + rows <= max_len``) need the lengths on
the host. They run unless ``check_lengths=False``, a CUDA graph is being
captured, or torch.compile is tracing: the decode loop checks its budget once
up front and passes ``check_lengths=False`` so a step never synchronises.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backends
from .backends import Call
from .mask import Layout, check_training_shape
from .validation import (check_accept, check_cached, check_lengths_tensor, check_positive, check_qkv, check_room,
                         resolve_softmax_scale, skip_value_checks)


# ----------------------------------------------------------------------------
# Cache-free attention (training, likelihood)
# ----------------------------------------------------------------------------


def training_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int,
                       softmax_scale: Optional[float] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Attention over the ``2S`` training layout ``[clean 0..S-1 | mask 0..S-1]`` (differentiable)."""
    check_qkv(q, k, v)
    seq_len = q.shape[1]
    if seq_len % 2:
        raise ValueError(f"q.shape[1] must be 2*S (clean half + mask half), got odd length {seq_len}")
    check_positive("block_size", block_size)
    check_training_shape(seq_len // 2, block_size)
    return _attention(q, k, v, Layout.TRAINING, block_size, softmax_scale, backend)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: Optional[float] = None,
                     backend: Optional[str] = None) -> torch.Tensor:
    """Plain causal attention (likelihood mode, docs/semantics.md#append-and-likelihood), differentiable."""
    check_qkv(q, k, v)
    return _attention(q, k, v, Layout.CAUSAL, 1, softmax_scale, backend)


def _attention(q, k, v, layout, block_size, softmax_scale, backend):
    scale = resolve_softmax_scale(softmax_scale, q)
    chosen = backends.select(Call(backends.ATTENTION, q.device, q.dtype, q.shape[-1], int(layout)), backend)
    return chosen.attention(q, k, v, int(layout), block_size, scale)


# ----------------------------------------------------------------------------
# Attention over a KV cache (prefill, decode step, AR step)
# ----------------------------------------------------------------------------


def decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, cache_seqlens: torch.Tensor, draft_len: int,
                     softmax_scale: Optional[float] = None, backend: Optional[str] = None, *,
                     check_lengths: bool = True, block_table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One TiDAR decode step (docs/semantics.md#decode-step).

    ``q``/``k_new``/``v_new`` hold the ``k + k*k`` step tokens
    ``[d_0..d_{k-1} | block 1 | ... | block k]`` of each sequence. Writes the
    drafts' K/V into the cache at rows ``[n, n+k)`` in place (mask K/V never) and
    leaves ``cache_seqlens`` unchanged: committing is :func:`accept_drafts`'s job.
    With ``block_table`` the caches are page pools (see the module docstring).
    """
    check_positive("draft_len", draft_len)
    rows = draft_len + draft_len * draft_len
    capacity = check_cached(q, k_new, v_new, k_cache, v_cache, cache_seqlens, block_table, expected_rows=rows,
                             rows_what=f"k + k*k = {rows} for draft_len={draft_len}")
    if check_lengths:
        check_room(cache_seqlens, draft_len, capacity, block_table, k_cache)
    return _cached(q, k_new, v_new, k_cache, v_cache, cache_seqlens, None, Layout.DECODE, draft_len,
                   softmax_scale, backend, block_table)


def prefill_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, cache_seqlens: torch.Tensor, prompt_lens: torch.Tensor,
                      draft_len: int, softmax_scale: Optional[float] = None, backend: Optional[str] = None, *,
                      check_lengths: bool = True, block_table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """TiDAR prefill (docs/semantics.md#prefill): the prompt, causal, then one mask block.

    Rows are ``[prompt padded to P | k mask tokens]``; ``prompt_lens`` int32
    ``[batch]`` (``1 <= L_b <= P``) gives each real prompt length, and the mask
    block of sequence ``b`` sees cache ``[0, n_b)`` plus prompt rows ``[0, L_b)``.
    Writes the ``P`` prompt rows' K/V at ``[n, n+P)`` (rows past ``L_b`` are padding
    the caller will not commit); ``cache_seqlens`` is unchanged. ``block_table``: paged caches.
    """
    check_positive("draft_len", draft_len)
    capacity = check_cached(q, k_new, v_new, k_cache, v_cache, cache_seqlens, block_table,
                            other_reads=dict(prompt_lens=prompt_lens))
    padded = q.shape[1] - draft_len
    if padded < 1:
        raise ValueError(f"q.shape[1] must be padded prompt length + draft_len >= {draft_len + 1}, "
                         f"got {q.shape[1]}")
    check_lengths_tensor("prompt_lens", prompt_lens, q)
    if check_lengths:
        check_room(cache_seqlens, padded, capacity, block_table, k_cache)
        if not skip_value_checks(prompt_lens):
            bad = (prompt_lens < 1) | (prompt_lens > padded)
            if bool(bad.any()):
                raise ValueError(f"prompt_lens must lie in [1, {padded}] (the padded prompt rows), "
                                 f"got {prompt_lens.tolist()}")
    return _cached(q, k_new, v_new, k_cache, v_cache, cache_seqlens, prompt_lens, Layout.PREFILL, draft_len,
                   softmax_scale, backend, block_table)


def block_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, cache_seqlens: torch.Tensor, softmax_scale: Optional[float] = None,
                    backend: Optional[str] = None, *, check_lengths: bool = True,
                    block_table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bidirectional attention of a block of ``T`` new rows over cache ``[0, n_b)``; writes nothing.

    Every row sees the whole committed cache and all ``T`` rows of the block (linear
    self-speculation's draft block ``[seed, [M] x (T-1)]``). It is the prefill layout
    with an empty prompt: one mask block of ``T`` rows whose context is the cache alone,
    and a prefill writes only its prompt rows, here none. So neither the committed rows
    nor the scratch rows past ``n_b`` are touched, and no backend needs a no-write flag.
    ``check_lengths`` only checks ``n_b <= capacity``. ``block_table``: paged caches.
    """
    capacity = check_cached(q, k_new, v_new, k_cache, v_cache, cache_seqlens, block_table)
    if check_lengths:
        check_room(cache_seqlens, 0, capacity, block_table, k_cache)
    no_prompt = torch.zeros_like(cache_seqlens)
    return _cached(q, k_new, v_new, k_cache, v_cache, cache_seqlens, no_prompt, Layout.PREFILL, q.shape[1],
                   softmax_scale, backend, block_table)


def append_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, cache_seqlens: torch.Tensor, softmax_scale: Optional[float] = None,
                     backend: Optional[str] = None, *, check_lengths: bool = True,
                     block_table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention of ``T`` new tokens over the cache (AR decoding and AR prefill).

    Writes all ``T`` new rows' K/V at ``[n, n+T)``; ``cache_seqlens`` is unchanged.
    ``block_table``: paged caches (see the module docstring).
    """
    capacity = check_cached(q, k_new, v_new, k_cache, v_cache, cache_seqlens, block_table)
    if check_lengths:
        check_room(cache_seqlens, q.shape[1], capacity, block_table, k_cache)
    return _cached(q, k_new, v_new, k_cache, v_cache, cache_seqlens, None, Layout.CAUSAL, 1, softmax_scale,
                   backend, block_table)


def _cached(q, k_new, v_new, k_cache, v_cache, cache_seqlens, context_lens, layout, block_size,
            softmax_scale, backend, block_table):
    scale = resolve_softmax_scale(softmax_scale, q)
    call = Call(backends.CACHED_ATTENTION, q.device, q.dtype, q.shape[-1], int(layout), paged=block_table is not None)
    chosen = backends.select(call, backend)  # a backend that declines paged calls is never chosen for one
    return chosen.cached_attention(q, k_new, v_new, k_cache, v_cache, cache_seqlens, context_lens, int(layout),
                                   block_size, scale, block_table=block_table)


# ----------------------------------------------------------------------------
# Acceptance and commit (docs/semantics.md#acceptance, greedy)
# ----------------------------------------------------------------------------


def accept_drafts(drafts: torch.Tensor, draft_logits: torch.Tensor, block_logits: torch.Tensor,
                  cache_seqlens: torch.Tensor, beta: float = 1.0, active: Optional[torch.Tensor] = None,
                  backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept drafts greedily and commit them by advancing ``cache_seqlens`` in place.

    ``drafts`` int64 ``[B, k]`` (``d_0..d_{k-1}``), ``draft_logits [B, k, V]``
    (``a_i`` at draft ``d_i``), ``block_logits [B, k, V]`` (``b_{j,0}``, the first
    slot of block ``j = 1..k``). With ``v_j = argmax(beta*a_{j-1} + (1-beta)*b_{j,0})``,
    ``d_0`` is accepted and ``d_j`` while ``d_j == v_j``. Returns ``(accepted int32 [B],
    targets int64 [B, k])``, ``targets[:, j-1] = v_j``; the next first draft is
    ``targets[b, accepted_b - 1]`` and the rest come from block ``accepted_b``.
    ``active`` (bool ``[B]``) marks sequences still decoding; others accept 0.
    """
    check_accept(drafts, draft_logits, block_logits, cache_seqlens, active, beta)
    # The dtype the two logits are compared in: a backend that cannot take it (fp64) declines.
    dtype = torch.promote_types(draft_logits.dtype, block_logits.dtype)
    call = Call(backends.ACCEPT_DRAFTS, drafts.device, dtype, 0, int(Layout.DECODE))
    chosen = backends.select(call, backend)
    return chosen.accept_drafts(drafts, draft_logits, block_logits, cache_seqlens, active, float(beta))
