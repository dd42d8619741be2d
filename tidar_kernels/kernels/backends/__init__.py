"""Backend registry and selection.

A backend implements some of the package's three kernel ops as registered torch
ops (namespace ``tidar``) and says which calls it supports. The public functions
in :mod:`tidar_kernels.kernels.ops` validate their inputs, then call :func:`select` once
per call: the ``backend=`` argument (strict: an unsupported call is an error) >
the ``TIDAR_BACKEND`` environment variable (a preference: falls back when that
backend does not support the call) > the first supporting backend in
:data:`PREFERENCE` ("cuda", "triton", "cpu", "reference") among those picked
automatically on the call's device (:attr:`Backend.automatic_on`). On CPU
tensors that is the CPU decode path for the cached op and the reference for the
rest (the Triton interpreter must be named); the CUDA backend is not picked
automatically until it has been validated and timed on a GPU.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

PREFERENCE = ("cuda", "triton", "cpu", "reference", "cuda_emulated")  # cuda_emulated: only when named
ENV_VAR = "TIDAR_BACKEND"

# op names a backend may implement
ATTENTION = "attention"  # cache-free training / causal attention, differentiable
CACHED_ATTENTION = "cached_attention"  # decode / prefill / causal-with-cache, writes the cache
ACCEPT_DRAFTS = "accept_drafts"  # greedy acceptance + in-place commit of cache_seqlens


class Call(NamedTuple):
    """What a backend needs to know to say whether it supports a call."""

    op: str
    device: torch.device
    dtype: torch.dtype
    head_dim: int
    layout: int
    paged: bool = False  # cached ops: the caches are page pools addressed through a block_table


@dataclass(frozen=True)
class Backend:
    """One implementation of the ops. Missing ops are ``None``."""

    name: str
    supports: Callable[[Call], bool]
    attention: Optional[Callable] = None
    cached_attention: Optional[Callable] = None
    accept_drafts: Optional[Callable] = None
    # Device types on which the backend is picked without being named. A backend
    # named by the argument or TIDAR_BACKEND is used wherever it supports the call.
    automatic_on: tuple[str, ...] = ("cuda",)


def register_attention_autograd(forward_op, backward_op) -> None:
    """Autograd of a backend's cache-free attention op ``(q, k, v, layout, block_size, scale) -> (out, lse)``.

    Saves q, k, v, out and lse; the backward op recomputes the probabilities from
    ``lse`` (flash-attention style) and returns ``(dq, dk, dv)``. The ``lse`` output
    carries no gradient: callers only use ``out``.
    """

    def setup_context(ctx, inputs, output):
        q, k, v, layout, block_size, scale = inputs
        ctx.save_for_backward(q, k, v, *output)
        ctx.layout, ctx.block_size, ctx.scale = layout, block_size, scale

    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward_op(dout.contiguous(), q, k, v, out, lse, ctx.layout, ctx.block_size, ctx.scale)
        return dq, dk, dv, None, None, None

    forward_op.register_autograd(backward, setup_context=setup_context)


def register_cached_attention(name: str, impl: Callable, device_types: Optional[str] = None):
    """Register ``impl`` as the torch op ``tidar::cached_attention_<name>``: the cached op's one
    signature (it writes ``k_cache`` and ``v_cache`` in place) and its fake (output shaped like ``q``).
    Returns the op."""

    def cached_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, cache_seqlens: torch.Tensor, context_lens: Optional[torch.Tensor],
                         layout: int, block_size: int, scale: float,
                         block_table: Optional[torch.Tensor] = None) -> torch.Tensor:
        return impl(q, k_new, v_new, k_cache, v_cache, cache_seqlens, context_lens, layout, block_size, scale,
                    block_table)

    op = torch.library.custom_op(f"tidar::cached_attention_{name}", cached_attention,
                                 mutates_args=("k_cache", "v_cache"), device_types=device_types)
    op.register_fake(lambda q, *args, **kwargs: torch.empty_like(q))
    return op


_MODULES = {"reference": ".reference_ops", "cpu": ".cpu_ops", "triton": ".triton_ops", "cuda": ".cuda_ops",
            "cuda_emulated": ".cuda_emulated_ops"}


def _import(name: str) -> Optional[Backend]:
    try:
        return importlib.import_module(_MODULES[name], __name__).BACKEND
    except ImportError:  # triton missing, or the CUDA extension was not built
        return None


_LOADED: dict[str, Optional[Backend]] = {}


def load(name: str) -> Optional[Backend]:
    """The backend called ``name``, or None when it cannot load here (no triton, no extension)."""
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {sorted(_MODULES)} or None, got {name!r}")
    return _LOADED[name]


def available() -> list[str]:
    """Names of the backends that load on this machine, in preference order."""
    return [name for name in PREFERENCE if load(name) is not None]


def _supports(backend: Optional[Backend], call: Call) -> bool:
    return backend is not None and getattr(backend, call.op) is not None and backend.supports(call)


def select(call: Call, requested: Optional[str]) -> Backend:
    """Pick the backend for ``call`` (see the module docstring for the order)."""
    if requested is not None:
        backend = load(requested)
        if not _supports(backend, call):
            why = "is not available on this machine" if backend is None else "does not support this call"
            raise ValueError(f"backend={requested!r} {why}: {call.op} on {call.device.type} with dtype "
                             f"{call.dtype}, head_dim {call.head_dim}, layout {call.layout}, paged {call.paged}; "
                             f"available backends: {available()}")
        return backend
    preferred = os.environ.get(ENV_VAR) or None
    if preferred is not None and preferred not in _MODULES:
        raise ValueError(f"{ENV_VAR} must be one of {sorted(_MODULES)}, got {preferred!r}")
    if preferred is not None and _supports(load(preferred), call):
        return load(preferred)
    for name in PREFERENCE:
        backend = load(name)
        if backend is not None and call.device.type in backend.automatic_on and _supports(backend, call):
            return backend
    raise RuntimeError(f"no backend supports {call}")  # unreachable: the reference supports all


# Discover once at import, so dispatch inside torch.compile or a CUDA graph
# capture is a dictionary lookup.
_LOADED.update({name: _import(name) for name in PREFERENCE})
