"""Triton kernels for TiDAR attention: training / causal forward and backward, and
attention over a KV cache (decode step, prefill, causal append) with the cache write.

The mask is never read from memory. Each query row ``t`` sees, among the forward's
own keys, at most two ranges ``[0, clean_end)`` and ``[block_start, block_end)``,
computed from the row index and a few integers by
:func:`tidar_kernels.kernels.mask.key_ranges_tl` (the one definition of the rule). A tile of
query rows therefore sees the union of

* segment A, the clean prefix ``[0, max clean_end)``: tiles below ``min clean_end``
  are FULL (no masking at all); the rest, up to ``max clean_end``, are PARTIAL and
  masked with the clean rule only;
* segment B, the rows' own mask blocks ``[min block_start, max block_end)``:
  PARTIAL, masked with the block rule only (a row's block is at most ``k`` keys
  wide, so these tiles are few).

Every other key tile is EMPTY and never visited. The two rules pick disjoint
columns for every row (``block_start >= clean_rows >= clean_end``), so a key column
counted by both segments' tiles is still counted once. The backward dK/dV kernel
goes the other way round (one key tile, all query tiles) and classifies each
query tile against it as empty / full / partial with the same ranges.

Conventions: tensors are ``[batch, seq, heads, head_dim]`` with arbitrary strides
(passed in); offsets are int64 wherever they scale with batch or sequence length;
logits are kept in base 2 (``qk_scale = scale * log2(e)``) so the softmax uses
``exp2``; the saved log-sum-exp is in natural log like the reference's.
``BLOCK_D`` is the head dim rounded up to a power of two >= 16 (masked loads), so
any head dim up to 128 works.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..mask import key_ranges_tl

LOG2E = 1.4426950408889634  # log2(e): natural-log logits -> base-2 logits (host side: qk_scale)
# Globals read inside @triton.jit functions must be constexpr.
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)  # ln(2): base-2 log-sum-exp -> natural log
_BIG = tl.constexpr(2**30)  # larger than any sequence length; neutral element of the min reductions


# ----------------------------------------------------------------------------
# Shared building blocks (online softmax over key tiles)
# ----------------------------------------------------------------------------


@triton.jit
def _attend_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                 n0, n_end, lo, hi, qk_scale, offs_n, offs_d, d_ok,
                 MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile ``[n0, n0 + BLOCK_N)`` (loads clipped to ``n_end``) of online softmax.

    Unmasked (FULL) tiles must lie entirely below ``n_end``; a MASKED tile lets row
    ``i`` see only the columns in ``[lo_i, hi_i)``. Keys are rows of a
    ``[seq, head_dim]`` view at ``k_base``/``v_base`` (see :func:`_attend_keys`).
    """
    cols = n0 + offs_n
    col_ok = cols < n_end
    cols64 = cols.to(tl.int64)
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k_ptrs = k_base + cols64[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = v_base + cols64[:, None] * stride_vn + offs_d[None, :] * stride_vd
    return _attend_keys(acc, m_i, l_i, q, k_ptrs, v_ptrs, kv_mask, cols, lo, hi, qk_scale,
                        MASKED=MASKED, PRECISION=PRECISION)


@triton.jit
def _attend_keys(acc, m_i, l_i, q, k_ptrs, v_ptrs, kv_mask, cols, lo, hi, qk_scale,
                 MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax update with the key tile at ``k_ptrs``/``v_ptrs`` ``[BLOCK_N, BLOCK_D]``.

    Entries outside ``kv_mask`` load as 0 and are never read. ``cols`` are the keys'
    positions for the MASKED rule (row ``i`` sees ``[lo_i, hi_i)``). ``m_i`` is the
    running max of the base-2 logits and ``l_i`` the running sum of ``exp2(s - m_i)``;
    a row that has seen nothing yet keeps ``m_i = -inf`` (``m_safe`` avoids ``-inf - -inf``).
    """
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    p, alpha, m_new, l_i = _softmax_step(m_i, l_i, q, k, cols, lo, hi, qk_scale, MASKED=MASKED, PRECISION=PRECISION)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _softmax_step(m_i, l_i, q, k, cols, lo, hi, qk_scale, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """Logits of the loaded key tile ``k`` and the online-softmax bookkeeping of
    :func:`_attend_keys`: ``(p, alpha, m_new, l_new)``; the caller adds ``p @ V`` to
    ``acc * alpha``. A MASKED tile lets row ``i`` see only the columns in ``[lo_i, hi_i)``
    (``tl.where``: whatever the masked columns of ``k`` hold, NaN included, is dropped)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        visible = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i


@triton.jit
def _row_ranges(LAYOUT: tl.constexpr, t, t_ok, clean_rows, block_size, context_len):
    """``key_ranges_tl`` for the rows ``t`` of a tile; rows past the end see nothing."""
    clean_end, block_start, block_end = key_ranges_tl(LAYOUT, t, clean_rows, block_size, context_len)
    return (tl.where(t_ok, clean_end, 0), tl.where(t_ok, block_start, 0), tl.where(t_ok, block_end, 0))


@triton.jit
def _segments(clean_end, block_start, block_end, t_ok, BLOCK_N: tl.constexpr):
    """Key-tile bounds of a row tile with ranges ``(clean_end, block_start, block_end)``.

    Returns ``(full_end, clean_hi, block_lo, block_hi)``: segment A is FULL tiles
    ``[0, full_end)`` then PARTIAL tiles ``[full_end, clean_hi)``; segment B is the
    PARTIAL tiles ``[block_lo, block_hi)`` (empty when no row has a block).
    """
    clean_hi = tl.max(clean_end, 0)
    clean_lo = tl.min(tl.where(t_ok, clean_end, _BIG), 0)
    full_end = tl.minimum((clean_lo // BLOCK_N) * BLOCK_N, clean_hi)
    block_lo = tl.min(tl.where(block_end > block_start, block_start, _BIG), 0)
    block_hi = tl.max(block_end, 0)
    return full_end, clean_hi, block_lo, block_hi


@triton.jit
def _attend_masked(acc, m_i, l_i, q, t, t_ok, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                   clean_rows, block_size, context_len, qk_scale, offs_n, offs_d, d_ok,
                   LAYOUT: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Rows ``t`` attend over the forward's own keys under the TiDAR rule (segments A and B)."""
    clean_end, block_start, block_end = _row_ranges(LAYOUT, t, t_ok, clean_rows, block_size, context_len)
    full_end, clean_hi, block_lo, block_hi = _segments(clean_end, block_start, block_end, t_ok, BLOCK_N)
    no_lo = tl.zeros_like(clean_end)
    # Segment A: the clean prefix. FULL tiles up to the smallest clean_end, PARTIAL after.
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                     n0, clean_hi, no_lo, clean_end, qk_scale, offs_n, offs_d, d_ok,
                                     MASKED=False, PRECISION=PRECISION)
    for n0 in range(full_end, clean_hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                     n0, clean_hi, no_lo, clean_end, qk_scale, offs_n, offs_d, d_ok,
                                     MASKED=True, PRECISION=PRECISION)
    # Segment B: the rows' own mask blocks (clean rows have an empty block range).
    for n0 in range(block_lo, block_hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                     n0, block_hi, block_start, block_end, qk_scale, offs_n, offs_d, d_ok,
                                     MASKED=True, PRECISION=PRECISION)
    return acc, m_i, l_i


@triton.jit
def _cache_slots(positions, ok, b, BlockTable, sbt_b, sbt_p, num_pages,
                 PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """Where cache rows ``positions`` of sequence ``b`` live: ``(outer, inner, ok)``, int64.

    Contiguous cache ``[batch, max_len, ...]``: ``(b, t)``. Paged pool ``[num_pages,
    PAGE_SIZE, ...]``: ``(block_table[b, t // PAGE_SIZE], t % PAGE_SIZE)``; only the
    table entries of rows in ``ok`` are loaded, and a row whose entry lies outside
    ``[0, num_pages)`` is dropped from ``ok`` (never read, never written), so an unchecked
    bad table cannot touch memory outside the pool.
    """
    if PAGED:
        page = tl.load(BlockTable + b * sbt_b + (positions // PAGE_SIZE).to(tl.int64) * sbt_p, mask=ok, other=0)
        ok = ok & (page >= 0) & (page < num_pages)
        return page.to(tl.int64), (positions % PAGE_SIZE).to(tl.int64), ok
    return b + tl.zeros_like(positions).to(tl.int64), positions.to(tl.int64), ok


@triton.jit
def _attend_cache_tile(acc, m_i, l_i, q, k_head, v_head, skc_o, skc_i, skc_d, svc_o, svc_i, svc_d,
                       b, BlockTable, sbt_b, sbt_p, num_pages, n0, end, hi, qk_scale, offs_n, offs_d, d_ok,
                       MASKED: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Cache rows ``[n0, n0 + BLOCK_N)`` (loads clipped to ``end``) of sequence ``b``, addressed by
    :func:`_cache_slots`; ``k_head``/``v_head`` point at the KV head, ``s*c_o``/``s*c_i`` are the
    (outer, inner) strides."""
    cols = n0 + offs_n
    outer, inner, col_ok = _cache_slots(cols, cols < end, b, BlockTable, sbt_b, sbt_p, num_pages,
                                        PAGED=PAGED, PAGE_SIZE=PAGE_SIZE)
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k_ptrs = k_head + (outer * skc_o + inner * skc_i)[:, None] + offs_d[None, :] * skc_d
    v_ptrs = v_head + (outer * svc_o + inner * svc_i)[:, None] + offs_d[None, :] * svc_d
    return _attend_keys(acc, m_i, l_i, q, k_ptrs, v_ptrs, kv_mask, cols, hi * 0, hi, qk_scale,
                        MASKED=MASKED, PRECISION=PRECISION)


@triton.jit
def _attend_cache(acc, m_i, l_i, q, k_head, v_head, skc_o, skc_i, skc_d, svc_o, svc_i, svc_d,
                  b, BlockTable, sbt_b, sbt_p, num_pages, start, end, qk_scale, offs_n, offs_d, d_ok,
                  PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Every row attends to every cache row in ``[start, end)`` of sequence ``b``: FULL tiles,
    then one masked tail."""
    full_end = start + (tl.maximum(end - start, 0) // BLOCK_N) * BLOCK_N
    hi = tl.zeros([BLOCK_M], dtype=tl.int32) + end
    for n0 in range(start, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_cache_tile(acc, m_i, l_i, q, k_head, v_head, skc_o, skc_i, skc_d, svc_o, svc_i,
                                           svc_d, b, BlockTable, sbt_b, sbt_p, num_pages, n0, end, hi, qk_scale,
                                           offs_n, offs_d, d_ok, MASKED=False, PAGED=PAGED, PAGE_SIZE=PAGE_SIZE,
                                           PRECISION=PRECISION)
    if full_end < end:
        acc, m_i, l_i = _attend_cache_tile(acc, m_i, l_i, q, k_head, v_head, skc_o, skc_i, skc_d, svc_o, svc_i,
                                           svc_d, b, BlockTable, sbt_b, sbt_p, num_pages, full_end, end, hi,
                                           qk_scale, offs_n, offs_d, d_ok, MASKED=True, PAGED=PAGED,
                                           PAGE_SIZE=PAGE_SIZE, PRECISION=PRECISION)
    return acc, m_i, l_i


@triton.jit
def _attend_cache_tma(acc, m_i, l_i, q, k_desc, v_desc, start, end, qk_scale, offs_n,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """:func:`_attend_cache` for a contiguous cache read through TMA tensor descriptors.

    ``k_desc``/``v_desc`` describe one sequence's KV head, ``[max_len, head_dim]`` in
    ``[BLOCK_N, BLOCK_D]`` boxes: TMA zero-fills only what lies outside that tensor (rows
    past ``max_len``, columns past ``head_dim``). Rows in ``[end, max_len)`` are real
    memory (the next split's rows, or unused rows holding anything, NaN included), so
    the tail tile masks them here: logits by the MASKED rule, V rows to exact zeros
    (``0 * NaN`` would poison ``p @ V``).
    """
    full_end = start + (tl.maximum(end - start, 0) // BLOCK_N) * BLOCK_N
    hi = tl.zeros([BLOCK_M], dtype=tl.int32) + end
    for n0 in range(start, full_end, BLOCK_N):
        k = k_desc.load([n0, 0])
        p, alpha, m_i, l_i = _softmax_step(m_i, l_i, q, k, n0 + offs_n, hi * 0, hi, qk_scale, MASKED=False,
                                           PRECISION=PRECISION)
        v = v_desc.load([n0, 0])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    if full_end < end:
        cols = full_end + offs_n
        k = k_desc.load([full_end, 0])
        p, alpha, m_i, l_i = _softmax_step(m_i, l_i, q, k, cols, hi * 0, hi, qk_scale, MASKED=True,
                                           PRECISION=PRECISION)
        v = tl.where((cols < end)[:, None], v_desc.load([full_end, 0]), 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_i, l_i


# ----------------------------------------------------------------------------
# Cache-free attention (training, causal): forward
# ----------------------------------------------------------------------------


@triton.jit
def _query_tile(num_rows, num_heads, group, head_dim, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program of a ``(cdiv(T, BLOCK_M), batch * q_heads)`` grid: its batch (int64), query head,
    KV head, rows ``t`` (and int64 copy), head-dim offsets and the masks of its row tile."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = pid_bh % num_heads
    t = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    t_ok = t < num_rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    return pid_bh, b, h, h // group, t, t_ok, t.to(tl.int64), offs_d, d_ok, t_ok[:, None] & d_ok[None, :]


@triton.jit
def _rows_ptr(base, b, h, t64, offs_d, s_b, s_t, s_h, s_d):
    """Pointers to rows ``t64`` of head ``h`` of batch ``b`` of a ``[batch, seq, heads, head_dim]`` tensor."""
    return base + b * s_b + h * s_h + t64[:, None] * s_t + offs_d[None, :] * s_d


@triton.jit
def attention_fwd_kernel(Q, K, V, Out, Lse,
                         sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d,
                         sv_b, sv_t, sv_h, sv_d, so_b, so_t, so_h, so_d,
                         num_rows, num_heads, group, clean_rows, block_size, qk_scale, head_dim,
                         LAYOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Grid ``(cdiv(T, BLOCK_M), batch * q_heads)``: one query tile of one head.

    Writes ``Out`` and the natural-log ``Lse [batch, q_heads, T]`` (fp32) for backward.
    """
    pid_bh, b, h, hk, t, t_ok, t64, offs_d, d_ok, q_mask = _query_tile(num_rows, num_heads, group, head_dim,
                                                                        BLOCK_M, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(_rows_ptr(Q, b, h, t64, offs_d, sq_b, sq_t, sq_h, sq_d), mask=q_mask, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _attend_masked(acc, m_i, l_i, q, t, t_ok, K + b * sk_b + hk * sk_h, V + b * sv_b + hk * sv_h,
                                   sk_t, sk_d, sv_t, sv_d, clean_rows, block_size, 0, qk_scale,
                                   offs_n, offs_d, d_ok, LAYOUT=LAYOUT, BLOCK_N=BLOCK_N, PRECISION=PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(_rows_ptr(Out, b, h, t64, offs_d, so_b, so_t, so_h, so_d), out.to(Out.dtype.element_ty), mask=q_mask)
    lse = (m_i + tl.log2(l_safe)) * _LN2
    tl.store(Lse + pid_bh.to(tl.int64) * num_rows + t64, lse, mask=t_ok)


# ----------------------------------------------------------------------------
# Cache-free attention: backward (flash-attention 2 style recompute from Lse)
# ----------------------------------------------------------------------------


@triton.jit
def attention_bwd_preprocess_kernel(Out, DOut, Delta, so_b, so_t, so_h, so_d, sdo_b, sdo_t, sdo_h, sdo_d,
                                    num_rows, num_heads, head_dim,
                                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``Delta[b, h, t] = sum_d dO * O`` (fp32), the row term of ``dS = P * (dP - Delta)``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = pid_bh % num_heads
    t64 = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (t64 < num_rows)[:, None] & (offs_d < head_dim)[None, :]
    o = tl.load(_rows_ptr(Out, b, h, t64, offs_d, so_b, so_t, so_h, so_d), mask=mask, other=0.0)
    do = tl.load(_rows_ptr(DOut, b, h, t64, offs_d, sdo_b, sdo_t, sdo_h, sdo_d), mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * num_rows + t64, delta, mask=t64 < num_rows)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
             n0, n_end, lo, hi, qk_scale, offs_n, offs_d, d_ok,
             MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """dQ contribution of one key tile: ``dQ += (P * (dO V^T - Delta)) K`` (scale applied later)."""
    cols = n0 + offs_n
    cols64 = cols.to(tl.int64)
    kv_mask = (cols < n_end)[:, None] & d_ok[None, :]
    k = tl.load(k_base + cols64[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(v_base + cols64[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None])
    if MASKED:
        visible = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def attention_bwd_dq_kernel(Q, K, V, DOut, Lse, Delta, DQ,
                            sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_d,
                            sdo_b, sdo_t, sdo_h, sdo_d, sdq_b, sdq_t, sdq_h, sdq_d,
                            num_rows, num_heads, group, clean_rows, block_size, qk_scale, scale, head_dim,
                            LAYOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Grid ``(cdiv(T, BLOCK_M), batch * q_heads)``: dQ of one query tile, same key tiles as forward."""
    pid_bh, b, h, hk, t, t_ok, t64, offs_d, d_ok, row_mask = _query_tile(num_rows, num_heads, group, head_dim,
                                                                          BLOCK_M, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(_rows_ptr(Q, b, h, t64, offs_d, sq_b, sq_t, sq_h, sq_d), mask=row_mask, other=0.0)
    do = tl.load(_rows_ptr(DOut, b, h, t64, offs_d, sdo_b, sdo_t, sdo_h, sdo_d), mask=row_mask, other=0.0)
    # Rows past the end get lse = +inf, so P = 0 there.
    lse2 = tl.load(Lse + pid_bh.to(tl.int64) * num_rows + t64, mask=t_ok, other=float("inf")) * _LOG2E
    delta = tl.load(Delta + pid_bh.to(tl.int64) * num_rows + t64, mask=t_ok, other=0.0)
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    clean_end, block_start, block_end = _row_ranges(LAYOUT, t, t_ok, clean_rows, block_size, 0)
    # Same tiles as _attend_masked: segment A (full, then partial), then segment B.
    full_end, clean_hi, block_lo, block_hi = _segments(clean_end, block_start, block_end, t_ok, BLOCK_N)
    no_lo = tl.zeros_like(clean_end)
    for n0 in range(0, full_end, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, sk_t, sk_d, sv_t, sv_d, n0, clean_hi, no_lo,
                      clean_end, qk_scale, offs_n, offs_d, d_ok, MASKED=False, PRECISION=PRECISION)
    for n0 in range(full_end, clean_hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, sk_t, sk_d, sv_t, sv_d, n0, clean_hi, no_lo,
                      clean_end, qk_scale, offs_n, offs_d, d_ok, MASKED=True, PRECISION=PRECISION)
    for n0 in range(block_lo, block_hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, sk_t, sk_d, sv_t, sv_d, n0, block_hi, block_start,
                      block_end, qk_scale, offs_n, offs_d, d_ok, MASKED=True, PRECISION=PRECISION)
    tl.store(_rows_ptr(DQ, b, h, t64, offs_d, sdq_b, sdq_t, sdq_h, sdq_d), (dq * scale).to(DQ.dtype.element_ty),
             mask=row_mask)


@triton.jit
def attention_bwd_dkdv_kernel(Q, K, V, DOut, Lse, Delta, DK, DV,
                              sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_d,
                              sdo_b, sdo_t, sdo_h, sdo_d, sdk_b, sdk_t, sdk_h, sdk_d, sdv_b, sdv_t, sdv_h, sdv_d,
                              num_rows, num_heads, num_kv_heads, group, clean_rows, block_size, qk_scale, scale,
                              head_dim, LAYOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Grid ``(cdiv(T, BLOCK_N), batch * kv_heads)``: dK, dV of one key tile of one KV head.

    Holds the K/V tile and walks every query tile; each is classified against the
    key tile from the rows' key ranges: EMPTY (skipped), FULL (no masking) or
    PARTIAL. The GQA group's query heads are summed in registers (no atomics).
    Products are transposed (``P^T = K Q^T``, ``dV += P^T dO``, ``dS^T = P^T (V dO^T -
    Delta)``, ``dK += dS^T Q``, as Triton's fused-attention tutorial), so on sm_90 all
    four matmuls run on wgmma (registers and shared memory: ``_bwd_config``).
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    hk = pid_bh % num_kv_heads
    n0 = pid_n * BLOCK_N
    n1 = n0 + BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    cols64 = cols.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    kv_mask = (cols < num_rows)[:, None] & d_ok[None, :]
    k = tl.load(_rows_ptr(K, b, hk, cols64, offs_d, sk_b, sk_t, sk_h, sk_d), mask=kv_mask, other=0.0)
    v = tl.load(_rows_ptr(V, b, hk, cols64, offs_d, sv_b, sv_t, sv_h, sv_d), mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    for m0 in range(0, num_rows, BLOCK_M):
        t = m0 + tl.arange(0, BLOCK_M)
        t_ok = t < num_rows
        clean_end, block_start, block_end = _row_ranges(LAYOUT, t, t_ok, clean_rows, block_size, 0)
        sees = (clean_end > n0) | ((block_start < n1) & (block_end > n0))
        if tl.max(sees.to(tl.int32), 0) > 0:  # not EMPTY
            # FULL when every real row sees every column of the key tile.
            covered = (n1 <= clean_end) | ((block_start <= n0) & (n1 <= block_end)) | (t >= num_rows)
            full = tl.min(covered.to(tl.int32), 0)
            t64 = t.to(tl.int64)
            row_mask = t_ok[:, None] & d_ok[None, :]
            for g in range(0, group):
                h = hk * group + g
                bh = b * num_heads + h
                q = tl.load(_rows_ptr(Q, b, h, t64, offs_d, sq_b, sq_t, sq_h, sq_d), mask=row_mask, other=0.0)
                do = tl.load(_rows_ptr(DOut, b, h, t64, offs_d, sdo_b, sdo_t, sdo_h, sdo_d), mask=row_mask, other=0.0)
                lse2 = tl.load(Lse + bh * num_rows + t64, mask=t_ok, other=float("inf")) * _LOG2E
                delta = tl.load(Delta + bh * num_rows + t64, mask=t_ok, other=0.0)
                # Transposed products ([key, row] tiles): the key tile is every matmul's M
                # dimension, so all four run on Hopper's wgmma (M >= 64) with small query tiles.
                p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse2[None, :])
                if full == 0:  # PARTIAL: apply the rule element-wise
                    visible = (cols[:, None] < clean_end[None, :]) | (
                        (cols[:, None] >= block_start[None, :]) & (cols[:, None] < block_end[None, :]))
                    p_t = tl.where(visible, p_t, 0.0)
                dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
                ds_t = p_t * (tl.dot(v, tl.trans(do), input_precision=PRECISION) - delta[None, :])
                dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    tl.store(_rows_ptr(DK, b, hk, cols64, offs_d, sdk_b, sdk_t, sdk_h, sdk_d), (dk * scale).to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(_rows_ptr(DV, b, hk, cols64, offs_d, sdv_b, sdv_t, sdv_h, sdv_d), dv.to(DV.dtype.element_ty),
             mask=kv_mask)


# ----------------------------------------------------------------------------
# Attention over a KV cache (decode step, prefill, causal append)
# ----------------------------------------------------------------------------


@triton.jit
def cached_attention_kernel(Q, KNew, VNew, KCache, VCache, CacheSeqlens, ContextLens, BlockTable, Out, OPart,
                            LsePart, sq_b, sq_t, sq_h, sq_d, skn_b, skn_t, skn_h, skn_d, svn_b, svn_t, svn_h, svn_d,
                            skc_b, skc_t, skc_h, skc_d, svc_b, svc_t, svc_h, svc_d, so_b, so_t, so_h, so_d,
                            sbt_b, sbt_p, num_pages,
                            num_rows, num_kv_heads, group, clean_rows, block_size, rows_written, max_len, qk_scale,
                            head_dim, LAYOUT: tl.constexpr, HAS_CONTEXT: tl.constexpr, NUM_SPLITS: tl.constexpr,
                            PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            PRECISION: tl.constexpr, TMA: tl.constexpr = False):
    """Grid ``(NUM_SPLITS, cdiv(T * group, BLOCK_M), batch * kv_heads)``.

    Tile rows are (query row, query head of the KV head's group) pairs, row
    ``r -> (t = r // group, h = hk * group + r % group)``, so one pass over a cached
    K/V tile serves the whole GQA group. Split ``s`` takes the ``s``-th chunk of cache
    rows ``[0, n_b)`` (chunk size from ``n_b`` read on the device, so the grid is
    static and the step is CUDA-graph capturable) with no mask; the last split also
    takes the step's own keys under the TiDAR rule. With one split the result goes
    straight to ``Out``; otherwise each split writes its normalised partial output
    and base-2 log-sum-exp to ``OPart [B*Hkv, S, T*group, D]`` (``OPart``'s dtype:
    the input dtype, see ``triton_ops.cached_attention``) / ``LsePart`` (fp32) for
    :func:`merge_splits_kernel`.

    Every program also copies its share of the first ``rows_written`` step rows of
    ``KNew``/``VNew`` into the cache at ``[n_b, n_b + rows_written)``. No program reads
    those cache rows (reads stop at ``n_b``), so the copy needs no ordering.

    ``n_b`` is clamped to ``[0, max_len]`` and the copy stops at ``max_len``, like the
    CUDA kernel: the host check of ``n_b + rows <= max_len`` is skipped inside a CUDA
    graph, and a bad length must not read or write outside the cache.

    ``PAGED``: ``KCache``/``VCache`` are page pools ``[num_pages, PAGE_SIZE, kv_heads,
    head_dim]`` and cache row ``t`` of sequence ``b`` is slot ``t % PAGE_SIZE`` of page
    ``BlockTable[b, t // PAGE_SIZE]`` (reads and the write alike, :func:`_cache_slots`);
    ``max_len`` is then ``max_pages_per_seq * PAGE_SIZE``. The ``skc_b``/``skc_t`` strides
    are the pool's page and slot strides.

    ``TMA`` (contiguous caches only, sm_90+, ``triton_ops.tma_legal``): the cache loop
    reads K/V tiles through device-side tensor descriptors (Hopper TMA), one per
    program over its sequence's KV head. Off by default (``TIDAR_TRITON_TMA``); results
    are the same as the pointer loop's.
    """
    split = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    hk = pid_bh % num_kv_heads
    n_cached = tl.minimum(tl.maximum(tl.load(CacheSeqlens + b), 0), max_len)
    packed = num_rows * group
    r = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < packed
    t = r // group
    h = hk * group + r % group
    t64 = t.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_mask = r_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sq_b + t64[:, None] * sq_t + h[:, None] * sq_h + offs_d[None, :] * sq_d, mask=row_mask,
                other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # (a) this split's chunk of the committed cache, every row sees all of it.
    chunk = tl.cdiv(tl.cdiv(n_cached, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, n_cached)
    if TMA:
        tl.static_assert(not PAGED, "TMA boxes cannot gather rows through a block table")
        k_desc = tl.make_tensor_descriptor(KCache + b * skc_b + hk * skc_h, shape=[max_len, head_dim],
                                           strides=[skc_t, 1], block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(VCache + b * svc_b + hk * svc_h, shape=[max_len, head_dim],
                                           strides=[svc_t, 1], block_shape=[BLOCK_N, BLOCK_D])
        acc, m_i, l_i = _attend_cache_tma(acc, m_i, l_i, q, k_desc, v_desc, start, end, qk_scale, offs_n,
                                          BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PRECISION=PRECISION)
    else:
        acc, m_i, l_i = _attend_cache(acc, m_i, l_i, q, KCache + hk * skc_h, VCache + hk * svc_h, skc_b, skc_t,
                                      skc_d, svc_b, svc_t, svc_d, b, BlockTable, sbt_b, sbt_p, num_pages, start, end,
                                      qk_scale, offs_n, offs_d, d_ok, PAGED=PAGED, PAGE_SIZE=PAGE_SIZE,
                                      BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PRECISION=PRECISION)
    # (b) the step's own keys under the TiDAR rule, on the last split.
    if split == NUM_SPLITS - 1:
        if HAS_CONTEXT:
            context_len = tl.load(ContextLens + b)
        else:
            context_len = 0
        acc, m_i, l_i = _attend_masked(acc, m_i, l_i, q, t, r_ok, KNew + b * skn_b + hk * skn_h,
                                       VNew + b * svn_b + hk * svn_h, skn_t, skn_d, svn_t, svn_d,
                                       clean_rows, block_size, context_len, qk_scale, offs_n, offs_d, d_ok,
                                       LAYOUT=LAYOUT, BLOCK_N=BLOCK_N, PRECISION=PRECISION)
    # Cache write of the clean step rows, spread over all programs of this (b, hk).
    program = split * tl.num_programs(1) + pid_r
    num_programs = NUM_SPLITS * tl.num_programs(1)
    for w0 in range(program * BLOCK_N, rows_written, num_programs * BLOCK_N):
        w = (w0 + offs_n).to(tl.int64)
        dst = n_cached.to(tl.int64) + w
        outer, inner, dst_ok = _cache_slots(dst, (w < rows_written) & (dst < max_len), b, BlockTable, sbt_b,
                                            sbt_p, num_pages, PAGED=PAGED, PAGE_SIZE=PAGE_SIZE)
        w_mask = dst_ok[:, None] & d_ok[None, :]
        k_rows = tl.load(_rows_ptr(KNew, b, hk, w, offs_d, skn_b, skn_t, skn_h, skn_d), mask=w_mask)
        k_dst = KCache + hk * skc_h + (outer * skc_b + inner * skc_t)[:, None] + offs_d[None, :] * skc_d
        tl.store(k_dst, k_rows, mask=w_mask)
        v_rows = tl.load(_rows_ptr(VNew, b, hk, w, offs_d, svn_b, svn_t, svn_h, svn_d), mask=w_mask)
        v_dst = VCache + hk * svc_h + (outer * svc_b + inner * svc_t)[:, None] + offs_d[None, :] * svc_d
        tl.store(v_dst, v_rows, mask=w_mask)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if NUM_SPLITS == 1:
        tl.store(Out + b * so_b + t64[:, None] * so_t + h[:, None] * so_h + offs_d[None, :] * so_d,
                 out.to(Out.dtype.element_ty), mask=row_mask)
    else:
        part = (pid_bh.to(tl.int64) * NUM_SPLITS + split) * packed + r.to(tl.int64)
        tl.store(OPart + part[:, None] * head_dim + offs_d[None, :], out.to(OPart.dtype.element_ty), mask=row_mask)
        # An empty chunk leaves m_i = -inf and l_i = 0: lse = -inf, weight 0 in the merge.
        tl.store(LsePart + part, tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf")), mask=r_ok)


@triton.jit
def merge_splits_kernel(OPart, LsePart, Out, so_b, so_t, so_h, so_d, num_rows, num_kv_heads, group, head_dim,
                        NUM_SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid ``(cdiv(T * group, BLOCK_M), batch * kv_heads)``: log-sum-exp merge of the splits.

    ``out = sum_s 2^(lse_s - m) o_s / sum_s 2^(lse_s - m)`` with ``m = max_s lse_s``;
    the last split always saw the step's own keys, so ``m`` is finite. Partials are
    read in ``OPart``'s dtype and merged in fp32.
    """
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    hk = pid_bh % num_kv_heads
    packed = num_rows * group
    r = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < packed
    t64 = (r // group).to(tl.int64)
    h = hk * group + r % group
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = r_ok[:, None] & (offs_d < head_dim)[None, :]
    first = pid_bh.to(tl.int64) * NUM_SPLITS * packed + r.to(tl.int64)

    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(NUM_SPLITS):
        m = tl.maximum(m, tl.load(LsePart + first + s * packed, mask=r_ok, other=float("-inf")))
    m = tl.where(m == float("-inf"), 0.0, m)  # only for rows past the end
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    weight_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in range(NUM_SPLITS):
        part = first + s * packed
        weight = tl.exp2(tl.load(LsePart + part, mask=r_ok, other=float("-inf")) - m)
        o = tl.load(OPart + part[:, None] * head_dim + offs_d[None, :], mask=row_mask, other=0.0).to(tl.float32)
        acc += weight[:, None] * o
        weight_sum += weight
    out = acc / tl.where(weight_sum == 0.0, 1.0, weight_sum)[:, None]
    tl.store(Out + b * so_b + t64[:, None] * so_t + h[:, None] * so_h + offs_d[None, :] * so_d,
             out.to(Out.dtype.element_ty), mask=row_mask)
