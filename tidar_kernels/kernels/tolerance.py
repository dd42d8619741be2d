"""The one tolerance rule of every kernel test, and the error bounds it is given.

The rule
--------
A kernel's result ``actual`` is compared with ``reference_hi``, the same math in
fp64 from the same (already rounded) inputs, and with ``reference_lo``, the same math
done by plain PyTorch in the kernel's dtype. Every element must satisfy::

    |actual - hi| <= factor * max|lo - hi| + bound          (factor = 2)

* ``factor * max|lo - hi|`` is flash-attention's rule: an honest kernel in fp16/bf16
  makes about the error PyTorch makes in that dtype. It is measured, so it varies
  with the CPU, the BLAS and the thread count, and in fp32 it is a few ulps on a
  small tensor: not a yardstick there (an AMD EPYC CPU failed it in fp32).
* ``bound`` is the standard worst-case forward-error bound of the computation
  (Higham, *Accuracy and Stability of Numerical Algorithms*, ch. 3): a sum of
  length ``n`` accumulated in unit roundoff ``u`` in any order, blocking, FMA use or
  thread split errs by at most ``gamma_n * sum|terms|`` with
  ``gamma_n = n u / (1 - n u)``. It depends only on the data, the dtype and the
  lengths, never on the machine: that is what makes the rule the same on every
  vendor, BLAS and thread count. It stays far below the size of a real bug (a
  missing key, a wrong scale, a missing gradient term change results by ~1e-3..1,
  the bound of fp32 math at test sizes is ~1e-6..1e-3); python_tests/test_tolerance_rule.py
  checks that wrong results still fail by a wide margin.

The precision model of a kernel (every kernel of this package follows it):
inputs and outputs in the kernel's dtype; products accumulated in fp32 (fp64 for
fp64 inputs), unit roundoff ``u``; the kernel may round an intermediate matrix
(softmax probabilities ``P``, ``dS``) to its own dtype before a matmul (tensor
cores), may store split partial outputs to its dtype before merging them
(flash-decoding), and rounds its output to its dtype, unit roundoff ``u_d`` (= ``u``
in fp32).

Bounds
------
* :func:`rounding_bound`: ``u_d |hi|``, the output's own rounding. The default:
  right for kernels that do no arithmetic beyond it (copies, selections).
* :func:`attention_bounds`: masked softmax attention, out and the three gradients,
  first-order in ``u``. Per query row (``s`` the scale, ``D`` the head dim, ``K``
  the row's key count, ``Sa_j = s |q|.|k_j|`` the score computed on absolute
  values, ``m = max_j Sa_j``):

  - a score errs by ``gamma_D Sa_j``; with the rounding of the exponent argument
    (``|S_j - lse| <= Sa_j + m + log K``), of ``exp`` and of the log-sum-exp
    (a sum of ``K`` terms), a probability has relative error
    ``rho_j <= gamma_{D+5} (Sa_j + m + log K + 1) + gamma_{K+1}``;
  - ``out = P V``: ``|d out| <= sum_j P_j rho_j (|v_j| + |out|) + gamma_K |P||V|``
    ``+ u_d (2 |P||V| + |out|)`` (``P`` and ``out`` rounded to the dtype, and split
    partials ``o_s = P_s V / l_s``: each errs by ``u_d |P_s||V| / l_s``, and the merge
    weights them by ``l_s / l`` summing to 1, so one more ``u_d |P||V|`` in all);
  - backward from the kernel's own ``out`` (flash-attention's algorithm, any honest
    variant): ``delta = dO.out`` errs by ``gamma_D |dO|.|out| + |dO|.|d out|``,
    ``dP = dO V^T`` by ``gamma_D |dO||V|^T``, so ``dS = P (dP - delta)`` by
    ``E_dS = P ((rho + gamma_2) |dP - delta| + gamma_D |dO||V|^T + |d delta|)``;
    ``dQ = s dS K``: ``s E_dS |K| + (gamma_{K+1} + u_d) s |dS||K| + u_d |dQ|``;
    ``dK = s dS^T Q`` summed over the GQA group (``G T_q`` terms):
    ``s E_dS^T |Q| + (gamma_{G T_q + 1} + u_d) s |dS|^T |Q| + u_d |dK|``;
    ``dV = P^T dO``: ``(P rho)^T |dO| + (gamma_{G T_q} + u_d) P^T |dO| + u_d |dV|``.

  The magnitudes are computed in fp64 from the inputs; second-order terms (``u^2``)
  are left out.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

Bound = Union[torch.Tensor, float]


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u = eps / 2``: the largest relative error of rounding one real number to ``dtype``."""
    return torch.finfo(dtype).eps / 2


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What kernels accumulate in for inputs of ``dtype``: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gamma(n, dtype: torch.dtype):
    """``gamma_n = n u / (1 - n u)`` of the accumulation precision of ``dtype`` (``n`` int or tensor)."""
    u = unit_roundoff(accumulation_dtype(dtype))
    if (torch.as_tensor(n) * u >= 1).any():
        raise ValueError(f"reduction length n must be < 1/u = {1 / u:.3g} for a bound to exist, got max {n}")
    return n * u / (1 - n * u)


def rounding_bound(reference_hi: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``u_d |hi|``: the error of rounding the exact result to ``dtype``, elementwise."""
    return unit_roundoff(dtype) * reference_hi.detach().double().abs()


def attention_bounds(q, k, v, allowed, scale: float, dtype: Optional[torch.dtype] = None,
                     dout=None) -> dict[str, torch.Tensor]:
    """Forward-error bounds (module docstring) of masked attention done by a kernel in ``dtype``.

    ``q [B, Tq, Hq, D]``, ``k``/``v [B, Tk, Hkv, D]`` (GQA: query head ``h`` uses KV head
    ``h // (Hq / Hkv)``), ``allowed`` a bool mask broadcastable to ``[B, Hq, Tq, Tk]``.
    Returns elementwise bounds shaped like the results: ``"out"``, and with ``dout``
    also ``"dq"``, ``"dk"``, ``"dv"`` (``dk``/``dv`` per KV head; the backward is given
    the kernel's own ``out``, with the error bounded by ``"out"``). ``dtype`` defaults
    to ``q.dtype``.
    """
    dtype = dtype or q.dtype
    u_d = unit_roundoff(dtype)
    batch, rows, q_heads, head_dim = q.shape
    kv_heads, group = k.shape[2], q.shape[2] // k.shape[2]
    qf, kf, vf = (t.detach().double() for t in (q, k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)))
    allowed = allowed.to(q.device).expand(batch, q_heads, rows, kf.shape[1])

    # In place where possible: these are [B, Hq, Tq, Tk] fp64 tensors (GPU tests at model sizes).
    masked_out = ~allowed
    probs = torch.einsum("bqhd,bkhd->bhqk", qf, kf).mul_(scale).masked_fill_(masked_out, float("-inf"))
    lse = torch.logsumexp(probs, -1, keepdim=True)
    probs = probs.sub_(lse).exp_().nan_to_num_(0.0)  # a row seeing no key: no probability, no error
    keys_seen = allowed.sum(-1, keepdim=True).clamp(min=1).double()  # K per row, [B, Hq, Tq, 1]
    rho = torch.einsum("bqhd,bkhd->bhqk", qf.abs(), kf.abs()).mul_(abs(scale)).masked_fill_(masked_out, 0.0)  # Sa
    del masked_out
    rho.add_(rho.amax(-1, keepdim=True) + keys_seen.log() + 1)  # Sa_j + m + log K + 1
    rho.mul_(gamma(head_dim + 5, dtype)).add_(gamma(keys_seen + 1, dtype))  # relative error of P

    def rows_first(x):  # [B, Hq, Tq, 1|D] -> [B, Tq, Hq, 1|D]
        return x.transpose(1, 2)

    out = torch.einsum("bhqk,bkhd->bqhd", probs, vf)
    abs_pv = torch.einsum("bhqk,bkhd->bqhd", probs, vf.abs())
    p_rho = probs * rho
    bound_out = (torch.einsum("bhqk,bkhd->bqhd", p_rho, vf.abs()) + rows_first(p_rho.sum(-1, keepdim=True)) * out.abs()
                 + rows_first(gamma(keys_seen, dtype)) * abs_pv + u_d * (2 * abs_pv + out.abs()))
    bounds = {"out": bound_out}
    if dout is None:
        return bounds

    dof = dout.detach().double()
    delta = (dof * out).sum(-1, keepdim=True)  # [B, Tq, Hq, 1]
    delta_error = gamma(head_dim, dtype) * (dof.abs() * out.abs()).sum(-1, keepdim=True) + \
        (dof.abs() * bound_out).sum(-1, keepdim=True)
    dscores = torch.einsum("bqhd,bkhd->bhqk", dof, vf).sub_(rows_first(delta))  # dP - delta, then dS
    dscores_error = torch.einsum("bqhd,bkhd->bhqk", dof.abs(), vf.abs()).mul_(gamma(head_dim, dtype))
    dscores_error.add_(rows_first(delta_error)).addcmul_(rho.add_(gamma(2, dtype)), dscores.abs()).mul_(probs)
    del rho
    dscores.mul_(probs)

    def per_kv_head(x):  # [B, Tk, Hq, D] -> [B, Tk, Hkv, D]: the GQA group sum (of magnitudes)
        return x.reshape(batch, x.shape[1], kv_heads, group, head_dim).sum(3)

    s = abs(scale)
    abs_ds_k = s * torch.einsum("bhqk,bkhd->bqhd", dscores.abs(), kf.abs())
    abs_ds_q = per_kv_head(s * torch.einsum("bhqk,bqhd->bkhd", dscores.abs(), qf.abs()))
    abs_p_do = per_kv_head(torch.einsum("bhqk,bqhd->bkhd", probs, dof.abs()))
    dq = scale * torch.einsum("bhqk,bkhd->bqhd", dscores, kf)
    dk = per_kv_head(scale * torch.einsum("bhqk,bqhd->bkhd", dscores, qf))
    dv = per_kv_head(torch.einsum("bhqk,bqhd->bkhd", probs, dof))
    column_terms = group * rows  # dK, dV: a sum over every query row of the KV head's group
    bounds["dq"] = (s * torch.einsum("bhqk,bkhd->bqhd", dscores_error, kf.abs())
                    + (rows_first(gamma(keys_seen + 1, dtype)) + u_d) * abs_ds_k + u_d * dq.abs())
    bounds["dk"] = (per_kv_head(s * torch.einsum("bhqk,bqhd->bkhd", dscores_error, qf.abs()))
                    + (gamma(column_terms + 1, dtype) + u_d) * abs_ds_q + u_d * dk.abs())
    bounds["dv"] = (per_kv_head(torch.einsum("bhqk,bqhd->bkhd", p_rho, dof.abs()))
                    + (gamma(column_terms, dtype) + u_d) * abs_p_do + u_d * dv.abs())
    return bounds


def _check_shapes(actual, reference_hi, reference_lo):
    if actual.shape != reference_hi.shape or reference_lo.shape != reference_hi.shape:
        raise ValueError(f"actual, reference_hi and reference_lo must have one shape, got {tuple(actual.shape)}, "
                         f"{tuple(reference_hi.shape)} and {tuple(reference_lo.shape)}")


def _allowed(actual, reference_hi, reference_lo, bound: Optional[Bound], factor: float):
    """``(|actual - hi|, allowed, PyTorch's error)``: elementwise tensors and the measured max."""
    hi = reference_hi.detach().double()
    error = (actual.detach().double() - hi).abs()
    torch_error = (reference_lo.detach().double() - hi).abs().max().item() if hi.numel() else 0.0
    if bound is None:
        bound = rounding_bound(reference_hi, actual.dtype)
    bound = torch.as_tensor(bound, dtype=torch.float64, device=error.device)
    if bound.lt(0).any() or bound.isnan().any():
        raise ValueError("bound must be >= 0 and not NaN everywhere")
    return error, factor * torch_error + bound.expand_as(error), torch_error


def rule_error(actual: torch.Tensor, reference_hi: torch.Tensor, reference_lo: torch.Tensor,
               bound: Optional[Bound] = None, factor: float = 2.0) -> tuple[float, float]:
    """``(error, allowed)`` at the element where ``error / allowed`` is largest (the rule holds iff error <= allowed).

    NaN in ``actual`` gives ``error = inf``. ``bound``: the computation's forward-error
    bound, elementwise (tensor broadcastable to ``actual``) or one number; default
    :func:`rounding_bound`.
    """
    _check_shapes(actual, reference_hi, reference_lo)
    if actual.numel() == 0:
        return 0.0, 0.0
    error, allowed, _ = _allowed(actual, reference_hi, reference_lo, bound, factor)
    error = error.nan_to_num(math.inf)
    worst = (error / allowed).nan_to_num(0.0, posinf=math.inf).argmax()  # 0/0: exact where nothing is allowed
    return error.flatten()[worst].item(), allowed.flatten()[worst].item()


def assert_close_by_rule(actual: torch.Tensor, reference_hi: torch.Tensor, reference_lo: torch.Tensor,
                         bound: Optional[Bound] = None, factor: float = 2.0, name: str = "output") -> None:
    """Assert ``|actual - hi| <= factor * max|lo - hi| + bound`` everywhere (the module's rule).

    ``actual``: the kernel's result (its dtype is "the kernel's dtype"); ``reference_hi``:
    the same math in fp64; ``reference_lo``: the same math by PyTorch in the kernel's
    dtype; ``bound``: the forward-error bound of the computation (e.g. from
    :func:`attention_bounds`), default the output's rounding. NaN in ``actual`` fails.
    """
    _check_shapes(actual, reference_hi, reference_lo)
    if torch.isnan(actual).any():
        raise AssertionError(f"{name}: kernel result contains NaN ({int(torch.isnan(actual).sum())} elements)")
    if actual.numel() == 0:
        return
    error, allowed, torch_error = _allowed(actual, reference_hi, reference_lo, bound, factor)
    if bool((error <= allowed).all()):
        return
    worst = (error / allowed).nan_to_num(0.0, posinf=math.inf).argmax().item()
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), actual.shape))
    floor = allowed.flatten()[worst].item() - factor * torch_error
    raise AssertionError(
        f"{name}: |kernel - reference| = {error.flatten()[worst].item():.3e} at index {index} exceeds the allowed "
        f"{allowed.flatten()[worst].item():.3e} = {factor} x PyTorch's {reference_lo.dtype} error {torch_error:.3e} "
        f"+ forward-error bound {floor:.3e} there (kernel dtype {actual.dtype}, shape {tuple(actual.shape)}, "
        f"{int((error > allowed).sum())} elements over)")
