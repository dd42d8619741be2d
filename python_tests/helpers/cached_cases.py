"""One cached call (decode step, prefill, append) checked against the math, for any backend, on a
contiguous or a paged cache whose unused rows and pages hold NaN or Inf.

Shared by ``test_cached_unused_rows.py`` (rows past ``n`` are never read) and
``test_paged_kv.py`` (paged caches). The ground truth is the masked attention
of :mod:`tidar_kernels.kernels.backends.reference` computed in fp64 over the *zeroed*
contiguous cache, with the mask from the one rule (``reference.cached_mask``); the
tolerance is :func:`tidar_kernels.kernels.tolerance.assert_close_by_rule`.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

import tidar_kernels as tk
from tidar_kernels.kernels import backends
from tidar_kernels.kernels.backends import reference
from tidar_kernels.kernels.mask import Layout, layout_clean_rows, rows_written_to_cache
from tidar_kernels.kernels.tolerance import assert_close_by_rule, attention_bounds

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
POISONS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def cpu_cached_backends(paged: bool) -> list[str]:
    """Backends that load here and take a CPU fp32 cached call (paged or not): reference, and triton
    under the interpreter (and any later backend that says yes)."""
    names = []
    for name in backends.available():
        backend = backends.load(name)
        call = backends.Call(backends.CACHED_ATTENTION, torch.device("cpu"), torch.float32, 16, int(Layout.DECODE),
                             paged=paged)
        if backend.cached_attention is not None and backend.supports(call):
            names.append(name)
    return names


def step_rows(layout: Layout, draft_len: int, padded: int) -> int:
    """Rows of a call: decode ``k + k*k``, prefill ``P + k``, append ``T`` (= ``padded``)."""
    if layout == Layout.DECODE:
        return draft_len + draft_len * draft_len
    if layout == Layout.PREFILL:
        return padded + draft_len
    return padded


def call_op(layout, q, k_new, v_new, k_cache, v_cache, seqlens, draft_len, prompt_lens, backend, block_table=None):
    """The public op of ``layout`` (length and page checks on)."""
    if layout == Layout.DECODE:
        return tk.decode_attention(q, k_new, v_new, k_cache, v_cache, seqlens, draft_len, backend=backend,
                                   block_table=block_table)
    if layout == Layout.PREFILL:
        return tk.prefill_attention(q, k_new, v_new, k_cache, v_cache, seqlens, prompt_lens, draft_len,
                                    backend=backend, block_table=block_table)
    return tk.append_attention(q, k_new, v_new, k_cache, v_cache, seqlens, backend=backend, block_table=block_table)


def page_assignment(cache_lens, written, page_size, spare_pages, generator):
    """Shuffled pages: ``(block_table int32 [B, cols], num_pages)``.

    Sequence ``b`` owns the pages of rows ``[0, n_b + written)`` (distinct, random,
    from a pool with ``spare_pages`` nobody owns); its other columns hold -1 (no page),
    which a backend must never touch.
    """
    owned = [-(-(n + written) // page_size) for n in cache_lens]
    cols = max(owned) + 1  # one more column than anyone needs: never used, holds -1
    num_pages = sum(owned) + spare_pages
    order = torch.randperm(num_pages, generator=generator).tolist()
    table = torch.full((len(cache_lens), cols), -1, dtype=torch.int32)
    for b, count in enumerate(owned):
        table[b, :count] = torch.tensor(order[:count], dtype=torch.int32)
        order = order[count:]
    return table, num_pages


def to_pages(contiguous, table, num_pages, poison):
    """A pool ``[num_pages, page_size, ...]`` holding ``contiguous [B, cols*page_size, ...]`` through
    ``table``; pages nobody owns hold ``poison``."""
    page_size = contiguous.shape[1] // table.shape[1]
    pool = torch.full((num_pages, page_size, *contiguous.shape[2:]), poison, dtype=contiguous.dtype)
    for b in range(table.shape[0]):
        for col, page in enumerate(table[b].tolist()):
            if page >= 0:
                pool[page] = contiguous[b, col * page_size:(col + 1) * page_size]
    return pool


def from_pages(pool, table):
    """The contiguous view ``[B, cols*page_size, ...]`` of ``pool`` through ``table`` (no page: NaN rows)."""
    page_size = pool.shape[1]
    out = torch.full((table.shape[0], table.shape[1] * page_size, *pool.shape[2:]), float("nan"), dtype=pool.dtype)
    for b in range(table.shape[0]):
        for col, page in enumerate(table[b].tolist()):
            if page >= 0:
                out[b, col * page_size:(col + 1) * page_size] = pool[page]
    return out


def check_cached_call(backend: str, layout: Layout, cache_lens, heads, dtype=torch.float32, draft_len: int = 1,
                      padded: int = 1, prompt_lens=None, poison: str = "nan", page_size: Optional[int] = None,
                      head_dim: int = 16, seed: int = 0, device: str = "cpu", exact_twin: bool = False) -> None:
    """One cached call of ``backend`` on a cache whose unused rows hold ``poison``, against fp64 math.

    Checks the output by the tolerance rule and the write contract: rows ``[n_b, n_b + W)``
    hold the new K/V, every other row is unchanged (poison included). With ``page_size``
    the same call runs on a shuffled paged copy (plus spare pages nobody owns) and on the
    contiguous cache; both must meet the rule, the paged pool must read back as the
    contiguous cache after the call, and pages nobody owns stay untouched. Inputs are
    built on the CPU; ``device`` is where the op runs (results come back for the checks).
    ``exact_twin``: the paged output must also equal the contiguous call's bit for bit (a
    kernel whose split plan depends on sizes only, so both calls do the same arithmetic).
    """
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    batch = len(cache_lens)
    q_heads, kv_heads = heads
    num_rows = step_rows(layout, draft_len, padded)
    written = rows_written_to_cache(layout, num_rows, draft_len)
    max_len = max(cache_lens) + written + 3
    if page_size is not None:  # the contiguous twin gets the paged capacity: same split plan
        table, num_pages = page_assignment(cache_lens, written, page_size, spare_pages=3, generator=generator)
        max_len = table.shape[1] * page_size
    q, k_new, v_new = randn(batch, num_rows, q_heads, head_dim), *(randn(batch, num_rows, kv_heads, head_dim)
                                                                    for _ in range(2))
    seqlens = torch.tensor(cache_lens, dtype=torch.int32)
    k_cache, v_cache = randn(batch, max_len, kv_heads, head_dim), randn(batch, max_len, kv_heads, head_dim)
    unused = torch.arange(max_len)[None, :] >= seqlens[:, None].long()
    k_cache[unused], v_cache[unused] = POISONS[poison], -POISONS[poison]
    k_zeroed, v_zeroed = (torch.where(unused[..., None, None], 0.0, c) for c in (k_cache, v_cache))
    context = None if prompt_lens is None else torch.tensor(prompt_lens, dtype=torch.int32)

    clean_rows = layout_clean_rows(layout, num_rows, draft_len)
    allowed = reference.cached_mask(layout, seqlens, max_len, num_rows, clean_rows, draft_len, context)
    keys, values = torch.cat([k_zeroed, k_new], 1), torch.cat([v_zeroed, v_new], 1)
    hi, lo = (reference.masked_attention(q.to(d), keys.to(d), values.to(d), allowed, head_dim ** -0.5, dtype=d)[0]
              for d in (torch.float64, dtype))
    bound = attention_bounds(q, keys, values, allowed, head_dim ** -0.5, dtype)["out"]
    expected = []
    for cache, new in ((k_cache, k_new), (v_cache, v_new)):
        after = cache.clone()
        for b, n in enumerate(cache_lens):
            after[b, n:n + written] = new[b, :written]
        expected.append(after)

    def on(*tensors):
        return [None if t is None else t.to(device) for t in tensors]

    step, lengths = on(q, k_new, v_new), seqlens.to(device)
    if page_size is not None:
        pools = [to_pages(c, table, num_pages, POISONS[poison]) for c in (k_cache, v_cache)]
        pools_before = [p.clone() for p in pools]
        device_pools = on(*pools)
        out = paged_out = call_op(layout, *step, *device_pools, lengths, draft_len, *on(context), backend,
                                  block_table=table.to(device)).cpu()
        pools = [p.cpu() for p in device_pools]
        assert out.dtype == dtype and out.shape == q.shape
        assert_close_by_rule(out, hi, lo, bound, name=f"{backend} paged out")
        owned = sorted(p for p in table.flatten().tolist() if p >= 0)
        for name, pool, before, want in zip(("k", "v"), pools, pools_before, expected):
            got = from_pages(pool, table)
            for b, n in enumerate(cache_lens):  # rows of owned pages: exactly the contiguous result
                rows = int((table[b] >= 0).sum()) * page_size
                torch.testing.assert_close(got[b, :rows], want[b, :rows], rtol=0, atol=0, equal_nan=True,
                                           msg=f"{name} pool of sequence {b} != contiguous cache after the call")
            others = [p for p in range(num_pages) if p not in owned]
            torch.testing.assert_close(pool[others], before[others], rtol=0, atol=0, equal_nan=True,
                                       msg=f"{name} pool: a page nobody owns was written")
    device_caches = on(k_cache, v_cache)
    out = call_op(layout, *step, *device_caches, lengths, draft_len, *on(context), backend).cpu()
    k_cache, v_cache = (c.cpu() for c in device_caches)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close_by_rule(out, hi, lo, bound, name=f"{backend} out")
    for name, cache, want in (("k_cache", k_cache, expected[0]), ("v_cache", v_cache, expected[1])):
        torch.testing.assert_close(cache, want, rtol=0, atol=0, equal_nan=True,
                                   msg=f"{name}: rows [n, n+W) must hold the new rows, all others unchanged")
    assert lengths.tolist() == list(cache_lens)  # the ops never commit
    if page_size is not None and exact_twin:
        assert torch.equal(paged_out, out), f"{backend}: paged output differs from the contiguous call's"
