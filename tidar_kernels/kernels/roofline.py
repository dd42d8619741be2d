"""Roofline cost model of an attention launch: what the split planners decide from.

A launch is limited either by tensor-core FLOPs or by HBM bytes. Whether a GPU
reaches its peak also depends on how many CTAs there are and how they land on
the SMs, so the model prices a plan as

    main  = max(padded FLOPs / (peak FLOP/s * u), (ideal + partial writes) / (HBM bandwidth * u))
    merge = partial reads / HBM bandwidth          (the merge kernel, only when partials exist)

with ``u`` the utilisation of the GPU: the busiest SM gets ``ceil(ctas / sms)``
CTAs, so ``ctas / (that * sms)`` of the SMs' time is used, and an SM runs at its
peak only with ``WARPS_FOR_PEAK`` warps resident (fewer: proportionally slower);
how many CTAs can be resident comes from shared memory and registers per SM.
The planners (``backends/triton_ops.py`` for the Triton kernel, ``csrc/decode_attention_plan.cpp``
on the C++ mirror ``csrc/roofline.h`` for the CUDA kernel) pick the split count and row-tile
size that minimise ``main + merge``, except that on compute-bound steps both take a plan whose
partials move no more than the step's ideal bytes when it is nearly as fast
(:func:`plan_splits`' ``partial_slack``, :data:`PARTIAL_SLACK`); every quantity is a static size (the cache
taken full at ``max_len``), so a plan never reads a tensor's values and a
decode step stays CUDA-graph capturable.

The model has no constants fitted to timings: its inputs are datasheet figures
(:data:`H100`, :data:`H200`, :data:`A100`) and the kernels' static tile sizes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

# An SM reaches its tensor-core / load-store peak only with this many warps
# resident (two warpgroups: one computes while the other waits on memory).
WARPS_FOR_PEAK = 8
REGISTERS_PER_SM = 65536
# Registers per thread assumed when sizing residency: the 255-register cap
# (allocated in units of 8), the worst case of ptxas' allocation.
REGISTERS_PER_THREAD = 256
SMEM_RESERVED_PER_CTA = 1024  # bytes the driver keeps per resident CTA (sm_80, sm_90)
MAX_CTAS_PER_SM = 32
FP32_BYTES = 4
# On a compute-bound step, a plan whose split partials move no more than the step's ideal
# bytes is taken when it is modelled at most this factor slower than the fastest plan
# (split partials should not outweigh the step); both planners use it (the CUDA planner's copy: kPartialSlack in
# csrc/roofline.h). Why: the model is most optimistic exactly about that traffic. It
# hides the partials' writes entirely under compute and prices the merge launch as bytes
# at full bandwidth, with no launch gap or tail; neither is measured. 1.25 is a stated
# margin for that, not a fitted constant; with it, Qwen2.5-1.5B k = 16 batch 1 on sm_90a
# takes 2 splits in the Triton kernel (3.4 MB of partials, modelled 1.13x the 5-split 8.5 MB plan).
PARTIAL_SLACK = 1.25


@dataclass(frozen=True)
class Device:
    """Datasheet figures of one GPU (dense fp16/bf16 tensor-core FLOP/s, HBM bytes/s)."""

    name: str
    sm_count: int
    tensor_flops: float
    hbm_bytes_per_s: float
    smem_per_sm: int  # bytes of shared memory an SM gives its resident CTAs
    capability: int  # compute capability, major * 10 + minor (90: sm_90, 80: sm_80)

    @property
    def ridge(self) -> float:
        """FLOP per byte above which a launch is compute-bound."""
        return self.tensor_flops / self.hbm_bytes_per_s


H100 = Device("H100 SXM", 132, 989e12, 3.35e12, 228 * 1024, 90)
H200 = Device("H200 SXM", 132, 989e12, 4.8e12, 228 * 1024, 90)
A100 = Device("A100 SXM 80GB", 108, 312e12, 2.039e12, 164 * 1024, 80)


def device_from_name(name: str) -> Optional[Device]:
    """Known figures for a ``torch.cuda.get_device_name()`` string, else None.

    Only the SXM parts are known: ``"NVIDIA H100 80GB HBM3"`` and ``"NVIDIA H200"``
    (the PCIe and NVL H100s have other SM counts and bandwidths)."""
    if "H200" in name:
        return H200
    if "H100" in name and "HBM3" in name:
        return H100
    return None


def device_for(name: str, sm_count: int, smem_per_sm: int, capability: int) -> Device:
    """Figures the planner uses on a GPU: the known ones, else the GPU's own SM count and
    shared memory with an H100 SM's FLOP/s and bandwidth per SM (the planners' choices
    depend on the ratio of the two, not on their size)."""
    known = device_from_name(name)
    if known is not None and known.sm_count == sm_count:
        return known
    return Device(name, sm_count, H100.tensor_flops / H100.sm_count * sm_count,
                  H100.hbm_bytes_per_s / H100.sm_count * sm_count, smem_per_sm, capability)


def limit_seconds(flops: float, hbm_bytes: float, device: Device) -> float:
    """The roofline: the least time ``flops`` and ``hbm_bytes`` can take on ``device``."""
    return max(flops / device.tensor_flops, hbm_bytes / device.hbm_bytes_per_s)


def ctas_per_sm(device: Device, smem_per_cta: int, warps: int) -> int:
    """How many CTAs of a kernel an SM holds at once (shared memory and registers)."""
    by_smem = device.smem_per_sm // (smem_per_cta + SMEM_RESERVED_PER_CTA)
    by_registers = REGISTERS_PER_SM // (warps * 32 * REGISTERS_PER_THREAD)
    return max(1, min(by_smem, by_registers, MAX_CTAS_PER_SM))


def utilisation(device: Device, ctas: int, warps: int, smem_per_cta: int) -> float:
    """Fraction of the GPU's peak a launch of ``ctas`` equal CTAs gets (see module doc)."""
    per_sm = -(-ctas // device.sm_count)
    resident = min(per_sm, ctas_per_sm(device, smem_per_cta, warps))
    rate = min(1.0, resident * warps / WARPS_FOR_PEAK)
    return ctas / (per_sm * device.sm_count) * rate


@dataclass(frozen=True)
class CachedStep:
    """Static sizes of one attention launch over a KV cache (decode step, AR step).

    ``num_rows`` step rows per sequence, each attending to the whole cache
    (``max_len`` rows, taken full) plus its own keys; ``rows_written`` of them go into
    the cache. Elements are ``elem_bytes`` wide.
    """

    batch: int
    num_rows: int
    q_heads: int
    kv_heads: int
    head_dim: int
    max_len: int
    rows_written: int
    elem_bytes: int

    @property
    def packed_rows(self) -> int:
        """Rows of one KV head's tile space: (step row, query head of the group) pairs."""
        return self.num_rows * (self.q_heads // self.kv_heads)

    def flops(self) -> float:
        """Useful FLOPs: ``QK^T`` and ``PV`` of every query row over the full cache."""
        return 4.0 * self.batch * self.q_heads * self.num_rows * self.max_len * self.head_dim

    def padded_flops(self, block_m: int) -> float:
        """FLOPs the tensor cores execute with ``block_m``-row tiles (padding rows included)."""
        tiles = -(-self.packed_rows // block_m)
        return 4.0 * self.batch * self.kv_heads * tiles * block_m * (self.max_len + self.num_rows) * self.head_dim

    def ideal_bytes(self) -> float:
        """What the step must move: K/V of the cache read once per KV head, Q in, O out,
        the step's K/V in, the written rows out."""
        rows = (2 * self.kv_heads * self.max_len + 2 * self.num_rows * self.q_heads
                + 2 * self.num_rows * self.kv_heads + 2 * self.rows_written * self.kv_heads)
        return float(self.elem_bytes * self.batch * self.head_dim * rows)

    def partial_bytes(self, partials: int, elem_bytes: int = FP32_BYTES) -> float:
        """Partial outputs (``elem_bytes`` per element) and fp32 log-sum-exps of ``partials``
        splits, written and read back."""
        return (2.0 * partials * self.batch * self.kv_heads * self.packed_rows
                * (elem_bytes * self.head_dim + FP32_BYTES))


@dataclass(frozen=True)
class CachedKernel:
    """Static traits of one configuration of a cached-attention kernel.

    ``local_split``: the step's own keys run in an extra split and every split writes
    partials (the CUDA kernel); otherwise the last split also takes the step's keys
    and one split writes the output directly (the Triton kernel).
    ``partial_elem_bytes``: bytes per element of the split partial outputs (both the Triton
    and the CUDA kernel store them in the input dtype); log-sum-exps are fp32.
    """

    block_m: int
    warps: int
    smem_bytes: int
    local_split: bool = False
    partial_elem_bytes: int = FP32_BYTES


@dataclass(frozen=True)
class Estimate:
    """Modelled time of one plan and the quantities behind it."""

    seconds: float
    main_seconds: float
    merge_seconds: float
    ctas: int
    utilisation: float
    partial_bytes: float


def estimate(step: CachedStep, kernel: CachedKernel, splits: int, device: Device) -> Estimate:
    """Modelled time of ``step`` run by ``kernel`` with the cache cut into ``splits`` chunks."""
    tiles = -(-step.packed_rows // kernel.block_m)
    ctas = splits * tiles * step.batch * step.kv_heads  # a local split's CTAs are short: not counted
    partials = splits + 1 if kernel.local_split else (splits if splits > 1 else 0)
    partial = step.partial_bytes(partials, kernel.partial_elem_bytes)
    used = utilisation(device, ctas, kernel.warps, kernel.smem_bytes)
    compute = step.padded_flops(kernel.block_m) / (device.tensor_flops * used)
    memory = (step.ideal_bytes() + partial / 2) / (device.hbm_bytes_per_s * used)
    main = max(compute, memory)
    merge = partial / 2 / device.hbm_bytes_per_s
    return Estimate(main + merge, main, merge, ctas, used, partial)


def plan_splits(step: CachedStep, kernels: Iterable[CachedKernel], device: Device, max_splits: int,
                min_keys_per_split: int, partial_slack: float = 1.0) -> tuple[CachedKernel, int, Estimate]:
    """The (kernel, splits) of least modelled time; ties go to the earlier kernel, then to
    fewer splits. Splits stay in ``[1, max_splits]`` and give every split at least
    ``min_keys_per_split`` cache rows of a full cache.

    ``partial_slack`` (>= 1): for a compute-bound step, the fastest plan whose partials
    move no more than the step's ideal bytes is taken instead when its modelled time is
    at most ``partial_slack`` times the least (1: always the least).
    """
    if partial_slack < 1.0:
        raise ValueError(f"plan_splits: partial_slack must be >= 1, got {partial_slack}")
    most = max(1, min(max_splits, step.max_len // min_keys_per_split))
    plans = [(kernel, splits, estimate(step, kernel, splits, device))
             for kernel in kernels for splits in range(1, most + 1)]
    if not plans:
        raise ValueError("plan_splits: kernels is empty, expected at least one candidate")

    def fastest(candidates):  # min keeps the first of equal times: earlier kernel, fewer splits
        return min(candidates, key=lambda plan: plan[2].seconds)

    best = fastest(plans)
    if partial_slack > 1.0 and compute_bound(step, device):
        lean = [plan for plan in plans if plan[2].partial_bytes <= step.ideal_bytes()]
        if lean and fastest(lean)[2].seconds <= partial_slack * best[2].seconds:
            return fastest(lean)
    return best


def compute_bound(step: CachedStep, device: Device) -> bool:
    """Whether the step's useful FLOPs per ideal byte exceed the device's ridge point."""
    return step.flops() / step.ideal_bytes() > device.ridge


def model_forward(config, batch: int, tokens: int, cache_len: int, lm_head_rows: int,
                  elem_bytes: int = 2) -> tuple[float, float]:
    """(FLOPs, HBM bytes) a forward of a ``TransformerConfig`` must do at least.

    ``tokens`` new rows per sequence over a cache of ``cache_len`` committed rows, the LM head
    on ``lm_head_rows`` rows per sequence. FLOPs: the projections and MLP (``2 x params x rows``),
    attention over the cache (``4 Hq D`` per row and cached key), the LM head. Bytes: every
    weight read once, the cache's K/V read once, the new rows' K/V written.
    """
    c = config
    attention_params = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
    layer_params = attention_params + 3 * c.dim * c.intermediate_size
    rows = batch * tokens
    flops = (2.0 * layer_params * rows * c.n_layers + 4.0 * c.n_heads * c.head_dim * rows * cache_len * c.n_layers
             + 2.0 * c.dim * c.vocab_size * batch * lm_head_rows)
    kv_row = 2 * c.n_layers * c.n_kv_heads * c.head_dim  # K and V of one token, all layers
    weights = layer_params * c.n_layers + c.dim * c.vocab_size
    hbm_bytes = float(elem_bytes * (weights + kv_row * batch * (cache_len + tokens)))
    return flops, hbm_bytes
