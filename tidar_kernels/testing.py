"""Tolerance rule shared by every kernel test (flash-attention's rule).

A kernel computing in low precision (fp16/bf16 inputs, fp32 accumulation) cannot
match an exact reference bit for bit, and a hand-tuned ``atol`` either hides bugs
or flakes. Instead the tolerance is derived from the data: compute the same math

* ``reference_hi``: in high precision (fp64, or fp32 for bf16/fp16 kernels), the
  ground truth, and
* ``reference_lo``: by plain PyTorch in the kernel's own dtype, the error any
  honest low-precision implementation makes,

then require ``max|actual - hi| <= factor * max|lo - hi| + floor``. ``floor`` covers
the cases where PyTorch's error happens to be (near) zero, e.g. all-equal rows or
exact zeros: by default twice the rounding error of the kernel's dtype at the
reference's magnitude (``x + 0.3 - 0.3`` evaluated in that dtype, as in
flash-attention's tests).
"""
from __future__ import annotations

from typing import Optional

import torch


def rounding_floor(reference_hi: torch.Tensor, dtype: torch.dtype) -> float:
    """Twice the largest rounding error of ``dtype`` on values like ``reference_hi`` (plus 0.3)."""
    x = reference_hi.detach().to(dtype)
    return 2.0 * ((x + 0.3) - 0.3 - x).abs().max().item() if x.numel() else 0.0


def rule_error(actual: torch.Tensor, reference_hi: torch.Tensor, reference_lo: torch.Tensor,
               factor: float = 2.0, floor: Optional[float] = None) -> tuple[float, float]:
    """``(kernel error, allowed error)`` of the rule, both as max-abs differences to ``reference_hi``."""
    if actual.shape != reference_hi.shape or reference_lo.shape != reference_hi.shape:
        raise ValueError(f"actual, reference_hi and reference_lo must have one shape, got {tuple(actual.shape)}, "
                         f"{tuple(reference_hi.shape)} and {tuple(reference_lo.shape)}")
    hi = reference_hi.detach().double()
    if actual.numel() == 0:
        return 0.0, 0.0
    kernel_error = (actual.detach().double() - hi).abs().max().item()
    torch_error = (reference_lo.detach().double() - hi).abs().max().item()
    if floor is None:
        floor = rounding_floor(reference_hi, actual.dtype)
    return kernel_error, factor * torch_error + floor


def assert_close_by_rule(actual: torch.Tensor, reference_hi: torch.Tensor, reference_lo: torch.Tensor,
                         factor: float = 2.0, floor: Optional[float] = None, name: str = "output") -> None:
    """Assert the kernel's error is at most ``factor`` x PyTorch's low-precision error (+ ``floor``).

    ``actual``: the kernel's result (its dtype is "the kernel's dtype");
    ``reference_hi``: the same math in fp64/fp32; ``reference_lo``: the same math by
    PyTorch in the kernel's dtype. NaN anywhere in ``actual`` fails.
    """
    if torch.isnan(actual).any():
        raise AssertionError(f"{name}: kernel result contains NaN ({int(torch.isnan(actual).sum())} elements)")
    kernel_error, allowed = rule_error(actual, reference_hi, reference_lo, factor, floor)
    if not kernel_error <= allowed:
        torch_error = (reference_lo.detach().double() - reference_hi.detach().double()).abs().max().item()
        where = (actual.detach().double() - reference_hi.detach().double()).abs().argmax().item()
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(where), actual.shape))
        raise AssertionError(
            f"{name}: max |kernel - reference| = {kernel_error:.3e} at index {index} exceeds the allowed "
            f"{allowed:.3e} = {factor} x PyTorch's {reference_lo.dtype} error {torch_error:.3e} + floor "
            f"(kernel dtype {actual.dtype}, shape {tuple(actual.shape)})")
