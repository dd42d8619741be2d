"""Static, preallocated KV cache whose commit and rollback are a device-side length update.

Layout as flash-attn's ``k_cache``: one ``[batch, max_len, kv_heads, head_dim]``
tensor per layer for K and one for V, plus the committed lengths ``seqlens``
(int32 ``[batch]``, on the device). Rows ``[0, n_b)`` of sequence ``b`` are
committed; rows past ``n_b`` are scratch: the tidar ops write a step's K/V there
and :func:`tidar_kernels.accept_drafts` (or :meth:`KVCache.commit`) keeps a prefix
of them by advancing ``n_b``. Rejected rows are never erased, only overwritten by
the next step, so a rollback costs nothing and needs no host synchronisation.

The ops do not check lengths inside the decode loop (``check_lengths=False``):
:mod:`tidar_kernels.model.generate` sizes the cache for its worst case once up front
(a ``max_len`` that is too small is a clear error before anything is written).
Code that drives the cache step by step itself calls :meth:`KVCache.check_room`
(or leaves ``check_lengths`` on) before each write.

:class:`PagedKVCache` keeps the same committed lengths but stores K/V in page
pools addressed through a block table (flash-attn's ``flash_attn_with_kvcache``
convention, what serving engines hand their kernels): pages are taken from the
pool between steps (:meth:`PagedKVCache.reserve`, on the host) and given back
when a sequence finishes (:meth:`PagedKVCache.release`), so a step itself never
allocates or synchronises.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..kernels.validation import MAX_PAGE_SIZE, check_positive


def _check_sizes(**sizes) -> None:
    for name, value in sizes.items():
        check_positive(name, value)


class _Lengths:
    """The committed lengths ``seqlens`` (int32 ``[batch]``, on the device) shared by both caches."""

    seqlens: torch.Tensor
    max_len: int
    # Contiguous caches have no block table; the ops take ``block_table=cache.block_table``.
    block_table: Optional[torch.Tensor] = None

    @property
    def batch(self) -> int:
        return self.seqlens.shape[0]

    def check_room(self, rows: int) -> None:
        """Raise ValueError unless every sequence can take ``rows`` more rows (reads the lengths: syncs)."""
        lengths = self.seqlens.cpu()
        if bool((lengths + rows > self.max_len).any()):
            raise ValueError(f"KV cache overflow: cache lengths {lengths.tolist()} + {rows} new rows must be "
                             f"<= max_len={self.max_len}")

    def commit(self, counts: torch.Tensor) -> None:
        """Keep the first ``counts[b]`` rows written past ``n_b`` (in place, on the device, no sync).

        ``counts`` is an integer tensor ``[batch]``; its values are not checked (that would sync).
        """
        if not isinstance(counts, torch.Tensor) or counts.is_floating_point() or tuple(counts.shape) != (self.batch,):
            got = f"{counts.dtype} {tuple(counts.shape)}" if isinstance(counts, torch.Tensor) else type(counts).__name__
            raise ValueError(f"counts must be an integer tensor [batch={self.batch}], got {got}")
        self.seqlens.add_(counts.to(torch.int32))

    def reset(self, lengths=None) -> None:
        """Set the committed lengths (default 0) without touching the rows.

        ``lengths``: a tensor ``[batch]`` (copied on the device, values unchecked: no
        sync) or host integers ``[batch]`` (checked to lie in ``[0, max_len]``).
        """
        if lengths is None:
            self.seqlens.zero_()
            return
        host = not isinstance(lengths, torch.Tensor)
        lengths = torch.as_tensor(lengths)
        if lengths.is_floating_point() or tuple(lengths.shape) != (self.batch,):
            raise ValueError(f"lengths must be integers [batch={self.batch}], got {lengths.dtype} "
                             f"{tuple(lengths.shape)}")
        if host and bool(((lengths < 0) | (lengths > self.max_len)).any()):
            raise ValueError(f"lengths must lie in [0, max_len={self.max_len}], got {lengths.tolist()}")
        self.seqlens.copy_(lengths.to(torch.int32))


class KVCache(_Lengths):
    """Per-layer K and V caches ``[batch, max_len, kv_heads, head_dim]`` and the committed ``seqlens``."""

    def __init__(self, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None):
        _check_sizes(n_layers=n_layers, batch=batch, max_len=max_len, n_kv_heads=n_kv_heads, head_dim=head_dim)
        shape = (batch, max_len, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> "KVCache":
        """A cache shaped for ``model`` (a :class:`tidar_kernels.model.Transformer`), in its dtype and device."""
        c = model.config
        return cls(c.n_layers, batch, max_len, c.n_kv_heads, c.head_dim, dtype=model.dtype, device=model.device)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]


class PagedKVCache(_Lengths):
    """Per-layer page pools ``[num_pages, page_size, kv_heads, head_dim]``, one ``block_table`` and ``seqlens``.

    Row ``t`` of sequence ``b`` lives in page ``block_table[b, t // page_size]``, slot
    ``t % page_size`` (every layer uses the same table). ``block_table`` is int32
    ``[batch, ceil(max_len / page_size)]`` on the device; entries of pages not yet
    reserved hold :data:`NO_PAGE` (-1), which the ops reject if a call would touch them.
    The allocator lives on the host: :meth:`reserve` before a step (or a run of steps)
    gives each sequence the pages its rows will need, :meth:`release` gives a
    finished sequence's pages back to the pool. Commit and rollback only move
    ``seqlens``, as in :class:`KVCache`.
    """

    NO_PAGE = -1

    def __init__(self, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int, page_size: int,
                 num_pages: Optional[int] = None, dtype: torch.dtype = torch.float32, device=None):
        _check_sizes(n_layers=n_layers, batch=batch, max_len=max_len, n_kv_heads=n_kv_heads, head_dim=head_dim,
                     page_size=page_size)
        if page_size > MAX_PAGE_SIZE:  # what the paged ops accept
            raise ValueError(f"page_size must be <= {MAX_PAGE_SIZE}, got {page_size}")
        pages_per_seq = -(-max_len // page_size)
        if num_pages is None:  # enough for every sequence at full length: never runs short
            num_pages = batch * pages_per_seq
        _check_sizes(num_pages=num_pages)
        shape = (num_pages, page_size, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.block_table = torch.full((batch, pages_per_seq), self.NO_PAGE, dtype=torch.int32, device=device)
        self._table = torch.full((batch, pages_per_seq), self.NO_PAGE, dtype=torch.int32)  # host copy
        self._owned = [0] * batch  # pages held by each sequence: table columns [0, owned)
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: the lowest page is handed out first

    @classmethod
    def for_model(cls, model, batch: int, max_len: int, page_size: int,
                  num_pages: Optional[int] = None) -> "PagedKVCache":
        """A paged cache shaped for ``model`` (a :class:`tidar_kernels.model.Transformer`), in its dtype and device."""
        c = model.config
        return cls(c.n_layers, batch, max_len, c.n_kv_heads, c.head_dim, page_size, num_pages, dtype=model.dtype,
                   device=model.device)

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1]

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        """Rows each sequence can address: ``max_pages_per_seq * page_size``."""
        return self.block_table.shape[1] * self.page_size

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def check_room(self, rows: int) -> None:
        """Raise ValueError unless every sequence can take ``rows`` more rows and already holds the
        pages for them (:meth:`reserve`): an op told ``check_lengths=False`` would not notice (syncs)."""
        super().check_room(rows)
        needed = (self.seqlens.cpu() + rows).tolist()
        short = [b for b, n in enumerate(needed) if n > self._owned[b] * self.page_size]
        if short:
            raise ValueError(f"KV pages missing: sequences {short} need {[needed[b] for b in short]} rows but hold "
                             f"{[self._owned[b] for b in short]} pages of {self.page_size} rows; reserve them first")

    def pages_of(self, sequence: int) -> list[int]:
        """The pages sequence ``sequence`` holds, in row order."""
        return self._table[sequence, :self._owned[sequence]].tolist()

    def reserve(self, rows: Sequence[int]) -> None:
        """Give each sequence ``b`` the pages of its rows ``[0, rows[b])`` (host integers ``[batch]``).

        Takes missing pages from the pool and updates the device table with one copy;
        pages already held are kept. Raises before changing anything when a sequence
        would need more than ``max_len`` rows or the pool has too few free pages.
        """
        rows = [int(r) for r in torch.as_tensor(rows).reshape(-1).tolist()]
        if len(rows) != self.batch or any(r < 0 or r > self.max_len for r in rows):
            raise ValueError(f"rows must be {self.batch} integers in [0, max_len={self.max_len}], got {rows}")
        wanted = [max(0, -(-r // self.page_size) - owned) for r, owned in zip(rows, self._owned)]
        if sum(wanted) > len(self._free):
            raise RuntimeError(f"KV page pool exhausted: {sum(wanted)} more pages of {self.page_size} rows needed "
                               f"for rows {rows}, {len(self._free)} of {self.num_pages} free; give finished "
                               f"sequences' pages back (release) or make a larger pool (num_pages)")
        if not any(wanted):
            return
        for b, count in enumerate(wanted):
            for _ in range(count):
                self._table[b, self._owned[b]] = self._free.pop()
                self._owned[b] += 1
        self.block_table.copy_(self._table)

    def release(self, sequences: Sequence[int], keep_rows: int = 0) -> None:
        """Give back the pages of ``sequences`` past those holding rows ``[0, keep_rows)``.

        The caller must no longer use rows past ``keep_rows`` of those sequences (e.g.
        :meth:`reset` their lengths to 0 when they finished); the freed table entries
        become :data:`NO_PAGE`, so a call touching them is rejected by the ops.
        """
        sequences = [int(b) for b in sequences]
        if any(not 0 <= b < self.batch for b in sequences) or keep_rows < 0:
            raise ValueError(f"sequences must lie in [0, batch={self.batch}) and keep_rows >= 0, got {sequences} "
                             f"and {keep_rows}")
        keep = -(-int(keep_rows) // self.page_size)
        changed = False
        for b in sequences:
            while self._owned[b] > keep:
                self._owned[b] -= 1
                self._free.append(int(self._table[b, self._owned[b]]))
                self._table[b, self._owned[b]] = self.NO_PAGE
                changed = True
        if changed:
            self.block_table.copy_(self._table)
