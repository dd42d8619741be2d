"""Static, preallocated KV cache whose commit and rollback are a device-side length update.

Layout as flash-attn's ``k_cache``: one ``[batch, max_len, kv_heads, head_dim]``
tensor per layer for K and one for V, plus the committed lengths ``seqlens``
(int32 ``[batch]``, on the device). Rows ``[0, n_b)`` of sequence ``b`` are
committed; rows past ``n_b`` are scratch: the tidar ops write a step's K/V there
and :func:`tidar_kernels.accept_drafts` (or :meth:`KVCache.commit`) keeps a prefix
of them by advancing ``n_b``. Rejected rows are never erased, only overwritten by
the next step, so a rollback costs nothing and needs no host synchronisation.

The ops do not check lengths inside the decode loop (``check_lengths=False``):
:mod:`tidar_kernels.generate` sizes the cache for its worst case once up front
(a ``max_len`` that is too small is a clear error before anything is written).
Code that drives the cache step by step itself calls :meth:`KVCache.check_room`
(or leaves ``check_lengths`` on) before each write.
"""
from __future__ import annotations

import torch


class KVCache:
    """Per-layer K and V caches ``[batch, max_len, kv_heads, head_dim]`` and the committed ``seqlens``."""

    def __init__(self, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None):
        for name, value in (("n_layers", n_layers), ("batch", batch), ("max_len", max_len),
                            ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
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
    def batch(self) -> int:
        return self.seqlens.shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

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
