"""Kernel comparison: TiDAR decode-step and training attention, ours against the peers.

Implementations measured in the same run, on the same inputs:

* ``tidar-<backend>`` (ours): ``tidar_kernels.decode_attention`` /
  ``training_attention`` with each non-reference backend that supports the call
  (``cuda``, ``triton``). Smoke runs time the reference instead.
* ``tidar-<backend>-page<P>`` (ours, decode): the same decode step on a
  paged cache (``block_table``, pages of ``P`` = 1, 16, 64 rows, shuffled over the
  pool) with each backend that supports paged calls; its ``vs_tidar-<backend>``
  column is the contiguous time over the paged time (target: >= 1/1.1 at P >= 16).
* ``tidar-triton-tma`` (ours, decode, sm_90+): the Triton decode step
  with the opt-in TMA cache loop switched on for that call only (``TIDAR_TRITON_TMA``;
  run without the variable so ``tidar-triton`` stays the pointer loop); its
  ``vs_tidar-triton`` column says whether TMA is faster (> 1: it is).
* ``flex``: ``torch.nn.attention.flex_attention`` compiled (eager in smoke
  runs), its ``BlockMask`` built once per shape outside the timed region. The
  ``mask_mod`` is :func:`tidar_kernels.kernels.mask.key_ranges`, not a new definition
  (:class:`FlexMasks`).
* ``sdpa-mask``: ``scaled_dot_product_attention`` with the dense bool mask of
  :mod:`tidar_kernels.kernels.mask` (``decode_mask`` / ``training_mask``).
* ``causal`` (the ceiling): unmasked bottom-right causal SDPA with the same
  query and key counts, restricted to the fused kernels (flash / cuDNN /
  memory-efficient) on CUDA; plus ``flash-attn`` (``flash_attn_with_kvcache`` /
  ``flash_attn_func``, causal) when that package is importable.
* ``flashinfer-mask`` / ``flashinfer-causal`` when ``flashinfer`` is importable
  (ragged prefill wrapper with the dense custom mask, and plain causal).

The peers read the step's keys concatenated behind the cache ``[cache 0..n-1 |
step]`` (built outside the timed region) and do not write the cache; ours
write the drafts' K/V into the cache inside the timed call.

Shapes: heads of Qwen2.5-1.5B (12 q / 2 kv, d 128) and Qwen3-8B
(32 / 8, 128); decode ``k`` = 4, 8, 16 (``k + k*k`` queries), cache 1k..32k,
batch 1, 4, 16; training ``2S`` = 4096, 8192, block 4, 8, 16, batch 1, forward
and forward+backward.

Metrics (``D`` head dim, ``Hq``/``Hkv`` heads, ``B`` batch, ``e`` bytes per element):

* ``tflops`` counts only unmasked work: ``4 * D * Hq * B * visible`` for the
  forward (``2D`` for ``QK^T`` and ``2D`` for ``PV`` per visible (query, key)
  pair), times 3.5 for forward+backward (the backward's five matmuls cost 2.5x
  the forward's two). ``visible`` is counted from the mask rule of the
  implementation's own problem (TiDAR rule for ours and the masked peers,
  bottom-right causal for the ceiling).
* ``gbps`` is compulsory HBM traffic over time. Decode: read Q and the cache
  rows ``[0, n)`` of K and V once, read the step's K/V, write O and the drafts'
  K/V: ``e * B * D * (2*Tq*Hq + 2*(n + Tq)*Hkv + 2*k*Hkv)``. Training forward:
  ``e * B * T * D * (2*Hq + 2*Hkv)`` (Q, K, V in, O out); forward+backward adds
  the backward's reads of Q, K, V, O, dO and writes of dQ, dK, dV
  (``4*Hq + 4*Hkv``): ``e * B * T * D * (6*Hq + 6*Hkv)``.
* ``vs_<impl>`` = that implementation's time / this row's time (> 1: this row is faster).
* ``limit_ms`` = the roofline limit of the row's ``tflops`` work and ``gbps`` bytes on the
  GPU's datasheet figures (:mod:`tidar_kernels.kernels.roofline`; H100 SXM and H200 known, other
  GPUs: columns left out with a note); ``of_limit`` = ``limit_ms / ms``.

``--refcheck`` compares every implementation's forward output on the first
decode and the first training-forward shape with masked attention in fp64 by
the kernels' tolerance rule (:mod:`tidar_kernels.kernels.tolerance`): at most twice the
error of PyTorch doing the same math in the input dtype plus attention's
forward-error bound. Gradients are left to the kernels' test suites.

Reproduce (GPU): ``python bench/attention.py --refcheck``; CPU check: ``--smoke``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tidar_kernels as tk
from bench import common
from tidar_kernels.kernels import backends as tk_backends
from tidar_kernels.kernels.backends import reference as tk_reference
from tidar_kernels.kernels.mask import Layout, decode_mask, key_ranges, local_mask, training_mask
from tidar_kernels.kernels.tolerance import attention_bounds, rule_error

HEADS = {  # model -> (q heads, kv heads, head dim)
    "qwen2.5-1.5b": (12, 2, 128),
    "qwen3-8b": (32, 8, 128),
}
SMOKE_HEADS = {"smoke": (4, 2, 16)}
PAGE_SIZES = (1, 16, 64)  # paged decode rows: SGLang's token pool (1), vLLM's default (16), and larger


@dataclass(frozen=True)
class Shape:
    """One benchmark problem. ``mode`` is ``decode``, ``train-fwd`` or ``train-fwdbwd``."""

    mode: str
    model: str
    q_heads: int
    kv_heads: int
    head_dim: int
    batch: int
    cache_len: int = 0  # decode: committed length n
    draft_len: int = 0  # decode: k
    seq_len: int = 0  # training: 2S
    block: int = 0  # training: B

    @property
    def queries(self) -> int:
        return self.draft_len * (self.draft_len + 1) if self.mode == "decode" else self.seq_len

    @property
    def keys(self) -> int:
        return self.cache_len + self.queries if self.mode == "decode" else self.seq_len

    def describe(self) -> dict:
        return {"mode": self.mode, "model": self.model, "q_heads": self.q_heads, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "batch": self.batch, "cache_len": self.cache_len,
                "draft_len": self.draft_len, "seq_len": self.seq_len, "block": self.block,
                "queries": self.queries, "keys": self.keys}


# ----------------------------------------------------------------------------
# Work and traffic
# ----------------------------------------------------------------------------


def visible_pairs(shape: Shape, causal: bool) -> int:
    """Visible (query, key) pairs per head and sequence: TiDAR rule, or bottom-right causal."""
    tq = shape.queries
    if causal:
        return tq * (shape.keys - tq) + tq * (tq + 1) // 2
    if shape.mode == "decode":
        local = local_mask(Layout.DECODE, tq, shape.draft_len, shape.draft_len)
        return tq * shape.cache_len + int(local.sum())
    return int(local_mask(Layout.TRAINING, tq, tq // 2, shape.block).sum())


def flops(shape: Shape, causal: bool) -> float:
    """Useful FLOPs (module docstring): ``4 D Hq B visible``, x3.5 for forward+backward."""
    forward = 4.0 * shape.head_dim * shape.q_heads * shape.batch * visible_pairs(shape, causal)
    return forward * 3.5 if shape.mode == "train-fwdbwd" else forward


def traffic_bytes(shape: Shape, element_size: int) -> float:
    """Compulsory HBM bytes (module docstring)."""
    b, d, hq, hkv, tq = shape.batch, shape.head_dim, shape.q_heads, shape.kv_heads, shape.queries
    if shape.mode == "decode":
        elements = b * d * (2 * tq * hq + 2 * (shape.cache_len + tq) * hkv + 2 * shape.draft_len * hkv)
    elif shape.mode == "train-fwd":
        elements = b * tq * d * (2 * hq + 2 * hkv)
    else:
        elements = b * tq * d * (6 * hq + 6 * hkv)  # forward (2Hq + 2Hkv) + backward (4Hq + 4Hkv)
    return float(elements * element_size)


# ----------------------------------------------------------------------------
# Masks for the peers, from the one mask definition
# ----------------------------------------------------------------------------


class FlexMasks:
    """FlexAttention ``mask_mod``s of the decode and training layouts, via :func:`key_ranges`.

    The shape parameters live in 0-d device tensors and there is one function
    object per layout, so compiled flex never recompiles for a new cache length,
    draft length or block size, and only until it turns dynamic for new
    sequence lengths (dozens of shapes cost a handful of compiles). A block
    mask reads the current values: build it right before timing its shape.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cache_len, self.draft_len, self.clean_rows, self.block = (
            torch.zeros((), dtype=torch.int64, device=device) for _ in range(4))

        def decode(batch, head, q_idx, kv_idx):  # keys [cache | step]
            clean_end, block_start, block_end = key_ranges(Layout.DECODE, q_idx, self.draft_len, self.draft_len)
            col = kv_idx - self.cache_len  # negative for cache keys: always visible
            return (col < clean_end) | ((col >= block_start) & (col < block_end))

        def training(batch, head, q_idx, kv_idx):  # [clean | mask], 2S keys
            clean_end, block_start, block_end = key_ranges(Layout.TRAINING, q_idx, self.clean_rows, self.block)
            return (kv_idx < clean_end) | ((kv_idx >= block_start) & (kv_idx < block_end))

        self.decode, self.training = decode, training

    def decode_block_mask(self, cache_len: int, draft_len: int):
        from torch.nn.attention.flex_attention import create_block_mask
        self.cache_len.fill_(cache_len)
        self.draft_len.fill_(draft_len)
        rows = draft_len * (draft_len + 1)
        return create_block_mask(self.decode, None, None, rows, cache_len + rows, device=self.device)

    def training_block_mask(self, seq_len: int, block: int):
        from torch.nn.attention.flex_attention import create_block_mask
        self.clean_rows.fill_(seq_len // 2)
        self.block.fill_(block)
        return create_block_mask(self.training, None, None, seq_len, seq_len, device=self.device)


# ----------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------


class Impl:
    """A named, timed callable: ``run()`` returns the output ``[B, Tq, Hq, D]`` (forward) or grads."""

    def __init__(self, name: str, kind: str, run: Callable[[], object], causal: bool = False,
                 note: str = "", output: Optional[Callable[[], torch.Tensor]] = None):
        self.name, self.kind, self.run, self.causal, self.note = name, kind, run, causal, note
        self.output = output or run  # the forward output for --refcheck


def our_backends(device: torch.device, dtype: torch.dtype, head_dim: int, op: str, layout: Layout,
                 paged: bool = False) -> list[str]:
    """Our backends that support the call (paged or not) here: the kernels on CUDA, the reference in smoke runs."""
    if device.type != "cuda":
        return ["reference"]
    names = []
    for name in tk.available_backends():
        if name == "reference":
            continue
        try:
            tk_backends.select(tk_backends.Call(op, device, dtype, head_dim, int(layout), paged=paged), name)
        except ValueError:
            continue
        names.append(name)
    return names


def flex_function(device: torch.device):
    """FlexAttention, compiled on CUDA (eager on the CPU, where compiling takes minutes)."""
    from torch.nn.attention.flex_attention import flex_attention
    if device.type != "cuda":
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention
    return torch.compile(flex_attention)  # dynamic after the first new shape: few recompiles


def _to_bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).contiguous()


def sdpa_impl(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
              mask: Optional[torch.Tensor], device: torch.device, requires_grad: bool) -> Impl:
    """SDPA on ``[B, H, S, D]`` inputs, GQA-native when a fused kernel accepts it.

    On CUDA the math fallback is excluded, so the row measures a fused kernel;
    if none takes GQA inputs, K/V heads are expanded outside the timed region
    (noted in the row).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    attn_mask = causal_lower_right(q.shape[2], k.shape[2]) if causal else mask
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    kernels = fused if device.type == "cuda" else fused + [SDPBackend.MATH]

    def call(key, value, gqa):
        with sdpa_kernel(kernels):
            return F.scaled_dot_product_attention(q, key, value, attn_mask=attn_mask, enable_gqa=gqa)

    key, value, gqa, note = k, v, True, ""
    try:
        call(k, v, True)
    except RuntimeError:  # no fused kernel for this GQA call: expand K/V heads (a timing error stays visible)
        group = q.shape[1] // k.shape[1]
        key, value = (t.detach().repeat_interleave(group, dim=1).requires_grad_(requires_grad) for t in (k, v))
        gqa, note = False, "kv heads expanded (no fused GQA kernel)"
    forward = lambda: call(key, value, gqa).transpose(1, 2)  # noqa: E731
    kind = "ceiling" if causal else "peer"
    if not requires_grad:
        return Impl(name, kind, forward, causal=causal, note=note)
    inputs = (q, key, value)
    return Impl(name, kind, _fwdbwd(forward, inputs), causal=causal, note=note, output=forward)


def _fwdbwd(forward: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor]) -> Callable[[], object]:
    """Forward then backward with a fixed random upstream gradient (no accumulation)."""
    grad_out = []

    def run():
        out = forward()
        if not grad_out:
            grad_out.append(torch.randn_like(out))
        return torch.autograd.grad(out, inputs, grad_out[0])

    return run


def _with_triton_tma(call: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``call()`` with the Triton backend's opt-in TMA cache loop switched on (then back)."""
    from tidar_kernels.kernels.backends import triton_ops
    saved, triton_ops.TMA_REQUESTED = triton_ops.TMA_REQUESTED, True
    try:
        return call()
    finally:
        triton_ops.TMA_REQUESTED = saved


def decode_impls(shape: Shape, device: torch.device, dtype: torch.dtype, flex,
                 masks: FlexMasks) -> tuple[list[Impl], dict]:
    """Inputs of one decode shape and every implementation over them."""
    b, hq, hkv, d, k, n = (shape.batch, shape.q_heads, shape.kv_heads, shape.head_dim, shape.draft_len,
                           shape.cache_len)
    tq = shape.queries
    gen = torch.Generator(device=device).manual_seed(0)
    randn = lambda *size: torch.randn(*size, generator=gen, device=device, dtype=dtype)  # noqa: E731
    q, k_new, v_new = randn(b, tq, hq, d), randn(b, tq, hkv, d), randn(b, tq, hkv, d)
    k_cache, v_cache = randn(b, n + k, hkv, d), randn(b, n + k, hkv, d)
    lengths = torch.full((b,), n, dtype=torch.int32, device=device)
    inputs = {"q": q, "k_new": k_new, "v_new": v_new, "k_cache": k_cache, "v_cache": v_cache, "lengths": lengths}

    impls = []
    contiguous_backends = our_backends(device, dtype, d, tk_backends.CACHED_ATTENTION, Layout.DECODE)
    for name in contiguous_backends:
        impls.append(Impl(f"tidar-{name}", "ours", lambda name=name: tk.decode_attention(
            q, k_new, v_new, k_cache, v_cache, lengths, k, backend=name, check_lengths=False)))
    if "triton" in contiguous_backends and torch.cuda.get_device_capability(device) >= (9, 0):
        impls.append(Impl("tidar-triton-tma", "ours", lambda: _with_triton_tma(lambda: tk.decode_attention(
            q, k_new, v_new, k_cache, v_cache, lengths, k, backend="triton", check_lengths=False)),
            note="TMA cache loop (TIDAR_TRITON_TMA)"))
    paged_backends = our_backends(device, dtype, d, tk_backends.CACHED_ATTENTION, Layout.DECODE, paged=True)
    for page_size in PAGE_SIZES if paged_backends else ():
        k_pool, table = paged_copy(k_cache, page_size, seed=page_size)
        v_pool, _ = paged_copy(v_cache, page_size, seed=page_size)
        for name in paged_backends:
            impls.append(Impl(f"tidar-{name}-page{page_size}", "ours", lambda name=name, kp=k_pool, vp=v_pool,
                              table=table: tk.decode_attention(q, k_new, v_new, kp, vp, lengths, k, backend=name,
                                                               check_lengths=False, block_table=table),
                              note="paged cache, pages shuffled"))

    # Peers: keys [cache 0..n-1 | step], [B, H, S, D]
    q4 = _to_bhsd(q)
    keys = _to_bhsd(torch.cat([k_cache[:, :n], k_new], dim=1))
    values = _to_bhsd(torch.cat([v_cache[:, :n], v_new], dim=1))
    dense = decode_mask(n, k).to(device)
    inputs.update(keys=keys, values=values, dense=dense)

    block_mask = masks.decode_block_mask(n, k)
    impls.append(Impl("flex", "peer", lambda: flex(q4, keys, values, block_mask=block_mask,
                                                   enable_gqa=True).transpose(1, 2)))
    impls.append(sdpa_impl("sdpa-mask", q4, keys, values, False, dense, device, False))
    impls.append(sdpa_impl("causal", q4, keys, values, True, None, device, False))
    impls += _flash_attn_decode(inputs) + _flashinfer(shape, inputs, dense, device)
    return impls, inputs


def paged_copy(cache: torch.Tensor, page_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cache [B, L, H, D]`` as a page pool ``[B * ceil(L / P), P, H, D]`` and its block table
    ``int32 [B, ceil(L / P)]``; pages are shuffled over the pool, as in a fragmented server."""
    batch, length = cache.shape[:2]
    columns = -(-length // page_size)
    order = torch.randperm(batch * columns, generator=torch.Generator().manual_seed(seed)).to(cache.device)
    padded = cache.new_zeros((batch, columns * page_size, *cache.shape[2:]))
    padded[:, :length] = cache
    pool = torch.empty((batch * columns, page_size, *cache.shape[2:]), dtype=cache.dtype, device=cache.device)
    pool[order] = padded.view(batch * columns, page_size, *cache.shape[2:])  # page (b, c) -> order[b * cols + c]
    return pool, order.view(batch, columns).to(torch.int32)


def training_impls(shape: Shape, device: torch.device, dtype: torch.dtype, flex,
                   masks: FlexMasks) -> tuple[list[Impl], dict]:
    """Inputs of one training shape (forward or forward+backward) and every implementation."""
    b, hq, hkv, d, t = shape.batch, shape.q_heads, shape.kv_heads, shape.head_dim, shape.seq_len
    grad = shape.mode == "train-fwdbwd"
    gen = torch.Generator(device=device).manual_seed(0)
    randn = lambda *size: torch.randn(*size, generator=gen, device=device,  # noqa: E731
                                      dtype=dtype).requires_grad_(grad)
    q, k, v = randn(b, t, hq, d), randn(b, t, hkv, d), randn(b, t, hkv, d)
    inputs = {"q": q, "k": k, "v": v}

    def wrap(name, kind, forward, tensors, causal=False):
        if grad:
            return Impl(name, kind, _fwdbwd(forward, tensors), causal=causal, output=forward)
        return Impl(name, kind, forward, causal=causal)

    impls = []
    for name in our_backends(device, dtype, d, tk_backends.ATTENTION, Layout.TRAINING):
        impls.append(wrap(f"tidar-{name}", "ours", lambda name=name: tk.training_attention(
            q, k, v, shape.block, backend=name), (q, k, v)))

    q4, k4, v4 = (_to_bhsd(x.detach()).requires_grad_(grad) for x in (q, k, v))
    dense = training_mask(t // 2, shape.block).to(device)
    inputs["dense"] = dense
    block_mask = masks.training_block_mask(t, shape.block)
    if device.type == "cuda" or not grad:  # flex has no CPU backward
        impls.append(wrap("flex", "peer", lambda: flex(q4, k4, v4, block_mask=block_mask,
                                                       enable_gqa=True).transpose(1, 2), (q4, k4, v4)))
    impls.append(sdpa_impl("sdpa-mask", q4, k4, v4, False, dense, device, grad))
    impls.append(sdpa_impl("causal", q4, k4, v4, True, None, device, grad))
    impls += _flash_attn_training(inputs, grad)
    return impls, inputs


def _flash_attn_decode(inputs: dict) -> list[Impl]:
    """flash-attn's KV-cache kernel, causal (bottom-right): the ceiling with the same cache layout."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return []
    if not inputs["q"].is_cuda:
        return []
    q, lengths = inputs["q"], inputs["lengths"]
    n = int(lengths[0])
    # flash-attn appends all Tq new rows to the cache: give it room for them
    kc, vc = (torch.cat([c[:, :n], c.new_zeros(c.shape[0], q.shape[1], *c.shape[2:])], dim=1)
              for c in (inputs["k_cache"], inputs["v_cache"]))
    return [Impl("flash-attn", "ceiling", lambda: flash_attn_with_kvcache(
        q, kc, vc, k=inputs["k_new"], v=inputs["v_new"], cache_seqlens=lengths, causal=True), causal=True)]


def _flash_attn_training(inputs: dict, grad: bool) -> list[Impl]:
    """flash-attn's causal kernel over ``2S`` tokens: the training ceiling."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return []
    if not inputs["q"].is_cuda:
        return []
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    forward = lambda: flash_attn_func(q, k, v, causal=True)  # noqa: E731
    if grad:
        return [Impl("flash-attn", "ceiling", _fwdbwd(forward, (q, k, v)), causal=True, output=forward)]
    return [Impl("flash-attn", "ceiling", forward, causal=True)]


def _flashinfer(shape: Shape, inputs: dict, dense: torch.Tensor, device: torch.device) -> list[Impl]:
    """FlashInfer's ragged prefill wrapper with the custom (bit-packed by it) mask, and causal."""
    try:
        import flashinfer
    except ImportError:
        return []
    b, tq, tk_ = shape.batch, shape.queries, shape.keys
    q = inputs["q"].reshape(b * tq, shape.q_heads, shape.head_dim)
    k = inputs["keys"].transpose(1, 2).reshape(b * tk_, shape.kv_heads, shape.head_dim)
    v = inputs["values"].transpose(1, 2).reshape(b * tk_, shape.kv_heads, shape.head_dim)
    qo_indptr = torch.arange(b + 1, dtype=torch.int32, device=device) * tq
    kv_indptr = torch.arange(b + 1, dtype=torch.int32, device=device) * tk_
    impls = []
    for name, kwargs, causal in (("flashinfer-mask", {"custom_mask": dense.flatten().repeat(b)}, False),
                                 ("flashinfer-causal", {"causal": True}, True)):
        workspace = torch.zeros(128 * 1024 * 1024, dtype=torch.uint8, device=device)
        wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD")
        try:
            wrapper.plan(qo_indptr, kv_indptr, shape.q_heads, shape.kv_heads, shape.head_dim, **kwargs)
        except Exception as err:  # an optional peer whose API or build does not fit: say so, go on
            print(f"skipped {name}: {type(err).__name__}: {err}")
            continue
        impls.append(Impl(name, "ceiling" if causal else "peer",
                          lambda wrapper=wrapper: wrapper.run(q, k, v).reshape(b, tq, shape.q_heads, -1),
                          causal=causal))
    return impls


# ----------------------------------------------------------------------------
# Reference check
# ----------------------------------------------------------------------------


def reference_outputs(shape: Shape, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked attention in fp64 and in the input dtype, and its forward-error bound (the rule's three inputs)."""
    if shape.mode == "decode":
        q, keys, values = inputs["q"], inputs["keys"].transpose(1, 2), inputs["values"].transpose(1, 2)
    else:
        q, keys, values = (inputs[name].detach() for name in ("q", "k", "v"))
    scale = shape.head_dim ** -0.5
    exact, low = (tk_reference.masked_attention(q, keys, values, inputs["dense"], scale, dtype=dtype)[0]
                  for dtype in (torch.float64, q.dtype))
    return exact, low, attention_bounds(q, keys, values, inputs["dense"], scale, q.dtype)["out"]


def refcheck(shape: Shape, impls: list[Impl], inputs: dict) -> dict[str, dict]:
    """Per implementation: ``max_err`` against fp64 math, the rule's verdict ``refcheck`` pass/FAIL
    (causal: n/a) and ``ref_allowed``, the allowed error where the rule is tightest."""
    exact, low, bound = reference_outputs(shape, inputs)
    results = {}
    for impl in impls:
        if impl.causal:
            results[impl.name] = {"refcheck": "n/a (different mask)"}
            continue
        try:
            with torch.no_grad():
                output = impl.output()
            error, allowed = rule_error(output, exact, low, bound)
        except Exception as error:  # recorded in the row by measure(); not a pass
            results[impl.name] = {"refcheck": f"error: {type(error).__name__}"}
            continue
        results[impl.name] = {"max_err": float((output.double() - exact).abs().max()),
                              "refcheck": "pass" if error <= allowed else "FAIL", "ref_allowed": allowed}
    return results


# ----------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------


def shapes(args) -> list[Shape]:
    """Most telling first, so a run cut by ``--max-seconds`` keeps them: decode at the first
    batch (batch 1 by default), then training, then decode at the other batches."""
    heads = SMOKE_HEADS if args.smoke else {name: HEADS[name] for name in args.models}
    train_heads = SMOKE_HEADS if args.smoke else {name: HEADS[name] for name in args.train_models or args.models}
    decode = {batch: [Shape("decode", model, hq, hkv, d, batch, cache_len=n, draft_len=k)
                      for model, (hq, hkv, d) in heads.items() for k in args.draft_lens for n in args.cache_lens]
              for batch in args.batches} if "decode" in args.modes else {}
    training = [Shape(mode, model, hq, hkv, d, args.train_batch, seq_len=t, block=block)
                for mode in ("train-fwd", "train-fwdbwd") if mode in args.modes
                for model, (hq, hkv, d) in train_heads.items() for t in args.seq_lens for block in args.blocks]
    batches = list(decode)
    first = decode[batches[0]] if batches else []
    return first + training + [shape for batch in batches[1:] for shape in decode[batch]]


def measure(shape: Shape, device: torch.device, dtype: torch.dtype, flex, masks: FlexMasks,
            check: bool, figures=None) -> list[dict]:
    """Time every implementation on one shape; rows with time, TFLOP/s, GB/s, ratios and, with
    the GPU's datasheet ``figures``, the roofline limit of the row's useful work and the fraction reached.

    An implementation that fails on the shape (out of memory, no kernel, a
    compile error) gets a row with the error in ``note`` and no time: one
    failure must not cost the rest of a scarce GPU run. main() reports them.
    """
    build = decode_impls if shape.mode == "decode" else training_impls
    impls, inputs = build(shape, device, dtype, flex, masks)
    checks = refcheck(shape, impls, inputs) if check else {}
    rows = []
    for impl in impls:
        row = shape.describe() | {"impl": impl.name, "kind": impl.kind, "note": impl.note} | checks.get(impl.name, {})
        try:
            ms = common.time_ms(impl.run, device)
        except Exception as err:  # recorded, see the docstring
            rows.append(row | {"note": f"error: {type(err).__name__}: {str(err).splitlines()[0][:160]}"})
            continue
        work, traffic = flops(shape, impl.causal), traffic_bytes(shape, inputs["q"].element_size())
        rows.append(row | {"ms": ms, "tflops": work / ms / 1e9, "gbps": traffic / ms / 1e6}
                    | common.roofline_columns(work, traffic, ms, figures))
    timed = [row for row in rows if "ms" in row]
    for row in timed:
        for other in timed:
            row[f"vs_{other['impl']}"] = other["ms"] / row["ms"]
    return rows


def plot(rows: list[dict], path: Path, meta: dict) -> Path:
    """Decode: time vs cache length per (batch, k); training: time per (2S, block). One panel each."""
    plt = common.pyplot()
    panels = common.unique((r["mode"], r["model"], r["batch"], r["draft_len"]) for r in rows
                           if r["mode"] == "decode")
    panels += common.unique((r["mode"], r["model"], r["batch"], 0) for r in rows if r["mode"] != "decode")
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, squeeze=False,
                             figsize=(5 * cols, 3.6 * math.ceil(len(panels) / cols)))
    impls = common.unique(r["impl"] for r in rows)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {impl: colors[i % len(colors)] for i, impl in enumerate(impls)}  # the same in every panel
    for ax, (mode, model, batch, k) in zip(axes.flat, panels):
        sel = [r for r in rows if (r["mode"], r["model"], r["batch"]) == (mode, model, batch)
               and (mode != "decode" or r["draft_len"] == k)]
        for impl in common.unique(r["impl"] for r in sel):
            pts = [r for r in sel if r["impl"] == impl and "ms" in r]
            if mode == "decode":
                ax.plot([r["cache_len"] for r in pts], [r["ms"] for r in pts], marker="o", label=impl,
                        color=color[impl])
            else:
                ax.plot([f"{r['seq_len']}/B{r['block']}" for r in pts], [r["ms"] for r in pts], marker="o",
                        label=impl, color=color[impl])
        if mode == "decode":
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("cache length")
            ax.set_title(f"decode {model} batch {batch} k={k}", fontsize=9)
        else:
            ax.set_xlabel("2S / block")
            ax.set_title(f"{mode} {model} batch {batch}", fontsize=9)
        ax.set_ylabel("ms (median)")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return common.save_figure(fig, path, meta)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--refcheck", action="store_true",
                        help="compare each implementation with the reference on the first shape of each mode")
    parser.add_argument("--modes", type=lambda s: s.split(","), default=["decode", "train-fwd", "train-fwdbwd"])
    parser.add_argument("--models", type=lambda s: s.split(","), default=list(HEADS),
                        help=f"head configurations, from {list(HEADS)}")
    parser.add_argument("--train-models", type=lambda s: s.split(","), default=None,
                        help="head configurations of the training shapes (default: --models)")
    parser.add_argument("--batches", type=common.parse_int_list, default=[1, 4, 16])
    parser.add_argument("--draft-lens", type=common.parse_int_list, default=[4, 8, 16])
    parser.add_argument("--cache-lens", type=common.parse_int_list, default=[1024, 4096, 16384, 32768])
    parser.add_argument("--seq-lens", type=common.parse_int_list, default=[4096, 8192], help="training 2S")
    parser.add_argument("--blocks", type=common.parse_int_list, default=[4, 8, 16])
    parser.add_argument("--train-batch", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop starting new shapes after this wall time, the first shape always runs "
                             "(the CSV says it was cut)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batches, args.draft_lens, args.cache_lens = [1, 2], [2, 3], [5, 37]
        args.seq_lens, args.blocks, args.train_batch = [24], [4], 1
    unknown = [m for m in args.models + (args.train_models or []) if m not in HEADS]
    if unknown:
        parser.error(f"--models and --train-models must be from {list(HEADS)}, got {unknown}")
    bad_modes = [m for m in args.modes if m not in ("decode", "train-fwd", "train-fwdbwd")]
    if bad_modes:
        parser.error(f"--modes must be from decode, train-fwd, train-fwdbwd; got {bad_modes}")
    for t in args.seq_lens:
        for block in args.blocks:
            if t % 2 or (t // 2) % block:
                parser.error(f"--seq-lens: 2S={t} must be even with S a multiple of every block, got block {block}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Run the comparison; returns the CSV path."""
    # bf16 in smoke runs too: --refcheck's tolerance is about low-precision inputs
    args, argv, device, dtype, out_dir, meta = common.start_run(argv, parse_args, __file__,
                                                                smoke_dtype=torch.bfloat16)
    common.print_header(meta)
    for limit in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                  "accumulated_recompile_limit"):  # flex recompiles per shape (names differ by version)
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 1024))
    flex, masks = flex_function(device), FlexMasks(device)
    figures = common.roofline_device(args.smoke)

    start, rows, checked, cut = time.monotonic(), [], set(), False
    todo = shapes(args)
    for index, shape in enumerate(todo):
        if rows and args.max_seconds is not None and time.monotonic() - start > args.max_seconds:
            cut = True
            print(f"--max-seconds={args.max_seconds} reached: {len(todo) - index} of {len(todo)} shapes skipped")
            break
        check = args.refcheck and shape.mode in ("decode", "train-fwd") and shape.mode not in checked
        checked.add(shape.mode)
        new = measure(shape, device, dtype, flex, masks, check, figures)
        rows += new
        common.print_table(new, ["mode", "model", "batch", "cache_len", "draft_len", "seq_len", "block", "impl",
                                 "ms", "tflops", "gbps", "limit_ms", "of_limit"]
                           + (["max_err", "refcheck"] if check else []))
    meta["truncated"] = f"yes, after {len(rows)} rows (--max-seconds)" if cut else "no"
    path = common.write_csv(out_dir / "attention.csv", rows, meta)
    plot(rows, out_dir / "attention.png", meta)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    print(f"reproduce: {meta['command']}")
    failed = sorted({r["impl"] for r in rows if r.get("refcheck") == "FAIL"})
    errors = sorted({f"{r['impl']} ({r['mode']})" for r in rows if "ms" not in r and r["kind"] == "ours"})
    if failed or errors:
        raise RuntimeError(f"--refcheck failed for {failed}; our implementations errored: {errors} (see the CSV)")
    return path


if __name__ == "__main__":
    main()
