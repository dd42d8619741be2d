"""Public attention and commit ops: validate, pick a backend, call it once.

Tensor layout as flash-attn: ``q [batch, seq, q_heads, head_dim]``, K/V with
``kv_heads`` dividing ``q_heads`` (GQA), caches ``[batch, max_len, kv_heads,
head_dim]`` and committed lengths ``cache_seqlens`` int32 ``[batch]`` on the
device. Every check here runs before any backend writes anything.

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

MAX_PAGE_SIZE = 256  # paged caches: pages of 1 (SGLang's token pool) up to 256 rows (issue 15)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------
# Cache-free attention (training, likelihood)
# ----------------------------------------------------------------------------


def training_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int,
                       softmax_scale: Optional[float] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Attention over the ``2S`` training layout ``[clean 0..S-1 | mask 0..S-1]`` (differentiable)."""
    _check_qkv(q, k, v)
    seq_len = q.shape[1]
    if seq_len % 2:
        raise ValueError(f"q.shape[1] must be 2*S (clean half + mask half), got odd length {seq_len}")
    _check_int("block_size", block_size, minimum=1)
    check_training_shape(seq_len // 2, block_size)
    return _attention(q, k, v, Layout.TRAINING, block_size, softmax_scale, backend)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: Optional[float] = None,
                     backend: Optional[str] = None) -> torch.Tensor:
    """Plain causal attention (likelihood mode, TIDAR.md section 7), differentiable."""
    _check_qkv(q, k, v)
    return _attention(q, k, v, Layout.CAUSAL, 1, softmax_scale, backend)


def _attention(q, k, v, layout, block_size, softmax_scale, backend):
    scale = _scale(softmax_scale, q)
    chosen = backends.select(Call(backends.ATTENTION, q.device, q.dtype, q.shape[-1], int(layout)), backend)
    return chosen.attention(q, k, v, int(layout), block_size, scale)


# ----------------------------------------------------------------------------
# Attention over a KV cache (prefill, decode step, AR step)
# ----------------------------------------------------------------------------


def decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, cache_seqlens: torch.Tensor, draft_len: int,
                     softmax_scale: Optional[float] = None, backend: Optional[str] = None, *,
                     check_lengths: bool = True, block_table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One TiDAR decode step (TIDAR.md section 4).

    ``q``/``k_new``/``v_new`` hold the ``k + k*k`` step tokens
    ``[d_0..d_{k-1} | block 1 | ... | block k]`` of each sequence. Writes the
    drafts' K/V into the cache at rows ``[n, n+k)`` in place (mask K/V never) and
    leaves ``cache_seqlens`` unchanged: committing is :func:`accept_drafts`'s job.
    With ``block_table`` the caches are page pools (see the module docstring).
    """
    _check_int("draft_len", draft_len, minimum=1)
    rows = draft_len + draft_len * draft_len
    capacity = _check_cached(q, k_new, v_new, k_cache, v_cache, cache_seqlens, block_table, expected_rows=rows,
                             rows_what=f"k + k*k = {rows} for draft_len={draft_len}")
    if check_lengths:
        _check_room(cache_seqlens, draft_len, capacity, block_table, k_cache)
    return _cached(q, k_new, v_new, k_cache, v_cache, cache_seqlens, None, Layout.DECODE, draft_len,
                   softmax_scale, backend, block_table)


def prefill_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, cache_seqlens: torch.Tensor, prompt_lens: torch.Tensor,
                      draft_len: int, softmax_scale: Optional[float] = None, backend: Optional[str] = None, *,
                      check_lengths: bool = True, block_table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """TiDAR prefill (TIDAR.md section 3): the prompt, causal, then one mask block.

    Rows are ``[prompt padded to P | k mask tokens]``; ``prompt_lens`` int32
    ``[batch]`` (``1 <= L_b <= P``) gives each real prompt length, and the mask
    block of sequence ``b`` sees cache ``[0, n_b)`` plus prompt rows ``[0, L_b)``.
    Writes the ``P`` prompt rows' K/V at ``[n, n+P)`` (rows past ``L_b`` are padding
    the caller will not commit); ``cache_seqlens`` is unchanged. ``block_table``: paged caches.
    """
    _check_int("draft_len", draft_len, minimum=1)
    capacity = _check_cached(q, k_new, v_new, k_cache, v_cache, cache_seqlens, block_table)
    padded = q.shape[1] - draft_len
    if padded < 1:
        raise ValueError(f"q.shape[1] must be padded prompt length + draft_len >= {draft_len + 1}, "
                         f"got {q.shape[1]}")
    _check_lengths_tensor("prompt_lens", prompt_lens, q)
    if check_lengths:
        _check_room(cache_seqlens, padded, capacity, block_table, k_cache)
        if not _skip_value_checks(prompt_lens):
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
    capacity = _check_cached(q, k_new, v_new, k_cache, v_cache, cache_seqlens, block_table)
    if check_lengths:
        _check_room(cache_seqlens, 0, capacity, block_table, k_cache)
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
    capacity = _check_cached(q, k_new, v_new, k_cache, v_cache, cache_seqlens, block_table)
    if check_lengths:
        _check_room(cache_seqlens, q.shape[1], capacity, block_table, k_cache)
    return _cached(q, k_new, v_new, k_cache, v_cache, cache_seqlens, None, Layout.CAUSAL, 1, softmax_scale,
                   backend, block_table)


def _cached(q, k_new, v_new, k_cache, v_cache, cache_seqlens, context_lens, layout, block_size,
            softmax_scale, backend, block_table):
    scale = _scale(softmax_scale, q)
    call = Call(backends.CACHED_ATTENTION, q.device, q.dtype, q.shape[-1], int(layout), paged=block_table is not None)
    chosen = backends.select(call, backend)  # a backend that declines paged calls is never chosen for one
    return chosen.cached_attention(q, k_new, v_new, k_cache, v_cache, cache_seqlens, context_lens, int(layout),
                                   block_size, scale, block_table=block_table)


# ----------------------------------------------------------------------------
# Acceptance and commit (TIDAR.md section 5, greedy)
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
    if drafts.dim() != 2 or drafts.dtype != torch.long:
        raise ValueError(f"drafts must be int64 [batch, k], got {drafts.dtype} {tuple(drafts.shape)}")
    batch, draft_len = drafts.shape
    for name, logits in (("draft_logits", draft_logits), ("block_logits", block_logits)):
        if logits.dim() != 3 or tuple(logits.shape[:2]) != (batch, draft_len):
            raise ValueError(f"{name} must be [batch={batch}, k={draft_len}, vocab], got {tuple(logits.shape)}")
        if logits.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating tensor, got {logits.dtype}")
        _check_same_device(name, logits, drafts)
    if draft_logits.shape != block_logits.shape:
        raise ValueError(f"block_logits must have draft_logits' shape {tuple(draft_logits.shape)}, "
                         f"got {tuple(block_logits.shape)}")
    _check_lengths_tensor("cache_seqlens", cache_seqlens, drafts)
    if active is not None and (active.dtype != torch.bool or tuple(active.shape) != (batch,)):
        raise ValueError(f"active must be bool [batch={batch}] or None, got {active.dtype} {tuple(active.shape)}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    # The dtype the two logits are compared in: a backend that cannot take it (fp64) declines.
    dtype = torch.promote_types(draft_logits.dtype, block_logits.dtype)
    call = Call(backends.ACCEPT_DRAFTS, drafts.device, dtype, 0, int(Layout.DECODE))
    chosen = backends.select(call, backend)
    return chosen.accept_drafts(drafts, draft_logits, block_logits, cache_seqlens, active, float(beta))


# ----------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------


def _scale(softmax_scale, q):
    if softmax_scale is None:
        return q.shape[-1] ** -0.5
    if not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be > 0 or None (head_dim**-0.5), got {softmax_scale}")
    return float(softmax_scale)


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_same_device(name, tensor, like):
    if tensor.device != like.device:
        raise ValueError(f"{name} must be on {like.device} like the other inputs, got {tensor.device}")


def _check_qkv(q, k, v, names=("q", "k", "v")):
    """Rank, dtype, device, batch, sequence and head-count agreement of q/k/v."""
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-d tensor [batch, seq, heads, head_dim], got {shape}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        _check_same_device(name, t, q)
    qn, kn, vn = names
    if k.shape != v.shape:
        raise ValueError(f"{vn} must have {kn}'s shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[:2] != q.shape[:2]:
        raise ValueError(f"{kn} must have {qn}'s batch and seq {tuple(q.shape[:2])}, got {tuple(k.shape[:2])}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"{kn} head_dim must equal {qn}'s {q.shape[3]}, got {k.shape[3]}")
    if k.shape[2] < 1 or q.shape[2] % k.shape[2]:
        raise ValueError(f"{qn} heads ({q.shape[2]}) must be a multiple of {kn} heads ({k.shape[2]}) for GQA")


def _check_lengths_tensor(name, lengths, like):
    if not isinstance(lengths, torch.Tensor) or lengths.dtype != torch.int32:
        got = lengths.dtype if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise ValueError(f"{name} must be an int32 tensor [batch], got {got}")
    if tuple(lengths.shape) != (like.shape[0],):
        raise ValueError(f"{name} must have shape [batch={like.shape[0]}], got {tuple(lengths.shape)}")
    _check_same_device(name, lengths, like)


def _check_cached(q, k_new, v_new, k_cache, v_cache, cache_seqlens, block_table=None, expected_rows=None,
                  rows_what="") -> int:
    """Static checks of a cached call; returns each sequence's capacity in cache rows."""
    _check_qkv(q, k_new, v_new, names=("q", "k_new", "v_new"))
    if q.shape[1] < 1 or (expected_rows is not None and q.shape[1] != expected_rows):
        raise ValueError(f"q.shape[1] must be {rows_what or '>= 1'}, got {q.shape[1]}")
    batch, _, kv_heads, head_dim = k_new.shape
    paged = block_table is not None
    dims = "[num_pages, page_size, kv_heads, head_dim]" if paged else "[batch, max_len, kv_heads, head_dim]"
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(cache, torch.Tensor) or cache.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor {dims}")
        if paged and (cache.shape[0] < 1 or not 1 <= cache.shape[1] <= MAX_PAGE_SIZE
                      or cache.shape[2:] != (kv_heads, head_dim)):
            raise ValueError(f"{name} must be [num_pages >= 1, page_size in [1, {MAX_PAGE_SIZE}], kv_heads={kv_heads}, "
                             f"head_dim={head_dim}] with block_table, got {tuple(cache.shape)}")
        if not paged and (cache.shape[0] != batch or cache.shape[2:] != (kv_heads, head_dim)):
            raise ValueError(f"{name} must be [batch={batch}, max_len, kv_heads={kv_heads}, head_dim={head_dim}], "
                             f"got {tuple(cache.shape)}")
        if cache.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {cache.dtype}")
        _check_same_device(name, cache, q)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    _check_lengths_tensor("cache_seqlens", cache_seqlens, q)
    if not paged:
        return k_cache.shape[1]
    if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2:
        got = f"{block_table.dtype} {tuple(block_table.shape)}" if isinstance(block_table, torch.Tensor) else \
            type(block_table).__name__
        raise ValueError(f"block_table must be an int32 tensor [batch, max_pages_per_seq] or None, got {got}")
    if block_table.shape[0] != batch or block_table.shape[1] < 1:
        raise ValueError(f"block_table must have shape [batch={batch}, max_pages_per_seq >= 1], "
                         f"got {tuple(block_table.shape)}")
    _check_same_device("block_table", block_table, q)
    return block_table.shape[1] * k_cache.shape[1]


def _skip_value_checks(lengths: torch.Tensor) -> bool:
    """Value checks read device memory: never while capturing a graph or tracing."""
    if torch.compiler.is_compiling():
        return True
    return lengths.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_room(cache_seqlens, rows, max_len, block_table=None, page_pool=None):
    """``0 <= n_b`` and ``n_b + rows <= max_len``; with a block table (and its ``page_pool``, the
    k_cache), the pages of rows ``[0, n_b + rows)``."""
    if _skip_value_checks(cache_seqlens):
        return
    lengths = cache_seqlens.cpu()
    if bool((lengths < 0).any()):
        raise ValueError(f"cache_seqlens must be >= 0, got {lengths.tolist()}")
    if bool((lengths + rows > max_len).any()):
        what = "max_pages_per_seq * page_size" if block_table is not None else "max_len"
        raise ValueError(f"cache_seqlens + {rows} new rows must be <= {what}={max_len} (cache overflow), "
                         f"got cache_seqlens={lengths.tolist()}")
    if block_table is not None:
        num_pages, page_size = page_pool.shape[:2]
        _check_pages(block_table.cpu(), lengths + rows, page_size, num_pages)


def _check_pages(table, rows_used, page_size, num_pages):
    """Table columns covering rows ``[0, rows_used[b])`` hold distinct pages in ``[0, num_pages)``."""
    columns_used = (rows_used + page_size - 1) // page_size  # [batch]
    used = torch.arange(table.shape[1])[None, :] < columns_used[:, None]
    bad = used & ((table < 0) | (table >= num_pages))
    if bool(bad.any()):
        b, column = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"block_table[{b}, {column}] must be a page in [0, num_pages={num_pages}) (it holds rows "
                         f"of cache_seqlens + new rows = {int(rows_used[b])}), got {int(table[b, column])}")
    pages = table[used]
    distinct, counts = pages.unique(return_counts=True)
    if bool((counts > 1).any()):
        page = int(distinct[counts > 1][0])
        owners = [(int(b), int(c)) for b, c in (used & (table == page)).nonzero()]
        raise ValueError(f"block_table must give each (sequence, column) in use its own page, got page {page} "
                         f"at (sequence, column) {owners}")
