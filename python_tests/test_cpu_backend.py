"""The CPU decode path (backend "cpu") against the reference's contract.

The shared cached-op tests (NaN-poisoned unused rows, paged caches) already run it
on ragged batches; here the paths only it has: equal cache lengths read through
views, the per-shape step mask, the slice-copy cache write, every float dtype, odd
head sizes and GQA groups, and whole decode loops equal to the reference's tokens.
"""
import pytest
import torch

from helpers.cached_cases import check_cached_call
from tidar_kernels.kernels import ops
from tidar_kernels.kernels.backends import cpu, reference
from tidar_kernels.kernels.mask import Layout, layout_clean_rows
from tidar_kernels.kernels.tolerance import assert_close_by_rule, attention_bounds
from tidar_kernels.model.generate import ar_generate, linear_spec_generate, tidar_generate
from tidar_kernels.model.transformer import Transformer, TransformerConfig

# (layout, cache lengths, (q_heads, kv_heads), draft_len, padded rows, prompt lengths)
EQUAL_LENGTH_CASES = {
    "decode-k1": (Layout.DECODE, (9,), (2, 1), 1, 1, None),
    "decode-k4-batch3": (Layout.DECODE, (17, 17, 17), (6, 2), 4, 1, None),
    "append-T1": (Layout.CAUSAL, (30, 30), (9, 3), 1, 1, None),
    "append-T7-empty-cache": (Layout.CAUSAL, (0, 0), (4, 4), 1, 7, None),
    "prefill-P6-k3": (Layout.PREFILL, (0, 0), (3, 1), 3, 6, (6, 6)),
    "prefill-ragged-prompts": (Layout.PREFILL, (4, 4), (2, 1), 2, 5, (5, 2)),
}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(EQUAL_LENGTH_CASES))
def test_equal_lengths_every_dtype(case, dtype):
    layout, lens, heads, draft_len, padded, prompts = EQUAL_LENGTH_CASES[case]
    check_cached_call("cpu", layout, lens, heads, dtype=dtype, draft_len=draft_len, padded=padded,
                      prompt_lens=prompts, head_dim=24)


@pytest.mark.parametrize("head_dim", [8, 40, 72])
@pytest.mark.parametrize("lens", [(5, 5), (0, 13, 2)], ids=["equal", "ragged"])
def test_odd_head_dims_and_groups(lens, head_dim):
    check_cached_call("cpu", Layout.DECODE, lens, (6, 2), draft_len=3, head_dim=head_dim, poison="inf")
    check_cached_call("cpu", Layout.CAUSAL, lens, (5, 1), padded=3, head_dim=head_dim, poison="-inf")


@pytest.mark.parametrize("lens", [(11, 11), (0, 0), (3, 9)], ids=["equal", "empty", "ragged"])
def test_read_only_block(lens):
    """Linear mode's draft block: every row sees cache [0, n_b) and the whole block; nothing is written."""
    gen = torch.Generator().manual_seed(sum(lens))
    batch, rows, heads, kv_heads, dim, max_len = len(lens), 5, 4, 2, 24, 16
    q, k, v = (torch.randn(batch, rows, h, dim, generator=gen) for h in (heads, kv_heads, kv_heads))
    caches = [torch.randn(batch, max_len, kv_heads, dim, generator=gen) for _ in range(2)]
    lengths = torch.tensor(lens, dtype=torch.int32)
    unused = torch.arange(max_len)[None, :] >= lengths[:, None].long()
    for cache in caches:
        cache[unused] = float("nan")
    before = [c.clone() for c in caches]
    out = ops.block_attention(q, k, v, *caches, lengths, backend="cpu")
    keys, values = (torch.cat([torch.where(unused[..., None, None], 0.0, c), new], 1) for c, new in zip(before, (k, v)))
    allowed = torch.cat([~unused, torch.ones(batch, rows, dtype=torch.bool)], 1)[:, None, None, :]
    hi, lo = (reference.masked_attention(q.to(d), keys.to(d), values.to(d), allowed, dim ** -0.5, dtype=d)[0]
              for d in (torch.float64, torch.float32))
    assert_close_by_rule(out, hi, lo, attention_bounds(q, keys, values, allowed, dim ** -0.5)["out"])
    for cache, old in zip(caches, before):
        assert torch.equal(cache.view(torch.int32), old.view(torch.int32))


def test_equal_lengths_read_the_cache_through_views(monkeypatch):
    """No gather and no per-sequence mask when every sequence has the same length (the results of
    that path are checked against fp64 math by test_equal_lengths_every_dtype)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the equal-length path must not gather or build a per-sequence mask")

    q, kv = torch.randn(2, 12, 4, 8), torch.randn(2, 12, 2, 8)
    k_cache, v_cache = torch.randn(2, 20, 2, 8), torch.randn(2, 20, 2, 8)
    monkeypatch.setattr(reference, "gather_cache", refuse)
    monkeypatch.setattr(reference, "cached_mask", refuse)
    out = ops.decode_attention(q, kv, kv, k_cache, v_cache, torch.tensor([7, 7], dtype=torch.int32), 3,
                               backend="cpu")
    assert out.isfinite().all()


@pytest.mark.parametrize("layout, rows, block", [(Layout.DECODE, 12, 3), (Layout.CAUSAL, 5, 1),
                                                 (Layout.PREFILL, 7, 3)])
def test_step_mask_equals_the_reference_mask(layout, rows, block):
    lengths = torch.tensor([6, 6], dtype=torch.int32)
    clean = layout_clean_rows(layout, rows, block)
    context = torch.full((2,), rows - block, dtype=torch.int32) if layout == Layout.PREFILL else None
    fast = cpu.visibility(layout, lengths, 6, rows, clean, block, context, ragged=False)
    slow = reference.cached_mask(layout, lengths, 6, rows, clean, block, context)
    assert torch.equal(fast.expand_as(slow), slow)


def test_write_past_the_capacity_raises_before_any_write():
    k_cache, v_cache = torch.zeros(2, 8, 1, 4), torch.zeros(2, 8, 1, 4)
    new = torch.ones(2, 3, 1, 4)
    with pytest.raises(IndexError, match=r"cache rows \[n_b, n_b \+ 3\) must lie in \[0, 8\)"):
        cpu.write_clean_rows(new, new, k_cache, v_cache, torch.tensor([2, 6], dtype=torch.int32), Layout.CAUSAL, 1,
                             None)
    assert not k_cache.any() and not v_cache.any()


def test_opcheck():
    q, kv = torch.randn(2, 6, 4, 8), torch.randn(2, 6, 2, 8)
    caches = torch.randn(2, 16, 2, 8), torch.randn(2, 16, 2, 8)
    for lengths in ([3, 3], [3, 7]):
        torch.library.opcheck(torch.ops.tidar.cached_attention_cpu.default,
                              (q, kv, kv, *caches, torch.tensor(lengths, dtype=torch.int32), None,
                               int(Layout.DECODE), 2, 0.3))


def test_selected_on_cpu_tensors_for_cached_calls_only(monkeypatch):
    monkeypatch.delenv("TIDAR_BACKEND", raising=False)
    calls = []
    monkeypatch.setattr(cpu, "cached_attention", lambda *args, **kw: calls.append(1) or torch.zeros_like(args[0]))
    q, kv = torch.randn(1, 2, 2, 8), torch.randn(1, 2, 1, 8)
    cache = torch.zeros(1, 8, 1, 8)
    ops.append_attention(q, kv, kv, cache, cache.clone(), torch.zeros(1, dtype=torch.int32))
    assert calls == [1]


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_loops_equal_the_reference_tokens(monkeypatch, batch):
    """Whole loops (AR, TiDAR, linear self-speculation) give the same tokens on the CPU path as on the
    plain reference, and TiDAR's tokens are AR's."""
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=61, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=8,
                               intermediate_size=96, mask_token_id=60, max_seq_len=256)
    model = Transformer(config).eval()
    prompt = torch.randint(0, 60, (batch, 5))

    def run():
        return (ar_generate(model, prompt, max_new_tokens=12).tokens,
                tidar_generate(model, prompt, max_new_tokens=12, draft_len=3).tokens,
                linear_spec_generate(model, prompt, max_new_tokens=12, block_len=4).tokens)

    monkeypatch.delenv("TIDAR_BACKEND", raising=False)
    fast = run()
    monkeypatch.setenv("TIDAR_BACKEND", "reference")
    slow = run()
    for got, want in zip(fast, slow):
        assert torch.equal(got, want)
    assert torch.equal(fast[1], fast[0])


def test_torch_compile_sees_the_op():
    """Traced calls go through the registered op (eager ones skip its dispatch): fullgraph compiles, and
    the compiled step writes the cache like the eager one."""
    q, kv = torch.randn(2, 6, 4, 8), torch.randn(2, 6, 2, 8)
    lengths = torch.tensor([3, 3], dtype=torch.int32)

    def step(q, kv, k_cache, v_cache):
        return ops.decode_attention(q, kv, kv, k_cache, v_cache, lengths, 2, check_lengths=False, backend="cpu")

    eager = [torch.randn(2, 16, 2, 8) for _ in range(2)]
    compiled = [c.clone() for c in eager]
    expected = step(q, kv, *eager)
    got = torch.compile(step, fullgraph=True)(q, kv, *compiled)
    torch.testing.assert_close(got, expected)
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager))
