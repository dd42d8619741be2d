"""Bad input to every public op raises ValueError naming the argument, before anything is written."""
import random

import pytest
import torch

import tidar_kernels as tk
from tidar_kernels.kernels import backends
from tidar_kernels.kernels.backends import Call
from tidar_kernels.kernels.mask import Layout
from tidar_kernels.kernels.validation import MAX_PAGE_SIZE

K = 2  # draft length of the decode cases
ROWS = K + K * K


def decode_args(**override):
    args = dict(q=torch.randn(2, ROWS, 4, 8), k_new=torch.randn(2, ROWS, 2, 8), v_new=torch.randn(2, ROWS, 2, 8),
                k_cache=torch.randn(2, 10, 2, 8), v_cache=torch.randn(2, 10, 2, 8),
                cache_seqlens=torch.tensor([0, 3], dtype=torch.int32), draft_len=K)
    args.update(override)
    return args


DECODE_CASES = {
    "q-rank": (dict(q=torch.randn(2, ROWS, 32)), "q must be a 4-d"),
    "q-int": (dict(q=torch.zeros(2, ROWS, 4, 8, dtype=torch.int32)), "q must be float16"),
    "k-dtype": (dict(k_new=torch.randn(2, ROWS, 2, 8, dtype=torch.float64)), "k_new must have q's dtype"),
    "heads-not-divisible": (dict(k_new=torch.randn(2, ROWS, 3, 8), v_new=torch.randn(2, ROWS, 3, 8),
                                 k_cache=torch.randn(2, 10, 3, 8), v_cache=torch.randn(2, 10, 3, 8)),
                            "multiple of k_new heads"),
    "v-shape": (dict(v_new=torch.randn(2, ROWS, 2, 4)), "v_new must have k_new's shape"),
    "rows": (dict(q=torch.randn(2, ROWS + 1, 4, 8), k_new=torch.randn(2, ROWS + 1, 2, 8),
                  v_new=torch.randn(2, ROWS + 1, 2, 8)), "k \\+ k\\*k"),
    "draft-len-0": (dict(draft_len=0), "draft_len must be an integer >= 1"),
    "cache-shape": (dict(k_cache=torch.randn(2, 10, 1, 8)), "k_cache must be"),
    "cache-dtype": (dict(v_cache=torch.randn(2, 10, 2, 8, dtype=torch.float16)), "v_cache must have q's dtype"),
    "seqlens-int64": (dict(cache_seqlens=torch.tensor([0, 3])), "cache_seqlens must be an int32"),
    "seqlens-shape": (dict(cache_seqlens=torch.tensor([0], dtype=torch.int32)), "cache_seqlens must have shape"),
    "overflow": (dict(cache_seqlens=torch.tensor([0, 9], dtype=torch.int32)), "cache overflow"),
    "negative": (dict(cache_seqlens=torch.tensor([-1, 0], dtype=torch.int32)), "cache_seqlens must be >= 0"),
}


@pytest.mark.parametrize("case", list(DECODE_CASES), ids=list(DECODE_CASES))
def test_decode_attention_rejects_bad_input_and_writes_nothing(case):
    override, message = DECODE_CASES[case]
    args = decode_args(**override)
    before = {name: t.clone() for name, t in args.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(ValueError, match=message):
        tk.decode_attention(**args)
    for name, tensor in before.items():
        assert torch.equal(args[name], tensor), f"{name} was modified"


def test_training_attention_rejects_bad_layouts():
    q = torch.randn(1, 10, 2, 8)
    with pytest.raises(ValueError, match="multiple of block_size"):
        tk.training_attention(q, q, q, block_size=2)  # S = 5
    with pytest.raises(ValueError, match="odd length"):
        tk.training_attention(q[:, :9], q[:, :9], q[:, :9], block_size=1)
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        tk.training_attention(q, q, q, block_size=0)
    with pytest.raises(ValueError, match="softmax_scale must be > 0"):
        tk.training_attention(q, q, q, block_size=5, softmax_scale=-1.0)
    with pytest.raises(ValueError, match="k must have q's batch and seq"):
        tk.causal_attention(q, q[:, :4], q[:, :4])


def test_prefill_attention_rejects_bad_prompt_lens():
    args = decode_args(q=torch.randn(2, 5, 4, 8), k_new=torch.randn(2, 5, 2, 8), v_new=torch.randn(2, 5, 2, 8))
    del args["draft_len"]
    before = args["k_cache"].clone()
    with pytest.raises(ValueError, match="prompt_lens must lie in"):
        tk.prefill_attention(**args, prompt_lens=torch.tensor([0, 3], dtype=torch.int32), draft_len=2)
    with pytest.raises(ValueError, match="prompt_lens must be an int32"):
        tk.prefill_attention(**args, prompt_lens=[3, 3], draft_len=2)
    with pytest.raises(ValueError, match="padded prompt length"):
        tk.prefill_attention(**args, prompt_lens=torch.tensor([1, 1], dtype=torch.int32), draft_len=5)
    assert torch.equal(args["k_cache"], before)


def test_accept_drafts_rejects_bad_input_and_keeps_lengths():
    seqlens = torch.tensor([1, 2], dtype=torch.int32)
    drafts, logits = torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 3, 7)
    cases = [
        (dict(drafts=drafts.int()), "drafts must be int64"),
        (dict(draft_logits=logits[:, :2]), "draft_logits must be"),
        (dict(block_logits=torch.randn(2, 3, 6)), "block_logits must have draft_logits' shape"),
        (dict(beta=1.5), "beta must lie in"),
        (dict(active=torch.ones(2)), "active must be bool"),
        (dict(cache_seqlens=seqlens.long()), "cache_seqlens must be an int32"),
    ]
    for override, message in cases:
        args = dict(drafts=drafts, draft_logits=logits, block_logits=logits.clone(), cache_seqlens=seqlens)
        args.update(override)
        with pytest.raises(ValueError, match=message):
            tk.accept_drafts(**args)
    assert seqlens.tolist() == [1, 2]


# ----------------------------------------------------------------------------
# Every CPU backend: aliased caches, empty batch, random malformed calls
# ----------------------------------------------------------------------------

# (dtype, head_dim) each backend takes on the CPU: the emulated CUDA kernels need fp16/bf16 at 64 or 128.
CPU_SETUPS = {"reference": (torch.float32, 8), "cpu": (torch.float32, 8), "triton": (torch.float32, 16),
              "cuda_emulated": (torch.float16, 64)}


def _cpu_backend(name):
    dtype, head_dim = CPU_SETUPS[name]
    call = Call(backends.CACHED_ATTENTION, torch.device("cpu"), dtype, head_dim, int(Layout.DECODE), paged=True)
    backend = backends.load(name)
    usable = backend is not None and backend.supports(call)
    return pytest.param(name, marks=pytest.mark.skipif(not usable, reason=f"{name} does not run here (CPU)"))


CPU_BACKENDS = [_cpu_backend(name) for name in CPU_SETUPS]
POOL_PAGES, PAGE_SIZE = 6, 4
GOOD_TABLE = [[4, 0, -1], [2, 5, 1]]  # lengths [3, 5] + K drafts use columns 0-1 of both sequences


def poisoned(*shape, dtype):
    """NaN everywhere but a few random entries: any write shows in the bits."""
    t = torch.full(shape, float("nan"), dtype=dtype)
    t.view(-1)[::7] = torch.randn(t.view(-1)[::7].shape).to(dtype)
    return t


def cpu_decode_args(backend, batch=2, paged=False):
    dtype, head_dim = CPU_SETUPS[backend]
    cache_shape = (POOL_PAGES, PAGE_SIZE, 2, head_dim) if paged else (batch, 10, 2, head_dim)
    args = dict(q=torch.randn(batch, ROWS, 4, head_dim, dtype=dtype),
                k_new=torch.randn(batch, ROWS, 2, head_dim, dtype=dtype),
                v_new=torch.randn(batch, ROWS, 2, head_dim, dtype=dtype),
                k_cache=poisoned(*cache_shape, dtype=dtype), v_cache=poisoned(*cache_shape, dtype=dtype),
                cache_seqlens=torch.tensor([3, 5][:batch], dtype=torch.int32), draft_len=K, backend=backend)
    if paged:
        args["block_table"] = torch.tensor(GOOD_TABLE[:batch], dtype=torch.int32).reshape(batch, 3)
    return args


def bits(t):
    """The bytes ``t`` reads, NaNs included (torch.equal on floats would call NaN != NaN)."""
    return t.detach().clone().reshape(-1).view(torch.uint8)


def snapshot(tensors):
    return [(t, bits(t)) for t in tensors if isinstance(t, torch.Tensor)]


def assert_unchanged(saved):
    for t, before in saved:
        assert torch.equal(bits(t), before), f"a tensor of shape {tuple(t.shape)} was written"


def _overlapping_pair(args):
    """k_cache and v_cache as two views of one buffer, v_cache starting half-way into k_cache."""
    shape, n = args["k_cache"].shape, args["k_cache"].numel()
    flat = poisoned(n + n // 2, dtype=args["k_cache"].dtype)
    return flat[:n].view(shape), flat[n // 2:].view(shape)


ALIASING = {
    "expanded-k-cache": (lambda a: dict(k_cache=a["k_cache"][:1].expand(2, -1, -1, -1)),
                         "k_cache must not overlap itself"),
    "expanded-v-cache": (lambda a: dict(v_cache=a["v_cache"][:1].expand(2, -1, -1, -1)),
                         "v_cache must not overlap itself"),
    "k-cache-is-v-cache": (lambda a: dict(v_cache=a["k_cache"]), "k_cache must not overlap v_cache"),
    "partially-overlapping": (lambda a: dict(zip(("k_cache", "v_cache"), _overlapping_pair(a))),
                              "k_cache must not overlap v_cache"),
    "overlapping-rows": (lambda a: dict(k_cache=a["k_cache"].as_strided(a["k_cache"].shape, (
        a["k_cache"].stride(1), *a["k_cache"].stride()[1:]))), "k_cache must not overlap itself"),
    "k-new-inside-k-cache": (lambda a: dict(k_new=a["k_cache"][:, :ROWS]), "k_cache must not overlap k_new"),
}


@pytest.mark.parametrize("case", list(ALIASING), ids=list(ALIASING))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_aliased_caches_rejected_on_every_backend(backend, case):
    args = cpu_decode_args(backend)
    make, message = ALIASING[case]
    args.update(make(args))
    saved = snapshot(args.values())
    with pytest.raises(ValueError, match=message):
        tk.decode_attention(**args)
    assert_unchanged(saved)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_expanded_block_table_rejected_on_every_backend(backend):
    args = cpu_decode_args(backend, paged=True)
    args["block_table"] = args["block_table"][1:].expand(2, 3)
    saved = snapshot(args.values())
    with pytest.raises(ValueError, match="block_table must not overlap itself"):
        tk.decode_attention(**args, check_lengths=False)  # the static check alone catches it
    assert_unchanged(saved)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch_returns_empty_result_on_every_backend(backend, paged):
    args = cpu_decode_args(backend, batch=0, paged=paged)
    saved = snapshot(args.values())
    out = tk.decode_attention(**args)
    assert out.shape == args["q"].shape and out.dtype == args["q"].dtype
    assert_unchanged(saved)


def _rows(a, rows):
    return {name: torch.randn(a[name].shape[0], rows, *a[name].shape[2:]).to(a[name].dtype)
            for name in ("q", "k_new", "v_new")}


def _like(a, name, **shape_or_dtype):
    t = a[name]
    shape = list(t.shape)
    for dim, size in shape_or_dtype.get("sizes", {}).items():
        shape[dim] = size
    return torch.zeros(shape, dtype=shape_or_dtype.get("dtype", t.dtype))


# Each takes the valid arguments and a random source, returns (overrides, names one of which the error names).
MALFORMED = [
    lambda a, r: (dict(q=a["q"].flatten(2)), ("q",)),
    lambda a, r: (dict(q=a["q"].to(r.choice([torch.int32, torch.int64, torch.bool]))), ("q",)),
    lambda a, r: (dict(k_new=a["k_new"].double()), ("k_new",)),
    lambda a, r: (dict(v_new=_like(a, "v_new", sizes={3: a["v_new"].shape[3] // 2})), ("v_new",)),
    lambda a, r: (dict(k_new=_like(a, "k_new", sizes={0: 3}), v_new=_like(a, "v_new", sizes={0: 3})), ("k_new",)),
    lambda a, r: (dict(q=_like(a, "q", sizes={2: 3})), ("q", "k_new")),
    lambda a, r: (dict(q=_like(a, "q", sizes={2: 0})), ("q",)),
    lambda a, r: (_rows(a, ROWS + r.choice([-3, -1, 1, 4])), ("q",)),
    lambda a, r: (dict(draft_len=r.choice([0, -1, True, 2.0, "2", None])), ("draft_len",)),
    lambda a, r: (dict(draft_len=3), ("q",)),  # rows no longer k + k*k
    lambda a, r: (dict(softmax_scale=r.choice([0.0, -0.5, float("nan")])), ("softmax_scale",)),
    lambda a, r: ({r.choice(["k_cache", "v_cache"]): r.choice([None, 3.0, [1, 2]])}, ("k_cache", "v_cache")),
    lambda a, r: (dict(k_cache=a["k_cache"][0]), ("k_cache",)),
    lambda a, r: (dict(k_cache=_like(a, "k_cache", sizes={0: 3})), ("k_cache",)),
    lambda a, r: ({(n := r.choice(["k_cache", "v_cache"])): _like(a, n, sizes={2: 1})}, ("k_cache", "v_cache")),
    lambda a, r: ({(n := r.choice(["k_cache", "v_cache"])): _like(a, n, sizes={3: 32})}, ("k_cache", "v_cache")),
    lambda a, r: ({(n := r.choice(["k_cache", "v_cache"])): a[n].double()}, ("k_cache", "v_cache")),
    lambda a, r: (dict(v_cache=_like(a, "v_cache", sizes={1: 11})), ("v_cache",)),
    lambda a, r: (ALIASING[r.choice(list(ALIASING))][0](a), ("k_cache", "v_cache")),
    lambda a, r: (dict(cache_seqlens=a["cache_seqlens"].long()), ("cache_seqlens",)),
    lambda a, r: (dict(cache_seqlens=a["cache_seqlens"][:1]), ("cache_seqlens",)),
    lambda a, r: (dict(cache_seqlens=[3, 5]), ("cache_seqlens",)),
    lambda a, r: (dict(cache_seqlens=torch.tensor([r.randint(-9, -1), 0], dtype=torch.int32)), ("cache_seqlens",)),
    lambda a, r: (dict(cache_seqlens=torch.tensor([0, r.randint(9, 99)], dtype=torch.int32)), ("cache_seqlens",)),
]
MALFORMED_PAGED = [
    lambda a, r: (dict(block_table=a["block_table"].long()), ("block_table",)),
    lambda a, r: (dict(block_table=a["block_table"][:, :0]), ("block_table",)),
    lambda a, r: (dict(block_table=a["block_table"][:1]), ("block_table",)),
    lambda a, r: (dict(block_table=a["block_table"][1:].expand(2, 3)), ("block_table",)),
    lambda a, r: (dict(block_table=torch.tensor([[4, r.choice([-1, 6, 99])], [2, 5]], dtype=torch.int32)),
                  ("block_table",)),
    lambda a, r: (dict(block_table=torch.tensor([[4, 0], [r.choice([4, 0]), 5]], dtype=torch.int32)), ("block_table",)),
    lambda a, r: ({n: _like(a, n, sizes={1: MAX_PAGE_SIZE + 1}) for n in ("k_cache", "v_cache")}, ("k_cache",)),
    lambda a, r: ({n: _like(a, n, sizes={0: 0}) for n in ("k_cache", "v_cache")}, ("k_cache",)),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_random_malformed_decode_calls_raise_naming_an_argument_and_write_nothing(backend):
    """Seeded random malformed calls (one or two faults each): ValueError naming a faulty argument,
    every tensor of the call (the NaN-poisoned caches included) bit-identical afterwards."""
    rng = random.Random(1234)
    for trial in range(120):
        paged = rng.random() < 0.4
        args = cpu_decode_args(backend, paged=paged)
        pool = MALFORMED + (MALFORMED_PAGED if paged else [])
        names = set()
        for mutate in rng.sample(pool, rng.choice([1, 1, 2])):
            override, named = mutate(args, rng)
            args.update(override)
            names.update(named)
        saved = snapshot(args.values())
        with pytest.raises(ValueError) as error:
            tk.decode_attention(**args)
        assert any(name in str(error.value) for name in names), f"trial {trial}: {error.value} names none of {names}"
        assert_unchanged(saved)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cuda_emulated", marks=pytest.mark.skipif(
    backends.load("cuda_emulated") is None, reason="the emulated extension is not built"))])
def test_accept_drafts_rejects_aliased_lengths(backend):
    """accept_drafts writes cache_seqlens: an expanded one, or one inside another input, is refused."""
    drafts, logits = torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 3, 7)
    storage = torch.zeros(4, dtype=torch.int32)
    cases = [(storage[:1].expand(2), "cache_seqlens must not overlap itself"),
             (drafts.view(torch.int32)[0, :2], "cache_seqlens must not overlap drafts")]
    for lengths, message in cases:
        saved = snapshot([drafts, logits, lengths])
        with pytest.raises(ValueError, match=message):
            tk.accept_drafts(drafts, logits, logits.clone(), lengths, backend=backend)
        assert_unchanged(saved)
