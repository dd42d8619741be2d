"""The Triton backend against the PyTorch math, with flash-attention's tolerance rule.

Runs on the CPU through the Triton interpreter (``TRITON_INTERPRET=1``, which CI's
``scripts/test.sh`` sets; fp32 and fp16 only, the interpreter computes bf16 wrongly)
or on a CUDA device with the compiler (run pytest *without* ``TRITON_INTERPRET``;
then bf16 joins and the ``gpu`` tests run: CUDA-graph capture of a decode step,
torch.compile, head dims 64/128 at model sizes). The module is skipped when neither
is possible. Shapes are odd on purpose and small: the interpreter is slow.

Every comparison uses :func:`tidar_kernels.kernels.tolerance.assert_close_by_rule`: the
kernel's error against fp64 math must be at most twice PyTorch's error doing the
same math in the kernel's dtype plus the forward-error bound of attention in that
dtype (:func:`tidar_kernels.kernels.tolerance.attention_bounds`).
"""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from helpers.cuda_checks import capture_after_warmup  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import tidar_kernels as tk  # noqa: E402
from tidar_kernels.kernels import backends  # noqa: E402
from tidar_kernels.kernels.backends import reference  # noqa: E402
from tidar_kernels.kernels.mask import Layout, layout_clean_rows, rows_written_to_cache  # noqa: E402
from tidar_kernels.kernels.tolerance import assert_close_by_rule, attention_bounds  # noqa: E402

DEVICE = torch.device("cpu" if INTERPRET else "cuda")
TRITON = backends.load("triton")
# Tests that need the real compiler on a GPU (not the interpreter).
needs_compiler = pytest.mark.skipif(INTERPRET, reason="needs the Triton compiler: run without TRITON_INTERPRET")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=[pytest.mark.gpu, needs_compiler])]
HEAD_DIM = 16 if INTERPRET else 64  # small on the interpreter; model sizes in the gpu tests


def randn(*shape, dtype):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float32).to(dtype)


# ----------------------------------------------------------------------------
# The same math in a chosen dtype (fp64 = ground truth; kernel dtype = PyTorch's error)
# ----------------------------------------------------------------------------


def attention_math(q, k, v, allowed, scale, dtype, dout=None):
    """Output (and, given ``dout``, dq, dk, dv) of masked attention computed entirely in ``dtype``."""
    inputs = [t.detach().to(dtype).requires_grad_(dout is not None) for t in (q, k, v)]
    out, _ = reference.masked_attention(*inputs, allowed, scale, dtype=dtype)
    if dout is None:
        return (out,)
    return (out, *torch.autograd.grad(out, inputs, dout.to(dtype)))


def check_training(layout, seq_len, block_size, heads, dtype, batch=2, head_dim=HEAD_DIM, backward=True):
    """Forward (and backward) of the cache-free op against fp64 and kernel-dtype PyTorch math."""
    num_rows = 2 * seq_len if layout == Layout.TRAINING else seq_len
    q_heads, kv_heads = heads
    q = randn(batch, num_rows, q_heads, head_dim, dtype=dtype).requires_grad_(backward)
    k = randn(batch, num_rows, kv_heads, head_dim, dtype=dtype).requires_grad_(backward)
    v = randn(batch, num_rows, kv_heads, head_dim, dtype=dtype).requires_grad_(backward)
    if layout == Layout.TRAINING:
        out = tk.training_attention(q, k, v, block_size, backend="triton")
    else:
        out = tk.causal_attention(q, k, v, backend="triton")
    assert out.dtype == dtype and out.shape == q.shape
    allowed = reference.attention_mask(layout, num_rows, block_size).to(DEVICE)
    scale = head_dim ** -0.5
    dout = randn(*out.shape, dtype=dtype) if backward else None
    hi = attention_math(q, k, v, allowed, scale, torch.float64, dout)
    lo = attention_math(q, k, v, allowed, scale, dtype, dout)
    bounds = attention_bounds(q, k, v, allowed, scale, dtype, dout)
    assert_close_by_rule(out, hi[0], lo[0], bounds["out"], name="out")
    if backward:
        got = torch.autograd.grad(out, (q, k, v), dout)
        for name, g, h, l in zip(("dq", "dk", "dv"), got, hi[1:], lo[1:]):
            assert g.dtype == dtype
            assert_close_by_rule(g, h, l, bounds[name], name=name)


# ----------------------------------------------------------------------------
# Training and causal attention, forward and backward
# ----------------------------------------------------------------------------

# (seq_len S, block B, (q_heads, kv_heads)): S not a power of two, B = 1..16, GQA 1, 2, 4, 6
TRAINING_CASES = [
    pytest.param(7, 1, (2, 2), id="S7-B1-mha"),
    pytest.param(10, 2, (4, 2), id="S10-B2-gqa2"),
    pytest.param(21, 3, (6, 1), id="S21-B3-gqa6"),
    pytest.param(36, 4, (4, 1), id="S36-B4-gqa4"),
    pytest.param(40, 8, (2, 1), id="S40-B8-gqa2"),
    pytest.param(48, 16, (3, 3), id="S48-B16-mha"),
    pytest.param(150, 6, (2, 1), id="S150-B6-gqa2-multitile", marks=pytest.mark.gpu_quick),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_len,block_size,heads", TRAINING_CASES)
def test_training_forward_backward(seq_len, block_size, heads, dtype):
    check_training(Layout.TRAINING, seq_len, block_size, heads, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_len,heads", [pytest.param(1, (2, 1), id="T1"), pytest.param(37, (6, 2), id="T37"),
                                           pytest.param(133, (4, 4), id="T133-multitile", marks=pytest.mark.gpu_quick)])
def test_causal_forward_backward(seq_len, heads, dtype):
    check_training(Layout.CAUSAL, seq_len, 1, heads, dtype)


def test_training_accepts_strided_inputs():
    """q/k/v as views of one packed projection (non-contiguous strides), head dim not a power of two."""
    qkv = randn(2, 2 * 12, 3, 2, 24, dtype=torch.float32)
    q, k, v = qkv.unbind(2)
    out = tk.training_attention(q, k, v, 4, backend="triton")
    allowed = reference.attention_mask(Layout.TRAINING, 24, 4).to(DEVICE)
    assert_close_by_rule(out, *(attention_math(q, k, v, allowed, 24 ** -0.5, d)[0]
                                for d in (torch.float64, torch.float32)),
                         attention_bounds(q, k, v, allowed, 24 ** -0.5)["out"])


@settings(max_examples=6, deadline=None, derandomize=True)
@given(blocks=st.integers(1, 6), block_size=st.sampled_from([1, 2, 3, 4, 5, 8]),
       group=st.sampled_from([1, 2, 3]), kv_heads=st.integers(1, 2), fp16=st.booleans())
def test_training_random_cases(blocks, block_size, group, kv_heads, fp16):
    check_training(Layout.TRAINING, blocks * block_size, block_size, (group * kv_heads, kv_heads),
                   torch.float16 if fp16 else torch.float32, batch=1)


# ----------------------------------------------------------------------------
# Attention over a KV cache: decode step, prefill, causal append (and the cache write)
# ----------------------------------------------------------------------------


def check_cached(layout, num_rows, block_size, heads, dtype, cache_lens, prompt_lens=None, head_dim=HEAD_DIM,
                 spare=5):
    """One cached call against fp64 / kernel-dtype math, plus the cache-write contract.

    Cache rows past each sequence's length are NaN, so a kernel that reads beyond
    ``n_b`` (even masked, ``0 * NaN``) fails loudly; the references see zeros there.
    """
    batch = len(cache_lens)
    q_heads, kv_heads = heads
    max_len = max(cache_lens) + num_rows + spare
    q = randn(batch, num_rows, q_heads, head_dim, dtype=dtype)
    k_new = randn(batch, num_rows, kv_heads, head_dim, dtype=dtype)
    v_new = randn(batch, num_rows, kv_heads, head_dim, dtype=dtype)
    k_cache = randn(batch, max_len, kv_heads, head_dim, dtype=dtype)
    v_cache = randn(batch, max_len, kv_heads, head_dim, dtype=dtype)
    seqlens = torch.tensor(cache_lens, dtype=torch.int32, device=DEVICE)
    beyond = torch.arange(max_len, device=DEVICE)[None, :] >= seqlens[:, None].long()  # [B, max_len]
    k_cache[beyond], v_cache[beyond] = float("nan"), float("nan")
    k_zeroed, v_zeroed = k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0)
    k_before, v_before = k_cache.clone(), v_cache.clone()

    context = None if prompt_lens is None else torch.tensor(prompt_lens, dtype=torch.int32, device=DEVICE)
    if layout == Layout.DECODE:
        out = tk.decode_attention(q, k_new, v_new, k_cache, v_cache, seqlens, block_size, backend="triton")
    elif layout == Layout.PREFILL:
        out = tk.prefill_attention(q, k_new, v_new, k_cache, v_cache, seqlens, context, block_size,
                                   backend="triton")
    else:
        out = tk.append_attention(q, k_new, v_new, k_cache, v_cache, seqlens, backend="triton")

    clean_rows = layout_clean_rows(Layout(layout), num_rows, block_size)
    allowed = reference.cached_mask(Layout(layout), seqlens, max_len, num_rows, clean_rows, block_size, context)
    keys, values = torch.cat([k_zeroed, k_new], 1), torch.cat([v_zeroed, v_new], 1)
    scale = head_dim ** -0.5
    hi, lo = (attention_math(q, keys, values, allowed, scale, d)[0] for d in (torch.float64, dtype))
    assert out.dtype == dtype and out.shape == q.shape
    assert_close_by_rule(out, hi, lo, attention_bounds(q, keys, values, allowed, scale)["out"], name="out")

    written = rows_written_to_cache(Layout(layout), num_rows, block_size)
    for b, n in enumerate(cache_lens):
        for name, cache, before, new in (("k_cache", k_cache, k_before, k_new), ("v_cache", v_cache, v_before, v_new)):
            assert torch.equal(cache[b, n:n + written], new[b, :written]), f"{name}[{b}] rows [n, n+W) != new rows"
            untouched = torch.cat([cache[b, :n], cache[b, n + written:]])
            expected = torch.cat([before[b, :n], before[b, n + written:]])
            torch.testing.assert_close(untouched, expected, rtol=0, atol=0, equal_nan=True,
                                       msg=f"{name}[{b}] changed outside [n, n+W)")
    assert seqlens.tolist() == list(cache_lens)


# (k, cache lengths per sequence, (q_heads, kv_heads)): k = 1, 2, 3, 4, 8, 16; GQA 1, 2, 4, 6
DECODE_CASES = [
    pytest.param(1, (0, 1, 37), (2, 2), id="k1-n0,1,37-mha", marks=pytest.mark.gpu_quick),
    pytest.param(2, (5, 0), (4, 2), id="k2-n5,0-gqa2"),
    pytest.param(3, (37, 1, 0), (6, 1), id="k3-n37,1,0-gqa6"),
    pytest.param(4, (1029, 3), (8, 2), id="k4-n1029,3-gqa4-split", marks=pytest.mark.gpu_quick),
    pytest.param(8, (1, 600), (2, 2), id="k8-n1,600-mha-split"),
    pytest.param(16, (37,), (2, 1), id="k16-n37-gqa2", marks=pytest.mark.gpu_quick),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("draft_len,cache_lens,heads", DECODE_CASES)
def test_decode_step(draft_len, cache_lens, heads, dtype):
    check_cached(Layout.DECODE, draft_len + draft_len * draft_len, draft_len, heads, dtype, cache_lens)


# (padded prompt P, k, real prompt lengths, cache lengths, heads)
PREFILL_CASES = [
    pytest.param(24, 4, (24, 1, 13), (0, 0, 0), (4, 2), id="P24-k4-empty-cache"),
    pytest.param(37, 3, (37, 20), (5, 600), (4, 1), id="P37-k3-cached-split", marks=pytest.mark.gpu_quick),
    pytest.param(1, 1, (1,), (0,), (2, 2), id="P1-k1"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padded,draft_len,prompt_lens,cache_lens,heads", PREFILL_CASES)
def test_prefill(padded, draft_len, prompt_lens, cache_lens, heads, dtype):
    check_cached(Layout.PREFILL, padded + draft_len, draft_len, heads, dtype, cache_lens, prompt_lens)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows,cache_lens,heads", [
    pytest.param(1, (0, 9, 1030), (4, 2), id="T1-ar-step", marks=pytest.mark.gpu_quick),
    pytest.param(7, (3, 40), (6, 6), id="T7-append")])
def test_causal_append(num_rows, cache_lens, heads, dtype):
    check_cached(Layout.CAUSAL, num_rows, 1, heads, dtype, cache_lens)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(draft_len=st.integers(1, 5), lengths=st.lists(st.integers(0, 600), min_size=1, max_size=3),
       group=st.sampled_from([1, 2, 4]), kv_heads=st.integers(1, 2), fp16=st.booleans())
def test_decode_random_cases(draft_len, lengths, group, kv_heads, fp16):
    check_cached(Layout.DECODE, draft_len + draft_len * draft_len, draft_len, (group * kv_heads, kv_heads),
                 torch.float16 if fp16 else torch.float32, tuple(lengths))


@settings(max_examples=5, deadline=None, derandomize=True)
@given(padded=st.integers(1, 30), draft_len=st.integers(1, 4), data=st.data())
def test_prefill_random_cases(padded, draft_len, data):
    batch = data.draw(st.integers(1, 3), label="batch")
    prompts = data.draw(st.lists(st.integers(1, padded), min_size=batch, max_size=batch), label="prompt_lens")
    cached = data.draw(st.lists(st.integers(0, 300), min_size=batch, max_size=batch), label="cache_lens")
    check_cached(Layout.PREFILL, padded + draft_len, draft_len, (2, 1), torch.float32, tuple(cached), tuple(prompts))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_cases_split_on_the_interpreter(dtype):
    """The cases named "-split" above run the split path and merge on the interpreter's small
    GPU (``INTERPRETER_SM_COUNT`` SMs): the planner, from static sizes only, splits them."""
    from tidar_kernels.kernels.backends import triton_ops
    device = triton_ops.device_figures(torch.device("cpu"))
    spare = 5  # check_cached's default
    cases = [(Layout.DECODE, k + k * k, k, lens, heads) for k, lens, heads in
             (case.values for case in DECODE_CASES if case.id.endswith("-split"))]
    cases += [(Layout.PREFILL, padded + k, k, lens, heads) for padded, k, _, lens, heads in
              (case.values for case in PREFILL_CASES if case.id.endswith("-split"))]
    assert len(cases) == 3
    for layout, num_rows, block, lens, (q_heads, kv_heads) in cases:
        plan = triton_ops.plan_cached(dtype, len(lens), num_rows, q_heads, kv_heads, HEAD_DIM,
                                      max(lens) + num_rows + spare, rows_written_to_cache(layout, num_rows, block),
                                      device)
        assert plan.splits > 1, (layout, num_rows, lens, plan)


# ----------------------------------------------------------------------------
# Registration and selection
# ----------------------------------------------------------------------------

# The interpreter runs kernels eagerly on real memory; FakeTensors have none, so the
# fake-tensor / AOT-dispatch checks of opcheck only work with the compiler (GPU).
OPCHECK_UTILS = ("test_schema", "test_autograd_registration") if INTERPRET else (
    "test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.gpu_quick
def test_opcheck_every_triton_op():
    q, k, v = (randn(2, 12, h, 16, dtype=torch.float32) for h in (4, 2, 2))
    q.requires_grad_()
    torch.library.opcheck(torch.ops.tidar.attention_fwd_triton.default, (q, k, v, 1, 2, 0.3),
                          test_utils=OPCHECK_UTILS)
    out, lse = torch.ops.tidar.attention_fwd_triton(q, k, v, 1, 2, 0.3)
    torch.library.opcheck(torch.ops.tidar.attention_bwd_triton.default,
                          (torch.randn_like(out), q.detach(), k, v, out.detach(), lse.detach(), 1, 2, 0.3),
                          test_utils=OPCHECK_UTILS)
    qd, kd, vd = (randn(2, 6, h, 16, dtype=torch.float32) for h in (4, 2, 2))
    k_cache, v_cache = (randn(2, 300, 2, 16, dtype=torch.float32) for _ in range(2))
    seqlens = torch.tensor([0, 290], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(torch.ops.tidar.cached_attention_triton.default,
                          (qd, kd, vd, k_cache, v_cache, seqlens, None, int(Layout.DECODE), 2, 0.3),
                          test_utils=OPCHECK_UTILS)
    prompts = torch.tensor([3, 1], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(torch.ops.tidar.cached_attention_triton.default,
                          (qd, kd, vd, k_cache, v_cache, seqlens, prompts, int(Layout.PREFILL), 2, 0.3),
                          test_utils=OPCHECK_UTILS)


@pytest.mark.gpu_quick
def test_backend_support_matrix():
    assert TRITON is not None and TRITON.name == "triton" and TRITON.accept_drafts is None
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    call = backends.Call(backends.ATTENTION, cuda, torch.bfloat16, 128, int(Layout.TRAINING))
    assert TRITON.supports(call)
    assert TRITON.supports(call._replace(head_dim=64, dtype=torch.float16))
    assert not TRITON.supports(call._replace(head_dim=256))
    assert not TRITON.supports(call._replace(dtype=torch.float64))
    # the interpreter: named only, fp32/fp16 only
    assert TRITON.supports(call._replace(device=cpu, dtype=torch.float32)) == INTERPRET
    assert not TRITON.supports(call._replace(device=cpu, dtype=torch.bfloat16))
    assert backends.select(call._replace(device=cpu, dtype=torch.float32), None).name == "reference"


def test_validation_runs_before_the_triton_backend():
    """Bad input is the public op's to reject (ops.py), before any kernel writes the cache."""
    q, k_new, v_new = (randn(1, 6, h, 16, dtype=torch.float32) for h in (2, 1, 1))
    k_cache, v_cache = (randn(1, 9, 1, 16, dtype=torch.float32) for _ in range(2))
    k_before = k_cache.clone()
    seqlens = torch.tensor([8], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="cache overflow"):
        tk.decode_attention(q, k_new, v_new, k_cache, v_cache, seqlens, 2, backend="triton")
    with pytest.raises(ValueError, match="q.shape\\[1\\] must be k \\+ k\\*k"):
        tk.decode_attention(q, k_new, v_new, k_cache, v_cache, seqlens, 3, backend="triton")
    assert torch.equal(k_cache, k_before)


def test_unsupported_calls_raise_naming_the_backend():
    q = randn(1, 4, 1, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="backend='triton' does not support"):
        tk.causal_attention(q, q, q, backend="triton")


# ----------------------------------------------------------------------------
# GPU only: model head dims, CUDA graphs, torch.compile
# ----------------------------------------------------------------------------


@pytest.mark.gpu
@needs_compiler
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("heads", [pytest.param((12, 2), id="qwen1.5b", marks=pytest.mark.gpu_quick),
                                   pytest.param((32, 8), id="qwen8b")])
def test_model_shapes(heads, dtype, head_dim):
    check_training(Layout.TRAINING, 520, 8, heads, dtype, batch=1, head_dim=head_dim)
    check_cached(Layout.DECODE, 16 + 256, 16, heads, dtype, (0, 4093, 1000), head_dim=head_dim)
    check_cached(Layout.DECODE, 4 + 16, 4, heads, dtype, (16381,), head_dim=head_dim)
    check_cached(Layout.PREFILL, 1000 + 8, 8, heads, dtype, (0, 100), (1000, 377), head_dim=head_dim)


@pytest.mark.gpu
@pytest.mark.gpu_quick
@needs_compiler
@pytest.mark.parametrize("tma", [False, True], ids=["pointer", "tma"])
def test_decode_step_cuda_graph_replay_with_changing_lengths(monkeypatch, tma):
    """A replay with new lengths equals an eager call; with the opt-in TMA cache loop (sm_90+) the
    descriptors' scratch also comes from the allocator inside the capture."""
    if tma:
        if torch.cuda.get_device_capability() < (9, 0):
            pytest.skip("TMA needs sm_90+")
        from tidar_kernels.kernels.backends import triton_ops
        monkeypatch.setattr(triton_ops, "TMA_REQUESTED", True)
    draft_len, batch, heads, head_dim, max_len = 4, 3, (12, 2), 128, 2048
    rows = draft_len + draft_len * draft_len
    dtype = torch.bfloat16
    q, k_new, v_new = (randn(batch, rows, h, head_dim, dtype=dtype) for h in (heads[0], heads[1], heads[1]))
    k_cache, v_cache = (randn(batch, max_len, heads[1], head_dim, dtype=dtype) for _ in range(2))
    seqlens = torch.tensor([5, 0, 900], dtype=torch.int32, device=DEVICE)

    def step():
        return tk.decode_attention(q, k_new, v_new, k_cache, v_cache, seqlens, draft_len, backend="triton",
                                   check_lengths=False)

    graph, out = capture_after_warmup(step)
    for lengths in ([7, 1, 1500], [0, 2000, 33], [1024, 1023, 0]):
        seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        # The replay must do exactly what an eager call with these lengths does
        # (whose accuracy the tests above check): same output bits, same cache writes.
        k_eager, v_eager = k_cache.clone(), v_cache.clone()
        expected = tk.decode_attention(q, k_new, v_new, k_eager, v_eager, seqlens, draft_len, backend="triton")
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected), f"replay output differs from eager for cache_seqlens={lengths}"
        assert torch.equal(k_cache, k_eager) and torch.equal(v_cache, v_eager)


@pytest.mark.gpu
@pytest.mark.gpu_quick
@needs_compiler
def test_torch_compile_fullgraph_over_triton_ops():
    q, k, v = (randn(2, 64, h, 64, dtype=torch.bfloat16).requires_grad_() for h in (6, 2, 2))

    def train_step(a, b, c):
        return tk.training_attention(a, b, c, 4, backend="triton").float().square().sum()

    loss = torch.compile(train_step, fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_eager = train_step(q, k, v)
    expected = torch.autograd.grad(loss_eager, (q, k, v))
    torch.testing.assert_close(loss, loss_eager)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)

    draft_len = 3
    rows = draft_len + draft_len * draft_len
    qd, kd, vd = (randn(2, rows, h, 64, dtype=torch.bfloat16) for h in (6, 2, 2))
    k_cache, v_cache = (randn(2, 512, 2, 64, dtype=torch.bfloat16) for _ in range(2))
    seqlens = torch.tensor([3, 400], dtype=torch.int32, device=DEVICE)

    def decode(q_, k_new, v_new, k_cache_, v_cache_, lengths):
        return tk.decode_attention(q_, k_new, v_new, k_cache_, v_cache_, lengths, draft_len, backend="triton")

    eager_cache = (k_cache.clone(), v_cache.clone())
    expected = decode(qd, kd, vd, *eager_cache, seqlens)
    got = torch.compile(decode, fullgraph=True)(qd, kd, vd, k_cache, v_cache, seqlens)
    torch.testing.assert_close(got, expected)
    assert torch.equal(k_cache, eager_cache[0]) and torch.equal(v_cache, eager_cache[1])
