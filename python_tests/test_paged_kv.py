"""Paged KV cache (docs/paged-kv.md): ``block_table`` in every cached op, the page pool, the decode loops.

Every backend that takes a paged CPU call (the reference; Triton under
``TRITON_INTERPRET=1``) runs each cached op on shuffled pages of sizes 1, 3, 16 and
64 and must return what the contiguous cache gives (tolerance rule against fp64
math), write exactly the new rows through the table and leave every other row and
page (NaN-poisoned) untouched; see :func:`helpers.cached_cases.check_cached_call`. The CUDA
kernel's decode step gets the same checks on the CPU through the ``cuda_emulated``
backend (pages 1 to 256; fp16 and bf16; head dims 64 and 128; GQA), its
paged output bit-identical to the contiguous call's. Bad tables raise before anything
is written; the loops on a paged cache emit the contiguous loops' tokens.
"""
import pytest
import torch
from helpers.cached_cases import INTERPRET, check_cached_call, cpu_cached_backends
from helpers.cuda_checks import assert_steps_never_sync, capture_after_warmup
from helpers.models import tiny_with_vocab
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import tidar_kernels as tk
from tidar_kernels.kernels import backends
from tidar_kernels.kernels.backends import reference
from tidar_kernels.kernels.backends.cuda_kernels import kernels_support
from tidar_kernels.model.generate import ar_generate, pad_prompts, tidar_generate
from tidar_kernels.model.kv_cache import KVCache, PagedKVCache
from tidar_kernels.kernels.mask import Layout
from tidar_kernels.kernels.validation import MAX_PAGE_SIZE

pytestmark = pytest.mark.usefixtures("one_thread")

PAGED_BACKENDS = cpu_cached_backends(paged=True)
PAGE_SIZES = [1, 3, 16, 64]
OPS = {
    # (layout, cache lengths, (q_heads, kv_heads), draft_len, padded rows, prompt lengths)
    "decode-k3": (Layout.DECODE, (0, 5, 70), (4, 2), 3, 1, None),
    "prefill-P9-k2": (Layout.PREFILL, (0, 17, 40), (6, 2), 2, 9, (9, 1, 4)),
    "append-T1": (Layout.CAUSAL, (1, 0, 66), (2, 2), 1, 1, None),
    "append-T5": (Layout.CAUSAL, (12, 3), (4, 1), 1, 5, None),
}


# ----------------------------------------------------------------------------
# The ops: paged == contiguous, writes through the table, nothing else touched
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", PAGE_SIZES, ids=lambda p: f"page{p}")
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", PAGED_BACKENDS)
def test_paged_equals_contiguous(backend, op, page_size):
    layout, lens, heads, draft_len, padded, prompts = OPS[op]
    check_cached_call(backend, layout, lens, heads, draft_len=draft_len, padded=padded, prompt_lens=prompts,
                      page_size=page_size, seed=page_size)


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
def test_paged_long_cache_fp16(backend):
    """Capacity >= 512 rows: Triton splits the cache (flash-decoding) across pages; fp16."""
    check_cached_call(backend, Layout.DECODE, (600, 3), (4, 2), dtype=torch.float16, draft_len=4, page_size=64)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(backend=st.sampled_from(PAGED_BACKENDS), page_size=st.sampled_from(PAGE_SIZES),
       layout=st.sampled_from([Layout.DECODE, Layout.CAUSAL]), draft_len=st.integers(1, 4),
       lens=st.lists(st.integers(0, 90), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_paged_random_cases(backend, page_size, layout, draft_len, lens, seed):
    padded = draft_len if layout == Layout.CAUSAL else 1
    check_cached_call(backend, layout, tuple(lens), (2, 1), draft_len=draft_len, padded=padded,
                      page_size=page_size, seed=seed)


def test_reference_reading_the_whole_capacity_ignores_garbage(monkeypatch):
    """On a GPU the reference reads the static capacity (no sync): rows past n still never matter."""
    assert reference.read_span(torch.zeros(2, dtype=torch.int32, device="meta"), 77) == 77
    monkeypatch.setattr(reference, "read_span", lambda lengths, capacity: capacity)
    check_cached_call("reference", Layout.DECODE, (3, 20), (2, 1), draft_len=2, page_size=3, poison="nan")
    check_cached_call("reference", Layout.CAUSAL, (0, 9), (2, 1), padded=4, page_size=1, poison="-inf")


# ----------------------------------------------------------------------------
# The CUDA kernel's decode step on pages, on the CPU (cuda_emulated backend)
# ----------------------------------------------------------------------------

needs_emulated = pytest.mark.skipif(backends.load("cuda_emulated") is None,
                                    reason="the emulated extension tidar_kernels._C_emulated is not built")
FP16, BF16 = torch.float16, torch.bfloat16
KERNEL_CASES = {
    # id: (page_size, dtype, head_dim, (q_heads, kv_heads), draft_len, cache lengths, forced cache splits)
    "page1-fp16-d64-gqa2": (1, FP16, 64, (4, 2), 3, (0, 5, 70), None),
    "page3-bf16-d128-gqa3-3splits": (3, BF16, 128, (6, 2), 2, (130, 1), 3),  # splits start mid-page
    "page16-bf16-d64-gqa8": (16, BF16, 64, (8, 1), 4, (100, 0), None),
    "page64-fp16-d128-mha-3splits": (64, FP16, 128, (2, 2), 2, (150, 61), 3),  # a key tile = one page
    "page128-bf16-d64-gqa4": (128, BF16, 64, (4, 1), 1, (200, 3), None),  # two key tiles per page
}


@needs_emulated
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_paged_cuda_kernel_emulated(monkeypatch, case):
    """Paged == contiguous (bit for bit: same kernel, same split plan), drafts written through the
    table into exactly their slots, every other row and page untouched."""
    page_size, dtype, head_dim, heads, draft_len, lens, splits = KERNEL_CASES[case]
    if splits is not None:
        monkeypatch.setenv("TIDAR_FORCE_DECODE_SPLITS", str(splits))
    check_cached_call("cuda_emulated", Layout.DECODE, lens, heads, dtype=dtype, draft_len=draft_len,
                      page_size=page_size, head_dim=head_dim, seed=page_size, exact_twin=True)


@needs_emulated
@settings(max_examples=6, deadline=None, derandomize=True)
@given(page_size=st.sampled_from([1, 3, 16, 64, 128, MAX_PAGE_SIZE]), dtype=st.sampled_from([FP16, BF16]),
       head_dim=st.sampled_from([64, 128]), group=st.sampled_from([1, 2, 3, 4, 6, 8]), draft_len=st.integers(1, 4),
       lens=st.lists(st.integers(0, 150), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_paged_cuda_kernel_emulated_random_cases(page_size, dtype, head_dim, group, draft_len, lens, seed):
    check_cached_call("cuda_emulated", Layout.DECODE, tuple(lens), (group, 1), dtype=dtype, draft_len=draft_len,
                      page_size=page_size, head_dim=head_dim, seed=seed, exact_twin=True)


@needs_emulated
def test_paged_cuda_kernel_emulated_takes_a_strided_table():
    """A column-major block table (any strides without self-overlap) addresses the same pages."""
    draft_len, rows = 2, 6
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, rows, 2, 64, generator=gen).half()
    k_new, v_new = (torch.randn(2, rows, 1, 64, generator=gen).half() for _ in range(2))
    pools = [torch.randn(7, 16, 1, 64, generator=gen).half() for _ in range(2)]
    lengths = torch.tensor([20, 33], dtype=torch.int32)
    row_major = table([[5, 0, 3], [1, 6, 2]])
    column_major = row_major.t().contiguous().t()
    assert column_major.stride() == (1, 2)
    outs, after = [], []
    for block_table in (row_major, column_major):
        k_pool, v_pool = (p.clone() for p in pools)
        outs.append(tk.decode_attention(q, k_new, v_new, k_pool, v_pool, lengths, draft_len, backend="cuda_emulated",
                                        block_table=block_table))
        after.append((k_pool, v_pool))
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(*after))


def check_bad_paged_kernel_input_raises_before_any_write(op, device):
    """The binding's block-table checks (csrc/bindings_common.h, shared by cuda and cuda_emulated),
    called on the op itself (the public ops check first): each raises naming the argument, and
    the pools stay bit-identical."""
    draft_len, rows = 2, 6
    q = torch.randn(2, rows, 4, 64, dtype=torch.float16, device=device)
    k_new, v_new = (torch.randn(2, rows, 2, 64, dtype=torch.float16, device=device) for _ in range(2))
    k_pool, v_pool = (torch.randn(6, 4, 2, 64, dtype=torch.float16, device=device) for _ in range(2))
    before = [k_pool.clone(), v_pool.clone()]
    lengths = torch.tensor([3, 5], dtype=torch.int32, device=device)
    good = torch.tensor([[4, 0, -1], [2, 5, 1]], dtype=torch.int32, device=device)
    args = dict(q=q, k_new=k_new, v_new=v_new, k_cache=k_pool, v_cache=v_pool, cache_seqlens=lengths,
                context_lens=None, layout=int(Layout.DECODE), block_size=draft_len, scale=0.125, block_table=good)

    def call(match, **override):
        with pytest.raises(RuntimeError, match=match):
            op(**{**args, **override})

    if device != "cpu":  # (a meta table among CPU tensors would dispatch to the fake)
        call("block_table must be a CUDA tensor", block_table=good.cpu())
    call("block_table must be an int32 tensor", block_table=good.long())
    call("block_table must be an int32 tensor", block_table=good.flatten())
    call(r"block_table must have shape \[batch=2", block_table=good[:1])
    call(r"max_pages_per_seq >= 1\], got \[2, 0\]", block_table=good[:, :0])
    call("block_table must not overlap itself", block_table=good[:1].expand(2, 3))
    big = torch.zeros(2, MAX_PAGE_SIZE + 1, 2, 64, dtype=torch.float16, device=device)
    call(r"k_cache must be a page pool \[num_pages >= 1, page_size in \[1, 256\]", k_cache=big, v_cache=big.clone())
    call("k_cache must be a page pool", k_cache=k_pool[:, :, :1])
    call("v_cache must have k_cache's shape", v_cache=torch.zeros(6, 5, 2, 64, dtype=torch.float16, device=device))
    tiny = torch.zeros(6, 1, 2, 64, dtype=torch.float16, device=device)
    call(r"max_pages_per_seq \* page_size \(1\) must hold the 2 drafts", k_cache=tiny, v_cache=tiny.clone(),
         block_table=good[:, :1])
    if device != "cpu":
        torch.cuda.synchronize()
    assert torch.equal(k_pool.view(torch.int16), before[0].view(torch.int16))
    assert torch.equal(v_pool.view(torch.int16), before[1].view(torch.int16))
    op(**args)  # the unmodified call runs


@needs_emulated
def test_bad_paged_kernel_input_raises_before_any_write():
    check_bad_paged_kernel_input_raises_before_any_write(torch.ops.tidar.cached_attention_cuda_emulated.default, "cpu")


@needs_emulated
def test_opcheck_paged_kernel_emulated():
    gen = torch.Generator().manual_seed(1)
    q, kv = torch.randn(2, 2, 2, 64, generator=gen).bfloat16(), torch.randn(2, 2, 1, 64, generator=gen).bfloat16()
    pools = [torch.randn(5, 3, 1, 64, generator=gen).bfloat16() for _ in range(2)]
    args = (q, kv, kv, *pools, torch.tensor([2, 4], dtype=torch.int32), None, int(Layout.DECODE), 1, 0.125,
            table([[3, 0, -1], [1, 4, 2]]))
    torch.library.opcheck(torch.ops.tidar.cached_attention_cuda_emulated.default, args)


# ----------------------------------------------------------------------------
# Bad input: a clear error before anything is written
# ----------------------------------------------------------------------------

K, PAGE = 2, 4  # decode draft length, page size


def paged_decode_args(**override):
    """Decode call on 2 sequences of lengths 3 and 5 (+2 drafts: 2 pages each) in a pool of 6 pages."""
    rows = K + K * K
    args = dict(q=torch.randn(2, rows, 4, 8), k_new=torch.randn(2, rows, 2, 8), v_new=torch.randn(2, rows, 2, 8),
                k_cache=torch.randn(6, PAGE, 2, 8), v_cache=torch.randn(6, PAGE, 2, 8),
                cache_seqlens=torch.tensor([3, 5], dtype=torch.int32), draft_len=K,
                block_table=torch.tensor([[4, 0, -1], [2, 5, 9]], dtype=torch.int32))
    args.update(override)
    return args


def table(rows):
    return torch.tensor(rows, dtype=torch.int32)


BAD_TABLES = {
    "int64": (dict(block_table=torch.tensor([[4, 0], [2, 5]])), "block_table must be an int32 tensor"),
    "1-d": (dict(block_table=table([4, 0, 2, 5])), "block_table must be an int32 tensor"),
    "rows": (dict(block_table=table([[4, 0, 1]])), r"block_table must have shape \[batch=2"),
    "no-columns": (dict(block_table=torch.zeros(2, 0, dtype=torch.int32)), "max_pages_per_seq >= 1"),
    "page-past-pool": (dict(block_table=table([[4, 0, -1], [2, 6, 1]])), r"block_table\[1, 1\] must be a page in"),
    "page-negative": (dict(block_table=table([[4, -1, 1], [2, 5, 1]])), r"block_table\[0, 1\] must be a page in"),
    "shared-page": (dict(block_table=table([[4, 0, -1], [2, 4, -1]])), "got page 4 at"),
    "page-twice-in-a-sequence": (dict(block_table=table([[4, 4, -1], [2, 5, -1]])), "got page 4 at"),
    "too-few-columns": (dict(block_table=table([[4], [2]])), "max_pages_per_seq \\* page_size=4"),
    "pool-heads": (dict(k_cache=torch.randn(6, PAGE, 1, 8)), r"k_cache must be \[num_pages >= 1"),
    "pool-page-size": (dict(v_cache=torch.randn(6, PAGE + 1, 2, 8)), "v_cache must have k_cache's shape"),
    "pool-rank": (dict(v_cache=torch.randn(6 * PAGE, 2, 8)), r"v_cache must be a 4-d tensor \[num_pages"),
    "table-not-tensor": (dict(block_table=[[4, 0], [2, 5]]), "block_table must be an int32 tensor"),
    "page-size-over-256": (dict(k_cache=torch.randn(2, MAX_PAGE_SIZE + 1, 2, 8),
                                v_cache=torch.randn(2, MAX_PAGE_SIZE + 1, 2, 8)), r"page_size in \[1, 256\]"),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_bad_paged_input_raises_before_writing(case):
    override, message = BAD_TABLES[case]
    args = paged_decode_args(**override)
    before = {name: t.clone() for name, t in args.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(ValueError, match=message):
        tk.decode_attention(**args)
    for name, tensor in before.items():
        assert torch.equal(args[name], tensor), f"{name} was modified"


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
def test_prefill_and_append_check_their_rows_against_the_table(backend):
    """Prefill needs pages for ``n + P`` rows, append for ``n + T``; the table must cover them."""
    pool = torch.zeros(6, PAGE, 2, 8)
    pools_before = pool.clone()
    q, kv = torch.randn(2, 7, 4, 8), torch.randn(2, 7, 2, 8)
    lengths = torch.tensor([0, 3], dtype=torch.int32)
    short = table([[0, 1], [2, -1]])  # sequence 1 needs rows [0, 3 + 7) = 3 pages
    with pytest.raises(ValueError, match="cache overflow"):
        tk.append_attention(q, kv, kv, pool, pool.clone(), lengths, backend=backend, block_table=short)
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] must be a page"):
        tk.append_attention(q, kv, kv, pool, pool.clone(), lengths, backend=backend,
                            block_table=table([[0, 1, -1], [2, -1, 3]]))
    prompts = torch.tensor([5, 2], dtype=torch.int32)  # P = 5, k = 2: rows [n, n + 5)
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] must be a page"):
        tk.prefill_attention(q, kv, kv, pool, pool.clone(), lengths, prompts, 2, backend=backend,
                             block_table=table([[0, 1, -1], [2, -1, -1]]))
    assert torch.equal(pool, pools_before)
    # Entries past the rows in use are never looked at: -1 or garbage there is fine.
    tk.prefill_attention(q, kv, kv, pool, pool.clone(), lengths, prompts, 2, backend=backend,
                         block_table=table([[0, 1, 77], [2, 3, -5]]))


def test_value_checks_follow_check_lengths():
    """With ``check_lengths=False`` the table's values are not read (no sync); static checks still run."""
    args = paged_decode_args(block_table=table([[4, 0, -1], [2, 4, -1]]), check_lengths=False)  # shared page 4
    tk.decode_attention(**args)  # the caller vouched for the table
    with pytest.raises(ValueError, match="block_table must be an int32"):
        tk.decode_attention(**paged_decode_args(block_table=torch.tensor([[4, 0], [2, 5]]), check_lengths=False))


# ----------------------------------------------------------------------------
# Registration and selection
# ----------------------------------------------------------------------------


def test_opcheck_paged_signatures():
    q, kv = torch.randn(2, 6, 4, 16), torch.randn(2, 6, 2, 16)
    pools = [torch.randn(5, 3, 2, 16) for _ in range(2)]
    lengths = torch.tensor([2, 4], dtype=torch.int32)
    block_table = table([[3, 0, -1, -1], [1, 4, 2, -1]])
    args = (q, kv, kv, *pools, lengths, None, int(Layout.DECODE), 2, 0.3, block_table)
    torch.library.opcheck(torch.ops.tidar.cached_attention_reference.default, args)
    if "triton" in PAGED_BACKENDS:  # the interpreter has no fake-tensor path (see test_triton_attention.py)
        utils = ("test_schema", "test_autograd_registration") if INTERPRET else None
        kwargs = {} if utils is None else dict(test_utils=utils)
        torch.library.opcheck(torch.ops.tidar.cached_attention_triton.default, args, **kwargs)


def test_torch_compile_fullgraph_over_a_paged_step():
    """Under torch.compile the table's values are not checked (no sync) and the paged op stays in the graph."""
    q, kv = torch.randn(2, 6, 4, 16), torch.randn(2, 6, 2, 16)
    pools = [torch.randn(5, 3, 2, 16) for _ in range(2)]
    lengths = torch.tensor([2, 4], dtype=torch.int32)
    block_table = table([[3, 0, -1], [1, 4, 2]])

    def step(k_pool, v_pool):
        return tk.decode_attention(q, kv, kv, k_pool, v_pool, lengths, 2, block_table=block_table)

    eager_pools = [p.clone() for p in pools]
    expected = step(*eager_pools)
    got = torch.compile(step, fullgraph=True)(*pools)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(pools, eager_pools))


def test_which_backends_take_paged_calls():
    call = backends.Call(backends.CACHED_ATTENTION, torch.device("cpu"), torch.float32, 16, int(Layout.DECODE),
                         paged=True)
    assert backends.select(call, None).name == "cpu"  # the CPU decode path, automatic on CPU tensors
    assert {"reference", "cpu"} <= set(PAGED_BACKENDS) and ("triton" in PAGED_BACKENDS) == INTERPRET
    kernel_call = call._replace(dtype=torch.float16, head_dim=128)
    assert kernels_support(kernel_call)  # the CUDA kernel reads and writes through the table (cuda, cuda_emulated)
    assert not kernels_support(kernel_call._replace(layout=int(Layout.CAUSAL)))  # the decode step only
    emulated = backends.load("cuda_emulated")
    if emulated is not None:
        assert backends.select(kernel_call, "cuda_emulated") is emulated
        assert backends.select(kernel_call, None).name == "cpu"  # the emulated kernels: never picked automatically


# ----------------------------------------------------------------------------
# The page pool
# ----------------------------------------------------------------------------


def test_pool_reserve_and_release():
    cache = PagedKVCache(n_layers=2, batch=3, max_len=10, n_kv_heads=2, head_dim=4, page_size=4, num_pages=7)
    assert cache.max_len == 12 and cache.block_table.shape == (3, 3) and cache.k[0].shape == (7, 4, 2, 4)
    assert cache.block_table.eq(PagedKVCache.NO_PAGE).all() and cache.free_pages == 7
    with pytest.raises(ValueError, match=r"KV pages missing: sequences \[0, 1, 2\] need \[1, 1, 1\] rows"):
        cache.check_room(1)  # no page held yet
    cache.reserve([5, 1, 0])  # 2 + 1 + 0 pages
    with pytest.raises(ValueError, match=r"sequences \[2\] need \[1\] rows but hold \[0\] pages"):
        cache.check_room(1)
    assert [len(cache.pages_of(b)) for b in range(3)] == [2, 1, 0] and cache.free_pages == 4
    cache.reserve([8, 1, 4])  # keeps what it holds, takes only what is missing
    held = [cache.pages_of(b) for b in range(3)]
    assert [len(p) for p in held] == [2, 1, 1] and cache.free_pages == 3
    cache.check_room(4)  # every sequence holds a page of 4 rows
    with pytest.raises(ValueError, match=r"sequences \[1, 2\] need \[5, 5\] rows"):
        cache.check_room(5)
    flat = sum(held, [])
    assert len(set(flat)) == len(flat)
    assert cache.block_table[0, :2].tolist() == held[0] and cache.block_table[0, 2] == PagedKVCache.NO_PAGE
    table_before = cache.block_table.clone()
    with pytest.raises(RuntimeError, match="page pool exhausted"):
        cache.reserve([12, 12, 12])
    with pytest.raises(ValueError, match="rows must be 3 integers in"):
        cache.reserve([13, 0, 0])
    assert torch.equal(cache.block_table, table_before) and cache.free_pages == 3
    cache.release([0, 2], keep_rows=1)  # sequence 0 keeps one page, sequence 2 keeps its one
    assert cache.pages_of(0) == held[0][:1] and cache.pages_of(2) == held[2] and cache.free_pages == 4
    assert cache.block_table[0, 1] == PagedKVCache.NO_PAGE
    cache.release([0, 1, 2])
    assert cache.free_pages == 7 and cache.block_table.eq(PagedKVCache.NO_PAGE).all()
    with pytest.raises(ValueError, match="sequences must lie in"):
        cache.release([3])


@pytest.mark.parametrize("name", ["page_size", "num_pages", "batch"])
def test_pool_bad_sizes(name):
    sizes = dict(n_layers=1, batch=2, max_len=8, n_kv_heads=1, head_dim=4, page_size=4, num_pages=4)
    sizes[name] = 0
    with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
        PagedKVCache(**sizes)


def test_pool_page_size_up_to_256():
    assert PagedKVCache(n_layers=1, batch=1, max_len=8, n_kv_heads=1, head_dim=4, page_size=MAX_PAGE_SIZE).page_size \
        == MAX_PAGE_SIZE
    with pytest.raises(ValueError, match="page_size must be <= 256, got 257"):
        PagedKVCache(n_layers=1, batch=1, max_len=8, n_kv_heads=1, head_dim=4, page_size=MAX_PAGE_SIZE + 1)


class PagedCacheMachine(RuleBasedStateMachine):
    """Reserve, write, commit, roll back, finish: the pool's rows match a list model of each sequence.

    A row's K holds its tag, V minus it. Pages held by different sequences are distinct, cover
    every committed row, and free + held = the pool.
    """

    BATCH, MAX_LEN, PAGE, PAGES = 3, 14, 3, 10

    def __init__(self):
        super().__init__()
        self.cache = PagedKVCache(n_layers=1, batch=self.BATCH, max_len=self.MAX_LEN, n_kv_heads=1, head_dim=2,
                                  page_size=self.PAGE, num_pages=self.PAGES)
        self.rows = [[] for _ in range(self.BATCH)]
        self.next_tag = 1.0

    @rule(count=st.integers(1, 5), keep=st.lists(st.integers(0, 5), min_size=BATCH, max_size=BATCH))
    def reserve_write_commit(self, count, keep):
        needed = [len(r) + count for r in self.rows]
        table_before, free_before = self.cache.block_table.clone(), self.cache.free_pages
        try:
            self.cache.reserve(needed)
        except (ValueError, RuntimeError) as error:  # past max_len, or the pool is short: nothing changed
            too_long = any(n > self.cache.max_len for n in needed)
            assert isinstance(error, ValueError if too_long else RuntimeError)
            assert torch.equal(self.cache.block_table, table_before) and self.cache.free_pages == free_before
            return
        tags = torch.arange(self.next_tag, self.next_tag + self.BATCH * count).view(self.BATCH, count)
        self.next_tag += self.BATCH * count
        values = tags[..., None, None].expand(self.BATCH, count, 1, 2).contiguous()
        tk.append_attention(values, values, -values, self.cache.k[0], self.cache.v[0], self.cache.seqlens,
                            block_table=self.cache.block_table)  # lengths and table checked
        keep = [min(c, count) for c in keep]
        self.cache.commit(torch.tensor(keep))
        for b in range(self.BATCH):
            self.rows[b].extend(tags[b, :keep[b]].tolist())

    @rule(lengths=st.lists(st.integers(0, 4), min_size=BATCH, max_size=BATCH))
    def rollback(self, lengths):
        lengths = [min(n, len(r)) for n, r in zip(lengths, self.rows)]
        self.cache.reset(lengths)
        self.rows = [r[:n] for r, n in zip(self.rows, lengths)]

    @rule(sequence=st.integers(0, BATCH - 1))
    def finish(self, sequence):
        self.cache.seqlens[sequence] = 0
        self.cache.release([sequence])
        self.rows[sequence] = []

    @invariant()
    def pool_matches_the_model(self):
        assert self.cache.seqlens.tolist() == [len(r) for r in self.rows]
        held = [self.cache.pages_of(b) for b in range(self.BATCH)]
        flat = sum(held, [])
        assert len(set(flat)) == len(flat) and len(flat) + self.cache.free_pages == self.PAGES
        for b, rows in enumerate(self.rows):
            assert self.cache.block_table[b, :len(held[b])].tolist() == held[b]
            assert len(held[b]) * self.PAGE >= len(rows)
            if rows:
                k = torch.cat([self.cache.k[0][p] for p in held[b]])[:len(rows)]
                v = torch.cat([self.cache.v[0][p] for p in held[b]])[:len(rows)]
                expected = torch.tensor(rows)[:, None, None].expand_as(k)
                assert torch.equal(k, expected) and torch.equal(v, -expected)


PagedCacheMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=12, deadline=None,
                                               derandomize=True)
TestPagedCacheStateMachine = PagedCacheMachine.TestCase


def test_decode_steps_on_the_pool_match_the_contiguous_cache():
    """Reserve, decode, commit, rollback: the paged cache keeps the contiguous cache's rows."""
    generator = torch.Generator().manual_seed(3)
    paged = PagedKVCache(n_layers=1, batch=2, max_len=40, n_kv_heads=1, head_dim=8, page_size=3)
    contiguous = KVCache(n_layers=1, batch=2, max_len=40, n_kv_heads=1, head_dim=8)
    k = 3
    for step in range(6):
        rows = torch.randn(2, k + k * k, 1, 8, generator=generator)
        q = torch.randn(2, k + k * k, 2, 8, generator=generator)
        paged.reserve([n + k for n in paged.seqlens.tolist()])
        out_paged = tk.decode_attention(q, rows, -rows, paged.k[0], paged.v[0], paged.seqlens, k,
                                        block_table=paged.block_table)
        out = tk.decode_attention(q, rows, -rows, contiguous.k[0], contiguous.v[0], contiguous.seqlens, k)
        torch.testing.assert_close(out_paged, out, rtol=0, atol=0)
        accepted = torch.randint(1, k + 1, (2,), generator=generator)
        paged.commit(accepted)
        contiguous.commit(accepted)
        if step == 3:  # a rollback is a length change only
            paged.reset([2, 5])
            contiguous.reset([2, 5])
    for b, n in enumerate(contiguous.seqlens.tolist()):
        pages = paged.pages_of(b)
        rows = torch.cat([paged.k[0][p] for p in pages])[:n]
        assert torch.equal(rows, contiguous.k[0][b, :n])


# ----------------------------------------------------------------------------
# The decode loops
# ----------------------------------------------------------------------------

PROMPTS = [[1, 2, 3, 4, 0], [3, 2], [0, 1, 2, 3, 4, 0, 1], [4]]


@pytest.mark.parametrize("page_size", [1, 3, 16], ids=lambda p: f"page{p}")
def test_loops_on_pages_emit_the_contiguous_tokens(page_size):
    model = tiny_with_vocab(2)
    ids, lens = pad_prompts(PROMPTS)
    ar = ar_generate(model, ids, 19, prompt_lens=lens)
    paged_ar = ar_generate(model, ids, 19, prompt_lens=lens, page_size=page_size)
    assert torch.equal(paged_ar.tokens, ar.tokens) and torch.equal(paged_ar.lengths, ar.lengths)
    for k in (1, 4, 7):
        tidar = tidar_generate(model, ids, 19, k, prompt_lens=lens)
        paged = tidar_generate(model, ids, 19, k, prompt_lens=lens, page_size=page_size)
        assert torch.equal(paged.tokens, tidar.tokens) and torch.equal(paged.lengths, tidar.lengths)
        assert paged.acceptance_histogram == tidar.acceptance_histogram


def test_sampled_loop_on_pages_matches_contiguous():
    model = tiny_with_vocab(4, vocab_size=11)
    ids, lens = pad_prompts(PROMPTS[:3])
    runs = [tidar_generate(model, ids, 12, 3, temperature=0.8, top_p=0.9, prompt_lens=lens,
                           generator=torch.Generator().manual_seed(7), **paging) for paging in ({}, {"page_size": 2})]
    assert torch.equal(runs[0].tokens, runs[1].tokens)


def test_finished_sequences_give_their_pages_back(monkeypatch):
    """A sequence that stops early returns all pages but its scratch rows' to the pool."""
    released = []
    real = PagedKVCache.release

    def recording_release(self, sequences, keep_rows=0):
        before = self.free_pages
        real(self, sequences, keep_rows)
        released.append((list(sequences), keep_rows, self.free_pages - before))

    monkeypatch.setattr(PagedKVCache, "release", recording_release)
    model = tiny_with_vocab(2)
    ids, lens = pad_prompts([[1, 2, 3, 4, 0], [4]])
    contiguous = tidar_generate(model, ids, 19, 2, prompt_lens=lens, eos_token_id=3)
    paged = tidar_generate(model, ids, 19, 2, prompt_lens=lens, eos_token_id=3, page_size=1)
    assert torch.equal(paged.tokens, contiguous.tokens)
    stopped = [b for b, n in enumerate(contiguous.lengths.tolist()) if n < 19]
    assert stopped, "the case must stop a sequence early"
    assert sorted(b for sequences, _, _ in released for b in sequences) == sorted(stopped)
    assert all(keep == 2 and freed > 0 for _, keep, freed in released)


def test_page_management_at_a_stop_check():
    """Running sequences get pages for ``steps * k`` more rows; a finished one keeps only its scratch rows'."""
    from tidar_kernels.model import generate

    model = tiny_with_vocab(0)
    ids, lens = pad_prompts(PROMPTS)
    setup = generate._prepare(model, ids, 30, 3, 0.0, None, None, None, lens, None, None, None, 8, page_size=2)
    loop = generate._TidarLoop(model, setup, 3, 1.0)
    with torch.inference_mode():
        loop.cache.reserve([ids.shape[1]] * ids.shape[0])
        loop.prefill()
        loop.done[1] = True
        for _ in range(2):  # a second stop check changes nothing for the finished sequence
            loop._manage_pages(steps=8)
            lengths = loop.cache.seqlens.tolist()
            assert lengths[1] == 0 and len(loop.cache.pages_of(1)) == 2  # rows [0, 3): two pages of 2
            for b in (0, 2, 3):
                assert len(loop.cache.pages_of(b)) * 2 >= lengths[b] + 8 * 3
        loop.step()  # runs on the reserved pages (ops check the table: check_lengths is off in the model)
        tk.decode_attention(torch.zeros(4, 12, 4, 16), torch.zeros(4, 12, 2, 16), torch.zeros(4, 12, 2, 16),
                            loop.cache.k[0], loop.cache.v[0], loop.cache.seqlens.clone(), 3,
                            block_table=loop.cache.block_table)  # the table covers the next step, checked


def test_pool_too_small_is_a_clear_error():
    ids, lens = pad_prompts(PROMPTS)
    with pytest.raises(RuntimeError, match="page pool exhausted"):
        tidar_generate(tiny_with_vocab(0), ids, 5, 2, prompt_lens=lens, page_size=4, num_pages=3)
    with pytest.raises(ValueError, match="num_pages .* needs page_size"):
        ar_generate(tiny_with_vocab(0), ids, 5, prompt_lens=lens, num_pages=3)
    with pytest.raises(ValueError, match="page_size must be an integer >= 1"):
        ar_generate(tiny_with_vocab(0), ids, 5, prompt_lens=lens, page_size=0)


# ----------------------------------------------------------------------------
# GPU (compiled Triton; skipped without CUDA, or under the interpreter)
# ----------------------------------------------------------------------------

needs_compiler = pytest.mark.skipif(INTERPRET, reason="needs the Triton compiler: run without TRITON_INTERPRET")


@pytest.mark.gpu
@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("page_size", [1, pytest.param(16, marks=pytest.mark.gpu_quick), 64], ids=lambda p: f"page{p}")
@pytest.mark.parametrize("op", list(OPS))
def test_paged_triton_on_gpu(op, page_size, dtype):
    layout, lens, heads, draft_len, padded, prompts = OPS[op]
    check_cached_call("triton", layout, lens, heads, dtype=dtype, draft_len=draft_len, padded=padded,
                      prompt_lens=prompts, page_size=page_size, head_dim=128, device="cuda")


@pytest.mark.gpu
@needs_compiler
@pytest.mark.parametrize("page_size", [1, 16, pytest.param(64, marks=pytest.mark.gpu_quick)], ids=lambda p: f"page{p}")
def test_paged_triton_on_gpu_long_cache(page_size):
    """Model-sized heads and a long cache: the split (flash-decoding) path over pages."""
    check_cached_call("triton", Layout.DECODE, (3000, 1, 700), (12, 2), dtype=torch.bfloat16, draft_len=8,
                      page_size=page_size, head_dim=128, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.gpu_quick)
                                  if case == "page3-bf16-d128-gqa3-3splits" else case for case in KERNEL_CASES])
def test_paged_cuda_kernel_on_gpu(monkeypatch, case, dtype):
    """The emulated cases on the hardware, at head dim 128 and in both dtypes (forced splits too)."""
    if backends.load("cuda") is None:
        pytest.skip("the CUDA extension tidar_kernels._C is not built")
    page_size, _, _, heads, draft_len, lens, splits = KERNEL_CASES[case]
    if splits is not None:
        monkeypatch.setenv("TIDAR_FORCE_DECODE_SPLITS", str(splits))
    check_cached_call("cuda", Layout.DECODE, lens, heads, dtype=dtype, draft_len=draft_len, page_size=page_size,
                      head_dim=128, seed=page_size, device="cuda", exact_twin=True)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, pytest.param(16, marks=pytest.mark.gpu_quick), 64, 256],
                         ids=lambda p: f"page{p}")
def test_paged_cuda_kernel_on_gpu_long_cache(page_size):
    """Model-sized heads and a long cache: the planner's split count over pages."""
    if backends.load("cuda") is None:
        pytest.skip("the CUDA extension tidar_kernels._C is not built")
    check_cached_call("cuda", Layout.DECODE, (3000, 1, 700), (12, 2), dtype=torch.bfloat16, draft_len=8,
                      page_size=page_size, head_dim=128, device="cuda", exact_twin=True)


@pytest.mark.gpu
@pytest.mark.gpu_quick
def test_bad_paged_kernel_input_raises_before_any_write_on_gpu():
    if backends.load("cuda") is None:
        pytest.skip("the CUDA extension tidar_kernels._C is not built")
    check_bad_paged_kernel_input_raises_before_any_write(torch.ops.tidar.cached_attention_cuda.default, "cuda")


@pytest.mark.gpu
@pytest.mark.gpu_quick
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_paged_decode_step_cuda_graph_replay_with_changing_tables(backend):
    """A captured paged step replays what an eager call does for new lengths and new page tables."""
    if backend == "triton" and INTERPRET:
        pytest.skip("needs the Triton compiler: run without TRITON_INTERPRET")
    if backends.load(backend) is None:
        pytest.skip(f"the {backend} backend does not load here")
    draft_len, batch, (q_heads, kv_heads), head_dim, page_size, columns = 4, 3, (12, 2), 128, 16, 80
    rows, dtype, device = draft_len + draft_len * draft_len, torch.bfloat16, "cuda"
    q = torch.randn(batch, rows, q_heads, head_dim, device=device, dtype=dtype)
    k_new, v_new = (torch.randn(batch, rows, kv_heads, head_dim, device=device, dtype=dtype) for _ in range(2))
    pools = [torch.randn(batch * columns, page_size, kv_heads, head_dim, device=device, dtype=dtype)
             for _ in range(2)]
    block_table = torch.randperm(batch * columns, device=device).view(batch, columns).int()
    seqlens = torch.tensor([5, 0, 900], dtype=torch.int32, device=device)

    def step(k_pool, v_pool):
        return tk.decode_attention(q, k_new, v_new, k_pool, v_pool, seqlens, draft_len, backend=backend,
                                   check_lengths=False, block_table=block_table)

    graph, out = capture_after_warmup(lambda: step(*pools))
    for lengths in ([7, 1, 1200], [0, 1250, 33]):
        seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        block_table.copy_(torch.randperm(batch * columns, device=device).view(batch, columns))
        eager_pools = [p.clone() for p in pools]
        expected = step(*eager_pools)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected), f"replay output differs from eager for cache_seqlens={lengths}"
        assert all(torch.equal(a, b) for a, b in zip(pools, eager_pools))


@pytest.mark.gpu
@pytest.mark.gpu_quick
def test_paged_loops_on_gpu_match_contiguous():
    model = tiny_with_vocab(0).cuda()
    ids, lens = pad_prompts(PROMPTS, device="cuda")
    for k in (1, 4):
        contiguous = tidar_generate(model, ids, 19, k, prompt_lens=lens, eos_token_id=2, sync_every=3)
        for page_size in (1, 16):
            paged = tidar_generate(model, ids, 19, k, prompt_lens=lens, eos_token_id=2, sync_every=3,
                                   page_size=page_size)
            assert torch.equal(paged.tokens, contiguous.tokens) and torch.equal(paged.lengths, contiguous.lengths)
    ar = ar_generate(model, ids, 19, prompt_lens=lens, eos_token_id=2)
    assert torch.equal(ar_generate(model, ids, 19, prompt_lens=lens, eos_token_id=2, page_size=16).tokens, ar.tokens)


@pytest.mark.gpu
@pytest.mark.gpu_quick
def test_paged_step_never_syncs():
    """Pages are reserved at the stop check; the step itself only launches work."""
    from tidar_kernels.model import generate

    model = tiny_with_vocab(0).cuda()
    ids, lens = pad_prompts(PROMPTS, device="cuda")
    setup = generate._prepare(model, ids, 16, 4, 0.0, None, None, 2, lens, None, None, None, 8, page_size=16)
    for loop in (generate._TidarLoop(model, setup, 4, 1.0), generate._ArLoop(model, setup)):
        with torch.inference_mode():
            loop.cache.reserve([ids.shape[1]] * ids.shape[0])
            loop.prefill()
            loop._manage_pages(steps=2)
            assert_steps_never_sync(loop, steps=2)
