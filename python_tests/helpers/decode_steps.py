"""Decode-step cases of the CUDA kernel, shared by the tests of its ``cuda`` (GPU) and ``cuda_emulated``
(CPU) backends: random and skewed step inputs, the reference answer, and the checks of an op's
output, cache writes and bad-input errors."""
from typing import Optional

import pytest
import torch

from tidar_kernels.kernels.backends import reference
from tidar_kernels.kernels.mask import Layout
from tidar_kernels.kernels.tolerance import assert_close_by_rule, attention_bounds

DECODE = int(Layout.DECODE)
SKEWED_SPLITS = 7  # the skewed step's cache cut into 7 chunks of 64 rows


def make_step(batch, k, heads, head_dim, max_len, lengths, dtype, seed=0, device="cpu",
              unused: Optional[float] = float("nan")):
    """Random step inputs on ``device``: ``(q, k_new, v_new, k_cache, v_cache, cache_seqlens)``.

    Every cache row at or past n holds ``unused``; ``unused=None``: the whole cache (also past n)
    holds random values the kernel must not read."""
    q_heads, kv_heads = heads
    steps = k + k * k
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    q, k_new, v_new = randn(batch, steps, q_heads, head_dim), randn(batch, steps, kv_heads, head_dim), \
        randn(batch, steps, kv_heads, head_dim)
    if unused is None:
        k_cache, v_cache = randn(batch, max_len, kv_heads, head_dim), randn(batch, max_len, kv_heads, head_dim)
    else:
        k_cache = torch.full((batch, max_len, kv_heads, head_dim), unused, dtype=dtype, device=device)
        v_cache = k_cache.clone()
        for b, n in enumerate(lengths):
            k_cache[b, :n] = randn(n, kv_heads, head_dim)
            v_cache[b, :n] = randn(n, kv_heads, head_dim)
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    return q, k_new, v_new, k_cache, v_cache, cache_seqlens


def references(q, k_new, v_new, k_cache, v_cache, cache_seqlens, k, scale):
    """(fp64 output, the same math by PyTorch in q's dtype, attention's forward-error bound) from the
    reference's mask and math; NaN in the (masked) unused cache rows zeroed for the reference only."""
    steps, max_len = q.shape[1], k_cache.shape[1]
    allowed = reference.cached_mask(Layout.DECODE, cache_seqlens, max_len, steps, k, k, None)
    keys = torch.cat([k_cache, k_new], dim=1).nan_to_num()
    values = torch.cat([v_cache, v_new], dim=1).nan_to_num()
    hi, _ = reference.masked_attention(q, keys, values, allowed, scale, dtype=torch.float64)
    lo, _ = reference.masked_attention(q, keys, values, allowed, scale, dtype=q.dtype)
    return hi, lo, attention_bounds(q, keys, values, allowed, scale)["out"]


def check_step(op, q, k_new, v_new, k_cache, v_cache, cache_seqlens, k, scale=None, name="decode attention output"):
    """One call of the decode op ``op``: output within the rule, cache written at [n, n+k) only, lengths unmoved."""
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    hi, lo, bound = references(q, k_new, v_new, k_cache, v_cache, cache_seqlens, k, scale)
    k_before, v_before, n_before = k_cache.clone(), v_cache.clone(), cache_seqlens.clone()
    out = op(q, k_new, v_new, k_cache, v_cache, cache_seqlens, None, DECODE, k, scale)
    if q.is_cuda:
        torch.cuda.synchronize()
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert_close_by_rule(out, hi, lo, bound, name=name)
    check_cache_writes(k_before, v_before, k_cache, v_cache, k_new, v_new, cache_seqlens, k)
    assert torch.equal(cache_seqlens, n_before), "the attention op must not move the lengths"


def check_cache_writes(k_before, v_before, k_cache, v_cache, k_new, v_new, cache_seqlens, k):
    """Rows [n, n+k) hold the drafts' K/V; every other byte is unchanged."""
    want_k, want_v = k_before.clone(), v_before.clone()
    for b, n in enumerate(cache_seqlens.tolist()):
        want_k[b, n:n + k] = k_new[b, :k]
        want_v[b, n:n + k] = v_new[b, :k]
    bits = torch.int16
    assert torch.equal(k_cache.view(bits), want_k.view(bits)), "k_cache differs outside or inside [n, n+k)"
    assert torch.equal(v_cache.view(bits), want_v.view(bits)), "v_cache differs outside or inside [n, n+k)"


def make_skewed_step(dtype, device, head_dim, unused, seed=0):
    """A step whose cache splits differ in weight and in size by orders of magnitude.

    Batch 1, k = 2, GQA 4/2, head dim D, n = 448 rows (7 full 64-row splits). Every query
    has a component >= 1 along dim 0 and key row j has ``24 sqrt(D) (1 - j / n)`` there, so
    the early rows dominate the softmax (the scaled score falls by >= 24 from the first row
    to the last), while V grows 2^12-fold from the first row to the last: the split partials
    the kernel stores in its dtype are weighted from ~1 down to ~e^-20 and hold values from
    ~1 up to ~10^4. Rows past n hold ``unused``. Returns the step inputs.
    """
    k, (q_heads, kv_heads), n, max_len = 2, (4, 2), 448, 456
    steps = k + k * k
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float64)

    q = randn(1, steps, q_heads, head_dim)
    q[..., 0] = 1 + q[..., 0].abs()
    rows = torch.arange(n, device=device, dtype=torch.float64)
    k_rows, v_rows = randn(1, n, kv_heads, head_dim), randn(1, n, kv_heads, head_dim)
    k_rows[..., 0] = (24 * head_dim ** 0.5 * (1 - rows / n)).view(1, n, 1)
    v_rows *= torch.exp2(12 * rows / n).view(1, n, 1, 1)
    k_cache = torch.full((1, max_len, kv_heads, head_dim), unused, device=device, dtype=torch.float64)
    v_cache = k_cache.clone()
    k_cache[:, :n], v_cache[:, :n] = k_rows, v_rows
    step = (q, randn(1, steps, kv_heads, head_dim), randn(1, steps, kv_heads, head_dim), k_cache, v_cache)
    return (*(t.to(dtype) for t in step), torch.tensor([n], dtype=torch.int32, device=device))


def split_weight_spread(q, k_cache, cache_seqlens, splits):
    """Per query row, the largest over the smallest softmax mass of the cache's ``splits``
    equal chunks (fp64; the step's own keys left out): how unequal the partials' weights are."""
    n = int(cache_seqlens[0])
    group = q.shape[2] // k_cache.shape[2]
    keys = k_cache[0, :n].double().repeat_interleave(group, 1)  # [n, Hq, D]
    scores = torch.einsum("thd,nhd->thn", q[0].double(), keys) * q.shape[-1] ** -0.5
    mass = scores.softmax(-1).unflatten(-1, (splits, n // splits)).sum(-1)  # [T, Hq, splits]
    return mass.amax(-1) / mass.amin(-1)


def check_bad_decode_input_raises_before_any_write(op, step, k):
    """The binding checks (csrc/bindings_common.h, shared by the cuda and cuda_emulated backends):
    each bad argument raises a clear RuntimeError and the caches stay bit-identical."""
    q, k_new, v_new, k_cache, v_cache, lengths = step
    k_before, v_before = k_cache.clone(), v_cache.clone()
    args = [q, k_new, v_new, k_cache, v_cache, lengths, None, DECODE, k, 0.125]

    def call(index, value, match):
        bad = list(args)
        bad[index] = value
        with pytest.raises(RuntimeError, match=match):
            op(*bad)

    call(7, int(Layout.PREFILL), "layout must be 3")
    call(6, lengths, "context_lens must be None")
    call(8, 3, r"q.shape\[1\] must be k \+ k\*k")
    call(0, q.float(), "q must be float16 or bfloat16")
    call(1, k_new.bfloat16(), "k_new must have q's dtype")
    call(5, lengths.long(), "cache_seqlens must be a contiguous int32")
    call(3, k_cache[:, :, :1], "k_cache must be")
    call(3, k_cache[:, :1].expand_as(k_cache), "k_cache must not overlap itself")
    call(4, k_cache, "k_cache and v_cache must not overlap in memory")
    call(0, q[:, :, :0], "q must have at least one head")
    odd = torch.randn(2, k + k * k, 4, 96, dtype=q.dtype, device=q.device)
    cache = torch.zeros(2, 40, 2, 96, dtype=q.dtype, device=q.device)
    with pytest.raises(RuntimeError, match="head_dim must be 64 or 128"):
        op(odd, odd[:, :, :2], odd[:, :, :2], cache, cache.clone(), lengths, None, DECODE, k, 0.125)
    if q.is_cuda:
        torch.cuda.synchronize()
    assert torch.equal(k_cache.view(torch.int16), k_before.view(torch.int16))
    assert torch.equal(v_cache.view(torch.int16), v_before.view(torch.int16))
