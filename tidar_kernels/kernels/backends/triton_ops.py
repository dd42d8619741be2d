"""The "triton" backend: Triton kernels registered as torch ops ``tidar::*_triton``.

Ops (``torch.library.triton_op`` + ``wrap_triton``, so torch.compile sees the
kernels and a decode step can be captured in a CUDA graph):

* ``tidar::attention_fwd_triton(q, k, v, layout, block_size, scale) -> (out, lse)``,
  differentiable through ``tidar::attention_bwd_triton`` (training and causal);
* ``tidar::cached_attention_triton(...)`` with the schema of
  ``tidar::cached_attention_reference``: decode step, prefill and causal append;
  writes the clean step rows into ``k_cache``/``v_cache``.

Opt-in: ``TIDAR_TRITON_TMA=1`` makes the cached kernel read contiguous caches through
Hopper TMA tensor descriptors where :func:`tma_legal` allows (off by default, untimed).

Greedy acceptance stays with the reference backend (``accept_drafts=None``): it is
a handful of argmaxes, not attention.

Supported calls: fp16, bf16 and fp32 on CUDA; head dims up to 128 (any size, padded
to a power of two >= 16 inside the kernels). On the CPU only under the Triton
interpreter (``TRITON_INTERPRET=1``, read when this module is imported) and only
fp32/fp16: the interpreter computes bf16 wrongly. Importing this module without
triton raises ImportError, which the registry reads as "not available".
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch
import triton  # without triton this raises ImportError: the registry reads "backend unavailable"
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from .. import roofline
from ..mask import Layout, layout_clean_rows, rows_written_to_cache
from . import Backend, Call, register_attention_autograd
from . import triton_kernels as kernels

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Opt-in (docs/codegen.md): the cached kernel's contiguous-cache loop reads K/V through TMA
# tensor descriptors where legal (tma_legal). Off by default: no GPU has timed it yet.
TMA_REQUESTED = os.environ.get("TIDAR_TRITON_TMA", "0") == "1"
MAX_HEAD_DIM = 128
# A split streams at least this many cache rows (two 64-key tiles): below that its fixed
# costs (Q load, pipeline fill, merge rows) are not amortised; the roofline model has no term for them.
MIN_KEYS_PER_SPLIT = 128
MAX_SPLITS = 32
# The interpreter has no SMs; pretend a small GPU so CPU tests exercise the split path.
INTERPRETER_SM_COUNT = 8


def _triton_version(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a Triton version string (``"3.8.0"``, ``"3.9.0+git1a2b"``)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"unrecognised Triton version {version!r}")
    return int(match.group(1)), int(match.group(2))


# The installed Triton (torch pins it: 2.11 -> 3.6, 2.13 -> 3.8, 2.15 -> 3.9). Register
# allocation differs between releases, so a few tile choices below depend on it: each is
# the largest tile that compiles without spills under every Triton the codegen report is
# run against in CI (``scripts/codegen_all_tritons.sh``).
TRITON_VERSION = _triton_version(triton.__version__)

def _launcher(kernel):
    """``wrap_triton`` makes a launch visible to torch.compile. Under the interpreter there is
    nothing to compile, and torch < 2.13 rejects interpreted kernels there, so launch directly."""
    return kernel if INTERPRET else wrap_triton(kernel)


_LAUNCH_FWD = _launcher(kernels.attention_fwd_kernel)
_LAUNCH_BWD_PRE = _launcher(kernels.attention_bwd_preprocess_kernel)
_LAUNCH_BWD_DQ = _launcher(kernels.attention_bwd_dq_kernel)
_LAUNCH_BWD_DKDV = _launcher(kernels.attention_bwd_dkdv_kernel)
_LAUNCH_CACHED = _launcher(kernels.cached_attention_kernel)
_LAUNCH_MERGE = _launcher(kernels.merge_splits_kernel)


# ----------------------------------------------------------------------------
# Launch configuration (static shapes only: never reads a tensor's values)
# ----------------------------------------------------------------------------


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not be rounded to tf32 in tl.dot: the tolerance rule compares
    # against PyTorch's fp32 math, which keeps full precision.
    return "ieee" if dtype == torch.float32 else "tf32"


def _warps(block_rows: int, block_d: int) -> int:
    """Warps of the forward, dQ and cached kernels for a ``block_rows x block_d`` query tile.

    8 warps (two warpgroups, flash-attention's choice) for 128-row tiles and for 64 x 128,
    4 below: with 4 warps those tiles spill on sm_90 (Triton 3.9, bf16; registers and
    spills per configuration: ``scripts/triton_codegen_report.py``).
    """
    return 8 if block_rows >= 128 or block_rows * block_d >= 64 * 128 else 4


def _fwd_blocks(dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the forward and dQ kernels.

    128 x 64 is flash-attention's choice for fp16/bf16 (with 8 warps, see ``_warps``).
    bf16, head dim 128, Triton 3.9, sm_90a (``scripts/triton_codegen_report.py``; untimed):
    forward 213 registers, 128 KiB shared memory; dQ 219 registers, 160 KiB; no spills,
    every matmul on wgmma. fp32 tiles take twice the shared memory per element, so they
    are halved.
    """
    return (64, 32) if dtype == torch.float32 else (128, 64)


def _fwd_dq_blocks(dtype: torch.dtype, capability: int,
                   triton_version: tuple[int, int] = TRITON_VERSION) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the forward and dQ kernels on ``capability``: :func:`_fwd_blocks`,
    but

    * 64-row tiles before sm_90, where mma.sync's register layouts make 128-row tiles
      spill (bf16 hd128, Triton 3.9, sm_80: dQ 84 B per thread, forward 12 B; 64 rows with
      8 warps: dQ 188 registers, no spills);
    * 32-key tiles on sm_90 under Triton < 3.9: Triton 3.8 spills 128 x 64 (bf16 hd128,
      sm_90a: forward 56 B per thread, dQ 152 B; with 2 stages still 104 B in dQ), while
      128 x 32 compiles to 183 / 184 registers without spills, every matmul on wgmma.
    """
    block_m, block_n = _fwd_blocks(dtype)
    if capability < 90:
        return min(block_m, 64), block_n
    if triton_version < (3, 9) and dtype != torch.float32:
        return block_m, min(block_n, 32)
    return block_m, block_n


def _bwd_config(dtype: torch.dtype, block_d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the dK/dV kernel.

    It holds K, V, dK, dV tiles of BLOCK_N rows plus one BLOCK_M query tile in flight,
    so it is the kernel with the most live registers. It computes the transposed
    products (``[key, row]`` tiles), so the BLOCK_N = 64 key rows are every matmul's M
    dimension and small query tiles still run on wgmma.

    * head dim 128: 32 x 64 with 8 warps and 2 stages. bf16, Triton 3.9, sm_90a
      (``scripts/triton_codegen_report.py``; untimed): 199 registers, 68 KiB shared
      memory, no spills, all 28 matmul instructions wgmma (the untransposed kernel: 248
      registers, 32 of 36 on mma.sync; 64 x 64 tiles spilled);
    * head dim <= 64: 64 x 64 with 8 warps (4 below 64), 3 stages.

    fp32 tiles take twice the registers per element: 32 x 32, 4 warps, 2 stages.
    """
    if dtype == torch.float32:
        return 32, 32, 4, 2
    if block_d >= 128:
        return 32, 64, 8, 2
    return 64, 64, (8 if block_d >= 64 else 4), 3


def _stages(dtype: torch.dtype) -> int:
    return 2 if dtype == torch.float32 else 3


@functools.lru_cache(maxsize=None)
def device_figures(device: torch.device) -> roofline.Device:
    """The roofline figures the planner uses for ``device`` (read once per device).

    The interpreter has no SMs: it gets a small GPU (``INTERPRETER_SM_COUNT`` SMs with an
    H100 SM's rates), so CPU tests exercise the split path."""
    if device.type != "cuda":
        return roofline.device_for("Triton interpreter", INTERPRETER_SM_COUNT, roofline.H100.smem_per_sm, 90)
    props = torch.cuda.get_device_properties(device)
    return roofline.device_for(props.name, props.multi_processor_count, props.shared_memory_per_multiprocessor,
                               props.major * 10 + props.minor)


@dataclass(frozen=True)
class CachedPlan:
    """Launch configuration of ``cached_attention_kernel`` (and the merge when ``splits > 1``)."""

    block_m: int
    block_n: int
    warps: int
    stages: int
    splits: int
    estimate: roofline.Estimate


def _cached_block_n(dtype: torch.dtype, block_m: int, block_d: int, capability: int,
                    triton_version: tuple[int, int] = TRITON_VERSION) -> int:
    """Key-tile width of the cached kernel: small row tiles take wider key tiles to keep
    enough bytes in flight, but at head dim 128 with 16-32 rows ptxas (Triton 3.9, sm_90)
    spills ~10 KB per thread with 128-key tiles, <1 KB with 64. Before sm_90 (mma.sync
    register layouts) 64-key tiles spill at head dim 128 too (bf16, sm_80: 16-64 B per
    thread), 32-key tiles do not (with Triton < 3.8 only with at most 32-row tiles:
    :func:`_cached_block_m_options`)."""
    if dtype == torch.float32 or (capability < 90 and block_d >= 128):
        return 32 if block_d >= 128 else 64
    return 128 if block_m <= 32 and block_d <= 64 else 64


def _cached_block_m_options(dtype: torch.dtype, packed_rows: int, capability: int = 90, block_d: int = 128,
                            triton_version: tuple[int, int] = TRITON_VERSION) -> tuple[int, ...]:
    """Row-tile sizes the planner weighs for ``packed_rows`` (query row, group head) rows.

    A small step (<= 32 rows, memory-bound) takes one tile of the rows rounded up to a
    power of two >= 16; larger ones 64- or 128-row tiles (what Hopper's wgmma takes from
    one or two warpgroups), whichever the model prices lower: 64 pads fewer rows, 128
    reads each K/V tile for more rows. fp32 tiles take twice the shared memory and
    registers per element: at most 64 rows. Before sm_90 at head dim >= 128 under Triton
    < 3.8, at most 32 rows: Triton 3.6 spills 64 x 32 tiles with 8 warps (bf16, sm_80:
    24-52 B per thread, more with 2 stages or 4 warps), while 32 x 32 with 4 warps takes
    168-218 registers without spills.
    """
    cap = 64 if dtype == torch.float32 else 128
    if capability < 90 and block_d >= 128 and triton_version < (3, 8):
        cap = 32
    if packed_rows <= 32:
        return (max(16, triton.next_power_of_2(packed_rows)),)
    return tuple(m for m in (64, 128) if m <= cap) or (cap,)


# TMA: global addresses and every stride but the last must be multiples of 16 bytes.
_TMA_ALIGN_BYTES = 16


def tma_legal(k_cache: torch.Tensor, v_cache: torch.Tensor, paged: bool, capability: int) -> bool:
    """Whether the cached kernel may read this cache through TMA tensor descriptors.

    Needs sm_90+ (Hopper's TMA unit), a contiguous cache (a TMA box is a rectangle: it
    cannot gather rows through a block table), the head dim contiguous, and every
    (batch, KV head) base address and the row stride 16-byte aligned (the descriptor
    of program ``(b, hk)`` starts at ``cache[b, 0, hk]``). Static: reads no tensor values.
    Under torch.compile's fake tensors the storage's own address is unknown; torch's
    allocators align storages to far more than 16 bytes, so only the offset is checked.
    """
    if paged or capability < 90:
        return False
    for cache in (k_cache, v_cache):
        size = cache.element_size()
        if cache.stride(3) != 1 and cache.shape[3] > 1:
            return False
        if any(stride * size % _TMA_ALIGN_BYTES for stride in cache.stride()[:3]):
            return False
        address = cache.storage_offset() * size
        if not (cache.device.type == "meta" or is_fake(cache)):
            address = cache.data_ptr()
        if address % _TMA_ALIGN_BYTES:
            return False
    return True


def _scratch(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    """Triton's global-scratch allocator: device-side tensor descriptors live there (128
    bytes per program). A torch allocation on the current stream, so CUDA-graph capture
    takes it from the graph's pool."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _install_scratch_allocator() -> None:
    """Triton keeps the allocator in a context variable (per thread): set it before each TMA
    launch, and at import for launches that skip the op body (torch.compile's generated code)."""
    if not INTERPRET:
        triton.set_allocator(_scratch)


if TMA_REQUESTED:
    _install_scratch_allocator()


@functools.lru_cache(maxsize=4096)  # every layer of every step asks again: price each shape once
def plan_cached(dtype: torch.dtype, batch: int, num_rows: int, q_heads: int, kv_heads: int, head_dim: int,
                max_len: int, rows_written: int, device: roofline.Device) -> CachedPlan:
    """Row tile, key tile, warps, stages and cache splits (flash-decoding) of a cached launch.

    From static sizes only (the cache taken full at ``max_len``): the launch is the same on
    every step and can be captured in a CUDA graph. Splits and row tile are the pair of
    least time under :func:`tidar_kernels.kernels.roofline.estimate`: memory-bound steps split
    until the SMs are busy, compute-bound ones only while idle SMs cost more than the
    partials' traffic (in the input dtype), and prefer partials within the step's ideal
    bytes when that costs at most ``roofline.PARTIAL_SLACK`` of modelled time. Chunks are
    sized from the real lengths inside the kernel, so the work stays balanced for any
    ``cache_seqlens``.

    bf16, head dim 128, Triton 3.9 (``scripts/triton_codegen_report.py``; untimed): on
    sm_90a 64-row tiles with 8 warps use 220-232 registers and 112 KiB of shared memory,
    128-row tiles 220 and 128 KiB, 16-row tiles (AR step, 4 warps) 142 and 70 KiB, all
    without spills and with every decode matmul on wgmma (16-row tiles: mma.sync); on
    sm_80 with 32-key tiles 255 and 126 registers, no spills.
    """
    block_d = _block_d(head_dim)
    elem_bytes = torch.empty((), dtype=dtype, device="meta").element_size()
    stages = _stages(dtype)
    step = roofline.CachedStep(batch, num_rows, q_heads, kv_heads, head_dim, max_len, rows_written, elem_bytes)
    block_n_of = {}
    for block_m in _cached_block_m_options(dtype, step.packed_rows, device.capability, block_d):
        block_n = _cached_block_n(dtype, block_m, block_d, device.capability)
        # Shared memory: the Q tile plus `stages` buffers of K and V tiles (what Triton allocates).
        smem = elem_bytes * block_d * (block_m + stages * 2 * block_n)
        # Partial outputs are stored in the input dtype (see cached_attention).
        block_n_of[roofline.CachedKernel(block_m, _warps(block_m, block_d), smem,
                                         partial_elem_bytes=elem_bytes)] = block_n
    kernel, splits, guess = roofline.plan_splits(step, block_n_of, device, MAX_SPLITS, MIN_KEYS_PER_SPLIT,
                                                 roofline.PARTIAL_SLACK)
    return CachedPlan(kernel.block_m, block_n_of[kernel], kernel.warps, stages, splits, guess)


# ----------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------


@triton_op("tidar::attention_fwd_triton", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: int, block_size: int,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Training / causal attention: ``(out [B,T,Hq,D] in q.dtype, lse [B,Hq,T] fp32, natural log)``."""
    batch, num_rows, num_heads, head_dim = q.shape
    out = torch.empty((batch, num_rows, num_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, num_heads, num_rows), dtype=torch.float32, device=q.device)
    block_d = _block_d(head_dim)
    block_m, block_n = _fwd_dq_blocks(q.dtype, device_figures(q.device).capability)
    grid = (triton.cdiv(num_rows, block_m), batch * num_heads)
    _LAUNCH_FWD[grid](
        q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        num_rows, num_heads, num_heads // k.shape[2], layout_clean_rows(Layout(layout), num_rows, block_size),
        block_size, scale * kernels.LOG2E, head_dim,
        LAYOUT=layout, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=_precision(q.dtype),
        num_warps=_warps(block_m, block_d), num_stages=_stages(q.dtype))
    return out, lse


@triton_op("tidar::attention_bwd_triton", mutates_args=())
def attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, layout: int, block_size: int,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` recomputed from the saved ``lse`` (GQA: summed per KV head)."""
    batch, num_rows, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    delta = torch.empty((batch, num_heads, num_rows), dtype=torch.float32, device=q.device)
    block_d = _block_d(head_dim)
    clean_rows = layout_clean_rows(Layout(layout), num_rows, block_size)
    qk_scale = scale * kernels.LOG2E
    precision, stages = _precision(q.dtype), _stages(q.dtype)

    _LAUNCH_BWD_PRE[(triton.cdiv(num_rows, 64), batch * num_heads)](
        out, dout, delta, *out.stride(), *dout.stride(), num_rows, num_heads, head_dim,
        BLOCK_M=64, BLOCK_D=block_d)
    block_m, block_n = _fwd_dq_blocks(q.dtype, device_figures(q.device).capability)
    _LAUNCH_BWD_DQ[(triton.cdiv(num_rows, block_m), batch * num_heads)](
        q, k, v, dout, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(),
        num_rows, num_heads, num_heads // num_kv_heads, clean_rows, block_size, qk_scale, scale, head_dim,
        LAYOUT=layout, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision,
        num_warps=_warps(block_m, block_d), num_stages=stages)
    block_m, block_n, dkdv_warps, dkdv_stages = _bwd_config(q.dtype, block_d)
    _LAUNCH_BWD_DKDV[(triton.cdiv(num_rows, block_n), batch * num_kv_heads)](
        q, k, v, dout, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
        *dk.stride(), *dv.stride(), num_rows, num_heads, num_kv_heads, num_heads // num_kv_heads, clean_rows,
        block_size, qk_scale, scale, head_dim,
        LAYOUT=layout, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision,
        num_warps=dkdv_warps, num_stages=dkdv_stages)
    return dq, dk, dv


register_attention_autograd(attention_fwd, torch.ops.tidar.attention_bwd_triton.default)


@triton_op("tidar::cached_attention_triton", mutates_args=("k_cache", "v_cache"))
def cached_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, cache_seqlens: torch.Tensor, context_lens: Optional[torch.Tensor],
                     layout: int, block_size: int, scale: float,
                     block_table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Step rows over cache ``[0, n_b)`` plus their own keys; writes the clean rows into the cache.

    Same semantics as ``tidar::cached_attention_reference``, paged caches included
    (``block_table``). One launch, plus a merge launch when the cache is split.
    """
    batch, num_rows, num_heads, head_dim = q.shape
    num_kv_heads = k_new.shape[2]
    group = num_heads // num_kv_heads
    layout_enum = Layout(layout)
    clean_rows = layout_clean_rows(layout_enum, num_rows, block_size)
    written = rows_written_to_cache(layout_enum, num_rows, block_size)
    out = torch.empty((batch, num_rows, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if out.numel() == 0:  # an empty batch: nothing to launch (the planner needs rows to price)
        return out

    block_d = _block_d(head_dim)
    packed_rows = num_rows * group
    paged = block_table is not None
    capacity = k_cache.shape[1] * (block_table.shape[1] if paged else 1)  # cache rows per sequence
    figures = device_figures(q.device)
    plan = plan_cached(q.dtype, batch, num_rows, num_heads, num_kv_heads, head_dim, capacity, written, figures)
    tma = TMA_REQUESTED and tma_legal(k_cache, v_cache, paged, figures.capability)
    if tma:
        _install_scratch_allocator()
    block_m, block_n, splits = plan.block_m, plan.block_n, plan.splits
    row_tiles = triton.cdiv(packed_rows, block_m)
    if splits > 1:
        # Partial outputs in the input dtype (fp32 stays fp32), log-sum-exps in fp32: it halves
        # the partials' traffic. Each partial is normalised (|o_s| <= sum_j p_sj |v_j|, a convex
        # combination of V rows: it cannot overflow the dtype V came in), so rounding it costs at
        # most u_dtype |P_s||V|, and the merge's weights sum to 1: the output errs by at most one
        # more u_dtype |P||V|, the size of rounding P itself (in testing.attention_bounds).
        o_part = torch.empty((batch * num_kv_heads, splits, packed_rows, head_dim), dtype=q.dtype,
                             device=q.device)
        lse_part = torch.empty((batch * num_kv_heads, splits, packed_rows), dtype=torch.float32, device=q.device)
    else:  # the kernel writes the output directly; these pointers are never used
        o_part = lse_part = out
    has_context = context_lens is not None
    # Unused pointers get cache_seqlens (never read): the contiguous kernel ignores the table.
    _LAUNCH_CACHED[(splits, row_tiles, batch * num_kv_heads)](
        q, k_new, v_new, k_cache, v_cache, cache_seqlens, context_lens if has_context else cache_seqlens,
        block_table if paged else cache_seqlens, out, o_part, lse_part, *q.stride(), *k_new.stride(),
        *v_new.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        *(block_table.stride() if paged else (0, 0)), k_cache.shape[0],
        num_rows, num_kv_heads, group, clean_rows, block_size, written, capacity, scale * kernels.LOG2E,
        head_dim,
        LAYOUT=layout, HAS_CONTEXT=has_context, NUM_SPLITS=splits, PAGED=paged,
        PAGE_SIZE=k_cache.shape[1] if paged else 1, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=block_d, PRECISION=_precision(q.dtype), TMA=tma, num_warps=plan.warps, num_stages=plan.stages)
    if splits > 1:
        # 32 rows: with 64 rows x head dim 128 in fp32 the merge spills registers on sm_90.
        _LAUNCH_MERGE[(triton.cdiv(packed_rows, 32), batch * num_kv_heads)](
            o_part, lse_part, out, *out.stride(), num_rows, num_kv_heads, group, head_dim,
            NUM_SPLITS=splits, BLOCK_M=32, BLOCK_D=block_d)
    return out


# Op handles bound once: dispatch through them costs no attribute lookups per call.
_FWD = torch.ops.tidar.attention_fwd_triton.default
_CACHED = torch.ops.tidar.cached_attention_triton.default


def _supports(call: Call) -> bool:
    if not 1 <= call.head_dim <= MAX_HEAD_DIM:
        return False
    if call.device.type == "cuda":
        return call.dtype in (torch.float16, torch.bfloat16, torch.float32)
    return INTERPRET and call.device.type == "cpu" and call.dtype in (torch.float16, torch.float32)


def _attention(q, k, v, layout, block_size, scale):
    return _FWD(q, k, v, layout, block_size, scale)[0]


BACKEND = Backend(
    name="triton",
    supports=_supports,
    attention=_attention,
    cached_attention=_CACHED,
    accept_drafts=None,
)
