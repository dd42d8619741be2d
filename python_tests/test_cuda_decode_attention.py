"""The CUDA backend's fused decode step (``tidar::cached_attention_cuda``, Layout.DECODE).

CPU: the extension was built, loads, registers its ops, and its fake kernels give
the right shapes. GPU (marked, skipped without CUDA): outputs against the reference
under the tolerance rule of tidar_kernels/kernels/tolerance.py on odd shapes (n = 0, k = 1..16,
GQA 1/2/4/6, lengths differing per sequence, caches filled up to max_len), the
cache written at [n, n+k) and byte-identical elsewhere, CUDA-graph replay over
many steps together with the commit op, opcheck, and bad input raising before
any write. The skewed-splits and bad-input checks run on the ``cuda_emulated`` backend
too (the same kernel sources on the CPU), as cases of the same tests.
"""
import importlib
import os
import shutil

import pytest
import torch
from helpers.cuda_backends import EMULATED, ON_GPU, cached_attention_op, device_of
from helpers.cuda_checks import capture_after_warmup
from helpers.decode_steps import (DECODE, SKEWED_SPLITS, check_bad_decode_input_raises_before_any_write,
                                  check_cache_writes, check_step, make_skewed_step, make_step, references,
                                  split_weight_spread)

import tidar_kernels as tk
from tidar_kernels.kernels import backends
from tidar_kernels.kernels.backends import Call, reference
from tidar_kernels.kernels.mask import Layout
from tidar_kernels.kernels.tolerance import assert_close_by_rule


def _toolkit_present() -> bool:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return shutil.which("nvcc") is not None or os.path.exists(os.path.join(home, "bin", "nvcc"))


needs_extension_build = pytest.mark.skipif(
    os.environ.get("TIDAR_BUILD_CUDA") == "0" or torch.version.cuda is None or not _toolkit_present(),
    reason="the CUDA extension is not built here (TIDAR_BUILD_CUDA=0, CPU-only torch or no CUDA toolkit)")


# ================================================================================================
# CPU: the extension is built and registered
# ================================================================================================

@needs_extension_build
@pytest.mark.gpu_quick  # run where the extension was just built
def test_extension_imports_and_registers_ops():
    import tidar_kernels._C as ext

    # compiled_archs() lists e.g. "800,900" ("90a" shows as 900): each requested arch must be there.
    requested = os.environ.get("TIDAR_CUDA_ARCHS", "80;90a").split(";")
    compiled = ext.compiled_archs().split(",")
    for arch in filter(None, requested):
        assert f"{arch.rstrip('a')}0" in compiled, (arch, compiled)
    assert hasattr(torch.ops.tidar, "cached_attention_cuda")
    assert hasattr(torch.ops.tidar, "accept_drafts_cuda")
    assert backends.load("cuda") is not None
    assert "cuda" in tk.available_backends()


@needs_extension_build
def test_cuda_backend_declines_what_it_does_not_implement():
    cuda = backends.load("cuda")
    gpu = torch.device("cuda", 0)
    call = Call(backends.CACHED_ATTENTION, gpu, torch.bfloat16, 128, DECODE)
    assert not cuda.supports(call._replace(device=torch.device("cpu")))
    assert not cuda.supports(call._replace(dtype=torch.float32))
    assert not cuda.supports(call._replace(head_dim=96))
    for layout in (Layout.CAUSAL, Layout.TRAINING, Layout.PREFILL):
        assert not cuda.supports(call._replace(layout=int(layout)))
    accept = Call(backends.ACCEPT_DRAFTS, gpu, torch.float32, 0, DECODE)
    assert not cuda.supports(accept._replace(dtype=torch.float64))
    assert not cuda.supports(accept._replace(device=torch.device("cpu")))
    # On the CPU automatic selection never picks it (a plain-PyTorch backend answers there).
    assert backends.select(call._replace(device=torch.device("cpu")), None).name in ("cpu", "reference")


@needs_extension_build
def test_backend_answers_from_the_archs_compiled_in():
    """SASS for sm_XY runs on X.Z with Z >= Y only; 9.0 (sm_90a) only on 9.0; no list, no GPU."""
    from tidar_kernels.kernels.backends.cuda_ops import kernels_run_on

    assert kernels_run_on("800,900", (8, 0)) and kernels_run_on("800,900", (8, 6))
    assert kernels_run_on("800,900", (9, 0))
    for capability in [(7, 5), (10, 0), (12, 0)]:
        assert not kernels_run_on("800,900", capability), capability
    assert not kernels_run_on("900", (8, 0)) and not kernels_run_on("860", (8, 0))
    assert not kernels_run_on("unknown", (9, 0))


@needs_extension_build
def test_fp64_block_logits_fall_back_to_another_backend(monkeypatch):
    """accept_drafts' Call carries the dtype the logits are compared in: fp64 is declined before any launch."""
    seen = []
    select = backends.select
    monkeypatch.setattr(backends, "select", lambda call, requested: seen.append(call) or select(call, requested))
    logits = torch.zeros(1, 2, 5)
    logits[0, :, 3] = 1.0
    lengths = torch.zeros(1, dtype=torch.int32)
    accepted, _ = tk.accept_drafts(torch.tensor([[0, 3]]), logits.half(), logits.double(), lengths, beta=0.5)
    assert accepted.tolist() == [2] and lengths.tolist() == [2]
    assert seen[0].dtype == torch.float64
    assert not backends.load("cuda").supports(seen[0]._replace(device=torch.device("cuda", 0)))


@needs_extension_build
def test_fake_kernels_give_output_shapes():
    importlib.import_module("tidar_kernels.kernels.backends.cuda_ops")  # registers the fake kernels

    meta = dict(device="meta")
    k, batch, q_heads, kv_heads, dim, max_len = 3, 2, 8, 2, 64, 40
    steps = k + k * k
    q = torch.empty(batch, steps, q_heads, dim, dtype=torch.float16, **meta)
    kv = torch.empty(batch, steps, kv_heads, dim, dtype=torch.float16, **meta)
    cache = torch.empty(batch, max_len, kv_heads, dim, dtype=torch.float16, **meta)
    lengths = torch.empty(batch, dtype=torch.int32, **meta)
    out = torch.ops.tidar.cached_attention_cuda(q, kv, kv, cache, cache.clone(), lengths, None, DECODE, k, 0.125)
    assert out.shape == q.shape and out.dtype == q.dtype
    drafts = torch.empty(batch, k, dtype=torch.long, **meta)
    logits = torch.empty(batch, k, 100, dtype=torch.bfloat16, **meta)
    accepted, targets = torch.ops.tidar.accept_drafts_cuda(drafts, logits, logits, lengths, None, 0.5)
    assert accepted.shape == (batch,) and accepted.dtype == torch.int32
    assert targets.shape == (batch, k) and targets.dtype == torch.int64


# ================================================================================================
# GPU
# ================================================================================================

FP16, BF16 = torch.float16, torch.bfloat16
# Where a backend's steps live and what their unused cache rows hold: random values the kernel
# must not read on the GPU, NaN on the CPU (an emulated read of one shows in the output).
STEP_ON = {"cuda": dict(device="cuda", unused=None), "cuda_emulated": dict(device="cpu", unused=float("nan"))}
DTYPES = [pytest.param(FP16, id="fp16"), pytest.param(BF16, id="bf16")]
HEAD_DIMS = [pytest.param(64, id="d64"), pytest.param(128, id="d128")]
# (k, (q_heads, kv_heads), lengths per sequence, max_len)
SHAPES = [
    pytest.param(1, (4, 4), [0, 5], 16, id="k1-mha-n0"),
    pytest.param(2, (8, 4), [17, 0, 63], 80, id="k2-gqa2-3seqs"),
    pytest.param(3, (12, 2), [100, 1], 110, id="k3-gqa6"),
    pytest.param(4, (8, 2), [257, 64, 3], 300, id="k4-gqa4"),
    pytest.param(8, (6, 1), [504], 512, id="k8-mqa6-full"),
    pytest.param(16, (4, 1), [1000, 33], 1040, id="k16-gqa4"),
    pytest.param(16, (2, 2), [0, 48], 64, id="k16-mha-full-and-empty", marks=pytest.mark.gpu_quick),
    pytest.param(4, (8, 2), [8000], 8192, id="k4-long-many-splits", marks=pytest.mark.gpu_quick),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("k,heads,lengths,max_len", SHAPES)
def test_matches_reference(dtype, head_dim, k, heads, lengths, max_len):
    op = cached_attention_op("cuda")
    step = make_step(len(lengths), k, heads, head_dim, max_len, lengths, dtype, seed=k * 31 + head_dim,
                     **STEP_ON["cuda"])
    check_step(op, *step, k)


@pytest.mark.parametrize("backend,dtype,head_dim,unused", [
    pytest.param("cuda_emulated", FP16, 64, float("nan"), marks=EMULATED, id="cuda_emulated-fp16-d64"),
    pytest.param("cuda_emulated", BF16, 128, float("nan"), marks=EMULATED, id="cuda_emulated-bf16-d128"),
    pytest.param("cuda", FP16, 128, 1000.0, marks=ON_GPU, id="cuda-fp16-d128"),
    pytest.param("cuda", BF16, 128, 1000.0, marks=ON_GPU, id="cuda-bf16-d128"),
])
def test_skewed_split_magnitudes_within_rule(monkeypatch, backend, dtype, head_dim, unused):
    """Seven splits whose weights span > 10^6 in every row (early cache rows dominate) and whose
    values span 2^12: the partials, stored in the kernel's dtype (fp16/bf16), stay within the rule
    (its bound counts one rounding of each normalised partial). Rows past n hold ``unused``."""
    op = cached_attention_op(backend)
    monkeypatch.setenv("TIDAR_FORCE_DECODE_SPLITS", str(SKEWED_SPLITS))
    step = make_skewed_step(dtype, device_of(backend), head_dim, unused=unused)
    assert split_weight_spread(step[0], step[3], step[5], SKEWED_SPLITS).min() > 1e6
    check_step(op, *step, 2)


@pytest.mark.gpu
@pytest.mark.gpu_quick
def test_cuda_backend_supports_decode_on_this_gpu():
    cached_attention_op("cuda")
    cuda = backends.load("cuda")
    call = Call(backends.CACHED_ATTENTION, torch.device("cuda"), torch.bfloat16, 128, DECODE)
    major, _ = torch.cuda.get_device_capability()
    if major not in (8, 9):
        pytest.skip("the extension ships sm_80 and sm_90a kernels only")
    assert cuda.supports(call) and cuda.supports(call._replace(dtype=torch.float16, head_dim=64))
    assert cuda.supports(Call(backends.ACCEPT_DRAFTS, torch.device("cuda"), torch.float32, 0, DECODE))
    # Opt-in backend (automatic_on=()): named, it is used; unnamed, the GPU default stays another one.
    assert backends.select(call, "cuda").name == "cuda"
    assert backends.select(call, None).name != "cuda"


@pytest.mark.gpu
@pytest.mark.gpu_quick
def test_strided_inputs_and_custom_scale():
    """q/k/v as slices of one fused projection, a cache with spare heads: strides != shapes."""
    op = cached_attention_op("cuda")
    batch, k, q_heads, kv_heads, dim, max_len = 2, 4, 8, 2, 128, 200
    steps = k + k * k
    fused = torch.randn(batch, steps, q_heads + 2 * kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    q, k_new, v_new = fused.split([q_heads, kv_heads, kv_heads], dim=2)
    wide = torch.randn(2, batch, max_len, kv_heads + 1, dim, device="cuda", dtype=torch.bfloat16)
    k_cache, v_cache = wide[0, :, :, :kv_heads], wide[1, :, :, 1:]
    lengths = torch.tensor([150, 7], dtype=torch.int32, device="cuda")
    check_step(op, q, k_new, v_new, k_cache, v_cache, lengths, k, scale=0.05)


@pytest.mark.gpu
@pytest.mark.gpu_quick
def test_public_api_uses_cuda_backend():
    cached_attention_op("cuda")
    step = make_step(2, 3, (8, 2), 64, 50, [20, 30], torch.float16, **STEP_ON["cuda"])
    q, k_new, v_new, k_cache, v_cache, lengths = step
    hi, lo, bound = references(q, k_new, v_new, k_cache, v_cache, lengths, 3, 64 ** -0.5)
    out = tk.decode_attention(q, k_new, v_new, k_cache, v_cache, lengths, 3, backend="cuda")
    assert_close_by_rule(out, hi, lo, bound)


@pytest.mark.gpu
@pytest.mark.gpu_quick
def test_cuda_graph_replay_with_commit_over_many_steps():
    """One captured step (attention + accept) replayed 20 times: lengths advance on the device."""
    cached_attention_op("cuda")
    batch, k, heads, dim, vocab, max_len = 3, 4, (8, 2), 128, 512, 160
    dtype = torch.bfloat16
    q, k_new, v_new, k_cache, v_cache, lengths = make_step(batch, k, heads, dim, max_len, [0, 9, 40], dtype,
                                                           **STEP_ON["cuda"])
    draft_logits = torch.randn(batch, k, vocab, device="cuda", dtype=dtype)
    block_logits = torch.randn_like(draft_logits)
    drafts = torch.zeros(batch, k, dtype=torch.long, device="cuda")
    inputs = (q, k_new, v_new, draft_logits, block_logits, drafts)

    def step():
        out = tk.decode_attention(q, k_new, v_new, k_cache, v_cache, lengths, k, backend="cuda",
                                  check_lengths=False)
        accepted, targets = tk.accept_drafts(drafts, draft_logits, block_logits, lengths, beta=0.5,
                                             backend="cuda")
        return out, accepted, targets

    # the warm-up's commit is undone, so the real state starts clean
    graph, (out, accepted, targets) = capture_after_warmup(step, preserve=(k_cache, v_cache, lengths))

    gen = torch.Generator(device="cuda").manual_seed(1)
    for it in range(20):
        for t in inputs[:5]:
            t.copy_(torch.randn(t.shape, generator=gen, device="cuda").to(t.dtype))
        mixed = (0.5 * draft_logits.float() + 0.5 * block_logits.float()).argmax(-1)
        drafts.copy_(torch.randint(0, vocab, drafts.shape, generator=gen, device="cuda"))
        drafts[:, 1:k - 1] = mixed[:, :k - 2]  # accept about k - 1 drafts
        hi, lo, bound = references(q, k_new, v_new, k_cache, v_cache, lengths, k, dim ** -0.5)
        k_before, v_before, n_before = k_cache.clone(), v_cache.clone(), lengths.clone()
        want_acc, want_targets = reference.accept_drafts(drafts, draft_logits, block_logits,
                                                         n_before.clone(), None, 0.5)
        graph.replay()
        torch.cuda.synchronize()
        assert_close_by_rule(out, hi, lo, bound, name=f"step {it} output")
        check_cache_writes(k_before, v_before, k_cache, v_cache, k_new, v_new, n_before, k)
        assert torch.equal(accepted, want_acc) and torch.equal(targets, want_targets), f"step {it}"
        assert torch.equal(lengths, n_before + want_acc), f"step {it}"


@pytest.mark.gpu
@pytest.mark.gpu_quick
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    op = cached_attention_op("cuda")
    q, k_new, v_new, k_cache, v_cache, lengths = make_step(2, 2, (4, 2), 64, 40, [3, 30], dtype, **STEP_ON["cuda"])
    torch.library.opcheck(op, (q, k_new, v_new, k_cache, v_cache, lengths, None, DECODE, 2, 0.125))


@pytest.mark.parametrize("backend", [pytest.param("cuda_emulated", marks=EMULATED),
                                     pytest.param("cuda", marks=ON_GPU)])
def test_bad_input_raises_before_any_write(backend):
    """Each bad argument raises a clear error before any write; the GPU op also refuses a CPU tensor."""
    op = cached_attention_op(backend)
    step = make_step(2, 2, (4, 2), 64, 40, [3, 30], FP16, **STEP_ON[backend])
    if backend == "cuda":
        with pytest.raises(RuntimeError, match="v_new must be a CUDA tensor"):
            op(*step[:2], step[2].cpu(), *step[3:], None, DECODE, 2, 0.125)
    check_bad_decode_input_raises_before_any_write(op, step, 2)
