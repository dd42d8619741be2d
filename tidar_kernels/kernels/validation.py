"""Argument checks of every public entry point (the ops, the decode loops, training, tuning).

One statement of each rule, so every backend sees the same guarantees: a malformed call
raises ValueError naming the argument and what was expected, before anything is written.
The CUDA bindings (``csrc/bindings_common.h``) keep the checks their memory safety needs,
since their torch ops can be called directly; the constants both sides use are compared
by ``python_tests/test_shared_constants.py``.

Memory checks: a tensor an op writes (the caches, ``cache_seqlens`` of ``accept_drafts``)
must not overlap itself (no stride-0 or overlapping dims) nor any other tensor of the call
(byte spans, as the CUDA binding checks). Addresses are unknown while torch.compile traces,
so the span checks then skip; the stride checks always run.
"""
from __future__ import annotations

from typing import Optional

import torch

# Paged caches: pages of 1 (SGLang's token pool) up to 256 rows. Mirrored as kMaxPageSize in csrc/bindings_common.h.
MAX_PAGE_SIZE = 256

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------
# Scalars
# ----------------------------------------------------------------------------


def check_int(name: str, value, minimum: int, note: str = "") -> None:
    """``value`` is a Python int (not bool) ``>= minimum``; ``note`` follows the bound in the message."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{note}, got {value!r}")


def check_positive(name: str, value) -> None:
    check_int(name, value, 1)


def check_nonnegative(name: str, value) -> None:
    check_int(name, value, 0)


def resolve_softmax_scale(softmax_scale: Optional[float], q: torch.Tensor) -> float:
    """The scale a call uses: ``softmax_scale`` (> 0) or ``head_dim ** -0.5``."""
    if softmax_scale is None:
        return q.shape[-1] ** -0.5
    if not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be > 0 or None (head_dim**-0.5), got {softmax_scale}")
    return float(softmax_scale)


# ----------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------


def check_same_device(name: str, tensor: torch.Tensor, like: torch.Tensor) -> None:
    if tensor.device != like.device:
        raise ValueError(f"{name} must be on {like.device} like the other inputs, got {tensor.device}")


def check_qkv(q, k, v, names=("q", "k", "v")) -> None:
    """Rank, dtype, device, batch, sequence and head-count agreement of q/k/v.

    The batch and sequence may be empty; heads and head_dim may not (no attention to compute).
    """
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-d tensor [batch, seq, heads, head_dim], got {shape}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        check_same_device(name, t, q)
    qn, kn, vn = names
    if q.shape[2] < 1 or q.shape[3] < 1:
        raise ValueError(f"{qn} must have heads >= 1 and head_dim >= 1, got shape {tuple(q.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"{vn} must have {kn}'s shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[:2] != q.shape[:2]:
        raise ValueError(f"{kn} must have {qn}'s batch and seq {tuple(q.shape[:2])}, got {tuple(k.shape[:2])}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"{kn} head_dim must equal {qn}'s {q.shape[3]}, got {k.shape[3]}")
    if k.shape[2] < 1 or q.shape[2] % k.shape[2]:
        raise ValueError(f"{qn} heads ({q.shape[2]}) must be a multiple of {kn} heads ({k.shape[2]}) for GQA")


def check_lengths_tensor(name: str, lengths, like: torch.Tensor) -> None:
    """An int32 ``[batch]`` tensor on ``like``'s device."""
    if not isinstance(lengths, torch.Tensor) or lengths.dtype != torch.int32:
        got = lengths.dtype if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise ValueError(f"{name} must be an int32 tensor [batch], got {got}")
    if tuple(lengths.shape) != (like.shape[0],):
        raise ValueError(f"{name} must have shape [batch={like.shape[0]}], got {tuple(lengths.shape)}")
    check_same_device(name, lengths, like)


def check_no_self_overlap(name: str, t: torch.Tensor) -> None:
    """No two indices of ``t`` reach the same element (a written tensor would race with itself).

    Sorted by stride, every stride of a dim of size > 1 must reach past the extent of the
    smaller ones: rejects stride 0 (an expanded tensor) and rows that overlap each other.
    The rule of ``check_no_self_overlap`` in ``csrc/bindings_common.h``.
    """
    extent = 1  # elements spanned by the dims checked so far
    for stride, size in sorted((t.stride(d), t.shape[d]) for d in range(t.dim()) if t.shape[d] > 1):
        if stride < extent:
            raise ValueError(f"{name} must not overlap itself (it is written): a dim of size {size} has stride "
                             f"{stride} (0 = expanded, or rows overlapping), need >= {extent}; got strides "
                             f"{tuple(t.stride())} for shape {tuple(t.shape)}")
        extent += stride * (size - 1)


def _has_address(t: torch.Tensor) -> bool:
    return not (torch.compiler.is_compiling() or t.device.type == "meta" or t.numel() == 0)


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """``[first, last]`` byte addresses ``t`` can touch."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    first = t.data_ptr()
    return first, first + (last + 1) * t.element_size() - 1


def check_disjoint(written: tuple[str, torch.Tensor], others: dict) -> None:
    """The written tensor's bytes overlap none of ``others`` (name -> tensor; anything else is skipped)."""
    name, t = written
    if not _has_address(t):
        return
    first, last = _byte_span(t)
    for other_name, other in others.items():
        if not isinstance(other, torch.Tensor) or not _has_address(other):
            continue
        other_first, other_last = _byte_span(other)
        if not (last < other_first or other_last < first):
            raise ValueError(f"{name} must not overlap {other_name} in memory ({name} is written): {name} spans "
                             f"bytes [{first}, {last}], {other_name} [{other_first}, {other_last}]")


# ----------------------------------------------------------------------------
# Cached ops: static checks (shapes, dtypes, memory) and value checks (lengths, pages)
# ----------------------------------------------------------------------------


def check_cached(q, k_new, v_new, k_cache, v_cache, cache_seqlens, block_table=None, expected_rows=None,
                 rows_what="", other_reads=None) -> int:
    """Static checks of a cached call; returns each sequence's capacity in cache rows.

    ``other_reads`` (name -> tensor): further inputs the caches must not overlap. An empty
    batch passes: the op returns an empty result on every backend.
    """
    check_qkv(q, k_new, v_new, names=("q", "k_new", "v_new"))
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
        check_same_device(name, cache, q)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    check_lengths_tensor("cache_seqlens", cache_seqlens, q)
    capacity = k_cache.shape[1]
    if paged:
        if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2:
            got = f"{block_table.dtype} {tuple(block_table.shape)}" if isinstance(block_table, torch.Tensor) else \
                type(block_table).__name__
            raise ValueError(f"block_table must be an int32 tensor [batch, max_pages_per_seq] or None, got {got}")
        if block_table.shape[0] != batch or block_table.shape[1] < 1:
            raise ValueError(f"block_table must have shape [batch={batch}, max_pages_per_seq >= 1], "
                             f"got {tuple(block_table.shape)}")
        check_same_device("block_table", block_table, q)
        # An expanded table would give two sequences the same pages, so their writes would collide.
        check_no_self_overlap("block_table", block_table)
        capacity *= block_table.shape[1]
    reads = dict(q=q, k_new=k_new, v_new=v_new, cache_seqlens=cache_seqlens, block_table=block_table,
                 **(other_reads or {}))
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_no_self_overlap(name, cache)
        check_disjoint((name, cache), reads)
    check_disjoint(("k_cache", k_cache), dict(v_cache=v_cache))
    return capacity


def skip_value_checks(lengths: torch.Tensor) -> bool:
    """Value checks read device memory: never while capturing a graph or tracing."""
    if torch.compiler.is_compiling():
        return True
    return lengths.is_cuda and torch.cuda.is_current_stream_capturing()


def check_room(cache_seqlens, rows, max_len, block_table=None, page_pool=None) -> None:
    """``0 <= n_b`` and ``n_b + rows <= max_len``; with a block table (and its ``page_pool``, the
    k_cache), the pages of rows ``[0, n_b + rows)``."""
    if skip_value_checks(cache_seqlens):
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
        check_pages(block_table.cpu(), lengths + rows, page_size, num_pages)


def check_pages(table, rows_used, page_size, num_pages) -> None:
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


# ----------------------------------------------------------------------------
# Acceptance
# ----------------------------------------------------------------------------


def check_accept(drafts, draft_logits, block_logits, cache_seqlens, active, beta) -> None:
    """Shapes, dtypes and devices of an ``accept_drafts`` call; ``cache_seqlens`` (written) aliases nothing."""
    if not isinstance(drafts, torch.Tensor) or drafts.dim() != 2 or drafts.dtype != torch.long:
        got = f"{drafts.dtype} {tuple(drafts.shape)}" if isinstance(drafts, torch.Tensor) else type(drafts).__name__
        raise ValueError(f"drafts must be int64 [batch, k], got {got}")
    batch, draft_len = drafts.shape
    for name, logits in (("draft_logits", draft_logits), ("block_logits", block_logits)):
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != (batch, draft_len):
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"{name} must be [batch={batch}, k={draft_len}, vocab], got {got}")
        if logits.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating tensor, got {logits.dtype}")
        check_same_device(name, logits, drafts)
    if draft_logits.shape != block_logits.shape:
        raise ValueError(f"block_logits must have draft_logits' shape {tuple(draft_logits.shape)}, "
                         f"got {tuple(block_logits.shape)}")
    check_lengths_tensor("cache_seqlens", cache_seqlens, drafts)
    if active is not None and (not isinstance(active, torch.Tensor) or active.dtype != torch.bool
                               or tuple(active.shape) != (batch,)):
        got = f"{active.dtype} {tuple(active.shape)}" if isinstance(active, torch.Tensor) else type(active).__name__
        raise ValueError(f"active must be bool [batch={batch}] or None, got {got}")
    if active is not None:
        check_same_device("active", active, drafts)
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    check_no_self_overlap("cache_seqlens", cache_seqlens)
    check_disjoint(("cache_seqlens", cache_seqlens), dict(drafts=drafts, draft_logits=draft_logits,
                                                          block_logits=block_logits, active=active))
