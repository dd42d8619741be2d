"""Prepacked oneDNN linears for decoding on the CPU.

At decode sizes (a few to a hundred rows against a few-hundred-KB-to-100-MB weight) the
plain ``F.linear`` of an fp32 CPU tensor goes through BLAS's small-M GEMM, which reads the
weight at a fraction of the machine's bandwidth: on a 2-core AMD EPYC a 1536 x 576 weight
takes 57 us for one row and 142 us for two. oneDNN's linear over a weight reordered once
into its blocked layout (``torch.ops.mkldnn._reorder_linear_weight``) takes 45-90 us for
1-6 rows and is 2-3x faster up to 72 rows, the LM head included (bench/cpu_decode.py).

The decode loops (:mod:`tidar_kernels.model.generate`) switch it on for their forwards
(:func:`packed_linears`); every other forward stays on ``F.linear``, bitwise as before.
Inside the switch a call packs when it is an fp32 CPU call outside autograd and outside
``torch.compile`` on a weight with a version counter (not an inference tensor), else it
falls back to ``F.linear``. Packed weights are cached per weight
tensor and version (an in-place update repacks), so they cost one more copy of the packed
weights while the model lives (:func:`release` drops them). ``TIDAR_CPU_LINEAR=plain``
keeps the loops on ``F.linear`` too.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import weakref
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

CPU_LINEAR_ENV = "TIDAR_CPU_LINEAR"
CPU_LINEAR_CHOICES = ("packed", "plain")

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("tidar_packed_cpu_linears", default=False)
# id(weight) -> (weak reference to the weight, its version when packed, the packed weight); an entry
# leaves with its weight (weakref callback). Not a WeakKeyDictionary: tensors compare elementwise.
_PACKED: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def available() -> bool:
    """Whether this torch build has oneDNN and its prepacked linear ops."""
    mkldnn = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_linear_pointwise")
            and hasattr(mkldnn, "_reorder_linear_weight"))


def requested() -> bool:
    """``TIDAR_CPU_LINEAR``: ``packed`` (default) or ``plain``; anything else is an error."""
    value = os.environ.get(CPU_LINEAR_ENV, "packed")
    if value not in CPU_LINEAR_CHOICES:
        raise ValueError(f"{CPU_LINEAR_ENV} must be one of {CPU_LINEAR_CHOICES}, got {value!r}")
    return value == "packed"


@contextlib.contextmanager
def packed_linears(enabled: bool = True) -> Iterator[None]:
    """Within the block, :func:`linear` packs the calls it can (``enabled`` and :func:`available`)."""
    token = _ENABLED.set(bool(enabled) and available())
    try:
        yield
    finally:
        _ENABLED.reset(token)


def packs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` takes the packed path for this call."""
    return (_ENABLED.get() and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.device.type == "cpu" and weight.dim() == 2
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.compiler.is_compiling() and _version(weight) is not None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the packed weight where :func:`packs` says so."""
    return packed_linear(x, weight, bias) if packs(x, weight) else F.linear(x, weight, bias)


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear`` on the packed weight, for a call :func:`packs` has accepted."""
    return torch.ops.mkldnn._linear_pointwise(x, _packed(weight), bias, "none", [None], "")


def release() -> None:
    """Drop every cached packed weight."""
    _PACKED.clear()


def _packed(weight: torch.Tensor) -> torch.Tensor:
    version, key = _version(weight), id(weight)
    entry = _PACKED.get(key)
    if entry is None or entry[0]() is not weight or entry[1] != version:
        # The batch-size hint only tunes the blocking: the packed weight serves any row count.
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
        entry = (weakref.ref(weight, lambda _, key=key: _PACKED.pop(key, None)), version, packed)
        _PACKED[key] = entry
    return entry[2]


def _version(weight: torch.Tensor) -> Optional[int]:
    """The tensor's version counter (bumped by in-place updates); None for an inference tensor, which
    has none (its calls stay on ``F.linear``: a stale packed copy could not be detected)."""
    try:
        return weight._version
    except RuntimeError:
        return None
