"""The PyTorch reference ops against SDPA with the dense mask, their cache writes,
torch.library registration (opcheck, torch.compile) and backend selection.

Accuracy uses the one tolerance rule (tidar_kernels/kernels/tolerance.py) with SDPA as the
independent ground truth: SDPA in fp64 is ``reference_hi``, SDPA in the input dtype
``reference_lo``, and the bound is attention's forward-error bound."""
import pytest
import torch
import torch.nn.functional as F

import tidar_kernels as tk
from tidar_kernels.kernels import backends
from tidar_kernels.kernels import mask as mask_rule
from tidar_kernels.kernels.backends import reference
from tidar_kernels.kernels.tolerance import assert_close_by_rule, attention_bounds

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
GQA = [pytest.param((4, 4), id="mha"), pytest.param((6, 2), id="gqa3"), pytest.param((8, 1), id="mqa")]


def sdpa(q, k, v, allowed, scale=None, dtype=torch.float64):
    """SDPA on [B, T, H, D] with GQA expanded and a dense bool mask [B|1, 1, Tq, Tk] or [Tq, Tk], in ``dtype``."""
    qh = q.to(dtype).transpose(1, 2)
    kh = reference.expand_kv_heads(k, q.shape[2]).to(dtype).transpose(1, 2)
    vh = reference.expand_kv_heads(v, q.shape[2]).to(dtype).transpose(1, 2)
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=scale).transpose(1, 2)


def assert_matches_sdpa(out, q, k, v, allowed, scale=None):
    """``out`` against SDPA by the tolerance rule (fp64 SDPA, SDPA in out's dtype, attention's bound)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bound = attention_bounds(q, k, v, allowed, scale, out.dtype)["out"]
    assert_close_by_rule(out, sdpa(q, k, v, allowed, scale), sdpa(q, k, v, allowed, scale, out.dtype), bound)


def qkv(batch, rows, heads, dtype, head_dim=24):
    q_heads, kv_heads = heads
    return (torch.randn(batch, rows, q_heads, head_dim, dtype=dtype),
            torch.randn(batch, rows, kv_heads, head_dim, dtype=dtype),
            torch.randn(batch, rows, kv_heads, head_dim, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", GQA)
@pytest.mark.parametrize("seq_len,block", [(5, 1), (6, 3), (7, 7)], ids=["S5B1", "S6B3", "S7B7"])
def test_training_attention_matches_sdpa(dtype, heads, seq_len, block):
    q, k, v = qkv(2, 2 * seq_len, heads, dtype)
    out = tk.training_attention(q, k, v, block)
    assert out.dtype == dtype
    assert_matches_sdpa(out, q, k, v, tk.training_mask(seq_len, block))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", GQA)
def test_causal_attention_matches_sdpa_is_causal(dtype, heads):
    q, k, v = qkv(2, 13, heads, dtype)
    assert_matches_sdpa(tk.causal_attention(q, k, v), q, k, v, tk.causal_mask(13))


def make_cache(batch, max_len, kv_heads, head_dim, dtype):
    k_cache = torch.randn(batch, max_len, kv_heads, head_dim, dtype=dtype)
    return k_cache, torch.randn_like(k_cache)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", GQA)
@pytest.mark.parametrize("draft_len", [1, 2, 3, 5], ids=lambda k: f"k{k}")
def test_decode_attention_matches_sdpa_and_writes_only_draft_rows(dtype, heads, draft_len):
    k_ = draft_len
    rows = k_ + k_ * k_
    lengths = [0, 1, 37]
    q, k_new, v_new = qkv(len(lengths), rows, heads, dtype)
    k_cache, v_cache = make_cache(len(lengths), 37 + k_ + 3, heads[1], q.shape[-1], dtype)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    out = tk.decode_attention(q, k_new, v_new, k_cache, v_cache, seqlens, draft_len)
    for b, n in enumerate(lengths):
        keys = torch.cat([k_before[b, :n], k_new[b]])[None]
        values = torch.cat([v_before[b, :n], v_new[b]])[None]
        assert_matches_sdpa(out[b:b + 1], q[b:b + 1], keys, values, tk.decode_mask(n, draft_len))
        # drafts written at [n, n+k); everything else untouched (mask rows never cached)
        assert torch.equal(k_cache[b, n:n + k_], k_new[b, :k_]) and torch.equal(v_cache[b, n:n + k_], v_new[b, :k_])
        assert torch.equal(k_cache[b, :n], k_before[b, :n]) and torch.equal(k_cache[b, n + k_:], k_before[b, n + k_:])
        assert torch.equal(v_cache[b, n + k_:], v_before[b, n + k_:])
    assert seqlens.tolist() == lengths  # commit is not this op's job


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_attention_matches_sdpa_with_padded_prompts(dtype):
    draft_len, padded, prompts, cached = 3, 6, [6, 2, 4], [0, 5, 1]
    q, k_new, v_new = qkv(3, padded + draft_len, (4, 2), dtype)
    k_cache, v_cache = make_cache(3, 16, 2, q.shape[-1], dtype)
    k_before = k_cache.clone()
    out = tk.prefill_attention(q, k_new, v_new, k_cache, v_cache, torch.tensor(cached, dtype=torch.int32),
                               torch.tensor(prompts, dtype=torch.int32), draft_len)
    for b, (length, n) in enumerate(zip(prompts, cached)):
        # real rows of sequence b: its prompt then its mask block, with the token-rule mask
        keys = torch.cat([k_before[b, :n], k_new[b, :length], k_new[b, padded:]])[None]
        values = torch.cat([v_cache[b, :n], v_new[b, :length], v_new[b, padded:]])[None]
        rows = list(range(length)) + list(range(padded, padded + draft_len))
        toks = mask_rule.clean_tokens(0, n + length).cat(mask_rule.mask_block_tokens(n + length, draft_len, 0, n + length))
        allowed = mask_rule.may_attend(mask_rule.Tokens(*(t[n:] for t in (toks.is_mask, toks.pos, toks.block, toks.ctx))),
                                     toks)
        assert_matches_sdpa(out[b:b + 1, rows], q[b:b + 1, rows], keys, values, allowed)
        assert torch.equal(k_cache[b, n:n + padded], k_new[b, :padded])
        assert torch.equal(k_cache[b, n + padded:], k_before[b, n + padded:])


def test_append_attention_matches_causal_over_cache():
    q, k_new, v_new = qkv(2, 4, (6, 2), torch.float32)
    k_cache, v_cache = make_cache(2, 12, 2, q.shape[-1], torch.float32)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    lengths = [3, 8]
    out = tk.append_attention(q, k_new, v_new, k_cache, v_cache, torch.tensor(lengths, dtype=torch.int32))
    for b, n in enumerate(lengths):
        keys = torch.cat([k_before[b, :n], k_new[b]])[None]
        values = torch.cat([v_before[b, :n], v_new[b]])[None]
        allowed = torch.ones(4, n + 4, dtype=torch.bool).tril(diagonal=n)
        assert_matches_sdpa(out[b:b + 1], q[b:b + 1], keys, values, allowed)
        assert torch.equal(k_cache[b, n:n + 4], k_new[b])


def test_training_backward_matches_autograd_through_float64_math():
    q, k, v = (t.requires_grad_() for t in qkv(2, 12, (6, 2), torch.float32))
    out = tk.training_attention(q, k, v, 3)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    allowed, scale = tk.training_mask(6, 3), q.shape[-1] ** -0.5

    def grads(dtype):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        result, _ = reference.masked_attention(*inputs, allowed, scale, dtype=dtype)
        return torch.autograd.grad(result, inputs, grad_out.to(dtype))

    bounds = attention_bounds(q, k, v, allowed, scale, torch.float32, grad_out)
    for name, g, hi, lo in zip(("dq", "dk", "dv"), got, grads(torch.float64), grads(torch.float32)):
        assert_close_by_rule(g, hi, lo, bounds[name], name=name)


def test_opcheck_every_reference_op():
    q, k, v = qkv(2, 8, (4, 2), torch.float32)
    q.requires_grad_()
    torch.library.opcheck(torch.ops.tidar.attention_fwd_reference.default, (q, k, v, 1, 2, 0.3))
    out, lse = torch.ops.tidar.attention_fwd_reference(q, k, v, 1, 2, 0.3)
    torch.library.opcheck(torch.ops.tidar.attention_bwd_reference.default,
                          (torch.randn_like(out).detach(), q.detach(), k, v, out.detach(), lse.detach(), 1, 2, 0.3))
    k_, rows = 2, 6
    qd, kd, vd = qkv(2, rows, (4, 2), torch.float32)
    k_cache, v_cache = make_cache(2, 10, 2, qd.shape[-1], torch.float32)
    seqlens = torch.tensor([0, 5], dtype=torch.int32)
    torch.library.opcheck(torch.ops.tidar.cached_attention_reference.default,
                          (qd, kd, vd, k_cache, v_cache, seqlens, None, 3, k_, 0.3))
    drafts = torch.randint(0, 11, (2, 3))
    logits = torch.randn(2, 3, 11)
    torch.library.opcheck(torch.ops.tidar.accept_drafts_reference.default,
                          (drafts, logits, torch.randn(2, 3, 11), seqlens.clone(), None, 0.5))


def test_torch_compile_fullgraph_over_public_ops():
    q, k, v = qkv(1, 8, (4, 2), torch.float32)
    compiled_training = torch.compile(lambda a, b, c: tk.training_attention(a, b, c, 2), fullgraph=True)
    torch.testing.assert_close(compiled_training(q, k, v), tk.training_attention(q, k, v, 2))

    k_, rows = 2, 6
    qd, kd, vd = qkv(2, rows, (4, 2), torch.float32)
    k_cache, v_cache = make_cache(2, 10, 2, qd.shape[-1], torch.float32)
    seqlens = torch.tensor([1, 4], dtype=torch.int32)

    def step(q_, k_new, v_new, k_cache_, v_cache_, lengths):
        out = tk.decode_attention(q_, k_new, v_new, k_cache_, v_cache_, lengths, k_)
        accepted, targets = tk.accept_drafts(torch.zeros(2, k_, dtype=torch.long), out[:, :k_, 0, :5],
                                             out[:, k_::k_, 0, :5], lengths, beta=0.5)
        return out, accepted, targets

    eager_cache = (k_cache.clone(), v_cache.clone(), seqlens.clone())
    expected = step(qd, kd, vd, *eager_cache)
    got = torch.compile(step, fullgraph=True)(qd, kd, vd, k_cache, v_cache, seqlens)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    assert torch.equal(k_cache, eager_cache[0]) and torch.equal(seqlens, eager_cache[2])


def test_backend_selection(monkeypatch):
    call = backends.Call(backends.CACHED_ATTENTION, torch.device("cpu"), torch.float32, 16, 3)
    assert backends.select(call, None).name == "cpu"  # the CPU decode path serves the cached op
    training = call._replace(op=backends.ATTENTION, layout=1)
    assert backends.select(training, None).name == "reference"  # and nothing else
    monkeypatch.setenv(backends.ENV_VAR, "cuda")  # a preference: falls back when it cannot serve the call
    assert backends.select(call, None).name == "cpu"
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.select(call, None).name == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="TIDAR_BACKEND"):
        backends.select(call, None)
    monkeypatch.delenv(backends.ENV_VAR)
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.select(call, "fast")
    with pytest.raises(ValueError, match="backend='cuda'"):
        backends.select(call, "cuda")  # strict when named: no CUDA tensors here


def test_cuda_backend_is_never_picked_automatically(monkeypatch):
    """Until validated on a GPU the CUDA kernels are opt-in: automatic selection on CUDA
    tensors gives Triton (or the reference), never "cuda"; naming it still works."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    cuda = torch.device("cuda")
    decode = backends.Call(backends.CACHED_ATTENTION, cuda, torch.float16, 64, 3)
    accept = backends.Call(backends.ACCEPT_DRAFTS, cuda, torch.float16, 0, 3)
    assert backends.select(decode, None).name == ("triton" if backends.load("triton") else "reference")
    assert backends.select(accept, None).name == "reference"  # Triton has no accept kernel
    if backends.load("cuda") is not None:
        assert backends.load("cuda").automatic_on == ()
    if backends.load("cuda") is not None and torch.cuda.is_available():  # supports() asks the device
        monkeypatch.setenv(backends.ENV_VAR, "cuda")
        assert backends.select(decode, None).name == "cuda"
