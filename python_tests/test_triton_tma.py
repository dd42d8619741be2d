"""The opt-in TMA cache loop of the Triton cached kernel (``TIDAR_TRITON_TMA=1``).

With the switch on, contiguous caches on sm_90+ are read through device-side tensor
descriptors. On the CPU the Triton interpreter runs them (fp32/fp16): the results must
meet the tolerance rule on odd shapes (GQA, splits, NaN-poisoned rows past ``n`` inside
the tensor, lengths that are not a multiple of the key tile) and equal the pointer loop's
bit for bit. The planner must fall back to the pointer loop for paged, misaligned or
pre-sm_90 calls. The ``gpu`` tests compare TMA on and off on a Hopper GPU.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

import tidar_kernels as tk  # noqa: E402
from tidar_kernels.kernels.backends import triton_ops  # noqa: E402
from tidar_kernels.kernels.mask import Layout  # noqa: E402

from helpers.cached_cases import check_cached_call  # noqa: E402


class LaunchSpy:
    """Stands in for the cached kernel's launcher: records each launch's ``TMA`` flag and launches."""

    def __init__(self, launcher):
        self.launcher, self.tma = launcher, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.tma.append(kwargs["TMA"])
            return self.launcher[grid](*args, **kwargs)
        return launch


@pytest.fixture
def tma_spy(monkeypatch):
    """The switch on (what ``TIDAR_TRITON_TMA=1`` sets at import) and the launches recorded."""
    monkeypatch.setattr(triton_ops, "TMA_REQUESTED", True)
    spy = LaunchSpy(triton_ops._LAUNCH_CACHED)
    monkeypatch.setattr(triton_ops, "_LAUNCH_CACHED", spy)
    return spy


# (layout, k or 1, padded rows, cache lengths, (q_heads, kv_heads), head dim): lengths are not
# multiples of the key tile; 600-row caches split on the interpreter's small GPU.
CPU_CASES = [
    pytest.param(Layout.DECODE, 3, 1, (37, 1, 0), (6, 1), 16, id="decode-k3-gqa6-n37,1,0"),
    pytest.param(Layout.DECODE, 2, 1, (600, 5), (4, 2), 24, id="decode-k2-gqa2-d24-split"),
    pytest.param(Layout.PREFILL, 3, 9, (5, 131), (4, 1), 16, id="prefill-P9-k3-gqa4"),
    pytest.param(Layout.CAUSAL, 1, 7, (3, 70), (2, 2), 16, id="append-T7-mha"),
]


@pytest.mark.skipif(not INTERPRET, reason="interpreter case (the GPU twin is below)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout,draft_len,padded,cache_lens,heads,head_dim", CPU_CASES)
def test_tma_loop_meets_the_rule_with_poisoned_rows(tma_spy, layout, draft_len, padded, cache_lens, heads,
                                                     head_dim, dtype):
    """Rows past ``n`` inside the cache tensor hold NaN: TMA does not zero them (they are in
    bounds), so the kernel must mask them itself; the tolerance rule and the write contract
    are checked by ``check_cached_call``."""
    check_cached_call("triton", layout, cache_lens, heads, dtype, draft_len=draft_len, padded=padded,
                      prompt_lens=(padded,) * len(cache_lens) if layout == Layout.PREFILL else None,
                      head_dim=head_dim, poison="nan")
    assert tma_spy.tma and all(tma_spy.tma), "the TMA loop was not taken"


def _decode_inputs(dtype, cache_lens, heads, head_dim, draft_len, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows, (q_heads, kv_heads) = draft_len + draft_len * draft_len, heads
    max_len = max(cache_lens) + draft_len + 5

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype).to(device)

    q, k_new, v_new = randn(len(cache_lens), rows, q_heads, head_dim), *(
        randn(len(cache_lens), rows, kv_heads, head_dim) for _ in range(2))
    k_cache, v_cache = (randn(len(cache_lens), max_len, kv_heads, head_dim) for _ in range(2))
    seqlens = torch.tensor(cache_lens, dtype=torch.int32, device=device)
    unused = (torch.arange(max_len, device=device)[None, :] >= seqlens[:, None].long())[..., None, None]
    k_cache, v_cache = (torch.where(unused, float("nan"), c) for c in (k_cache, v_cache))
    return q, k_new, v_new, k_cache, v_cache, seqlens


def _decode_with_tma(monkeypatch, enabled, inputs, draft_len):
    """One decode step with the switch ``enabled``: (output, caches after, TMA flags launched)."""
    monkeypatch.setattr(triton_ops, "TMA_REQUESTED", enabled)
    spy = LaunchSpy(triton_ops._LAUNCH_CACHED)
    monkeypatch.setattr(triton_ops, "_LAUNCH_CACHED", spy)
    q, k_new, v_new, k_cache, v_cache, seqlens = inputs
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    out = tk.decode_attention(q, k_new, v_new, k_cache, v_cache, seqlens, draft_len, backend="triton")
    monkeypatch.setattr(triton_ops, "_LAUNCH_CACHED", spy.launcher)
    return out, k_cache, v_cache, spy.tma


@pytest.mark.skipif(not INTERPRET, reason="interpreter case (the GPU twin is below)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_tma_loop_equals_pointer_loop_bitwise_on_the_interpreter(monkeypatch, dtype):
    """Same tiles in the same order, so the same arithmetic: TMA changes only how tiles load."""
    inputs = _decode_inputs(dtype, (300, 67, 0), (4, 2), 16, 4, "cpu")
    out_on, k_on, v_on, flags_on = _decode_with_tma(monkeypatch, True, inputs, 4)
    out_off, k_off, v_off, flags_off = _decode_with_tma(monkeypatch, False, inputs, 4)
    assert flags_on == [True] and flags_off == [False]
    assert torch.equal(out_on, out_off)
    assert torch.equal(k_on.nan_to_num(), k_off.nan_to_num()) and torch.equal(v_on.nan_to_num(), v_off.nan_to_num())


def _cache(shape=(2, 40, 2, 16), dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


def test_tma_legal_only_for_aligned_contiguous_caches_on_sm90():
    cache = _cache()
    assert triton_ops.tma_legal(cache, cache, paged=False, capability=90)
    assert triton_ops.tma_legal(cache, cache, paged=False, capability=100)
    assert not triton_ops.tma_legal(cache, cache, paged=False, capability=89)  # no TMA unit before Hopper
    assert not triton_ops.tma_legal(cache, cache, paged=True, capability=90)  # rows gathered through a table
    odd_rows = _cache((2, 40, 1, 6))  # row stride 24 bytes: not a multiple of 16
    assert not triton_ops.tma_legal(odd_rows, odd_rows, paged=False, capability=90)
    shifted = torch.zeros(2 * 40 * 2 * 16 + 1)[1:].view(2, 40, 2, 16)  # base 4 bytes past an aligned address
    assert not triton_ops.tma_legal(cache, shifted, paged=False, capability=90)
    strided_dim = _cache((2, 40, 2, 32))[..., ::2]  # head dim not contiguous
    assert not triton_ops.tma_legal(strided_dim, strided_dim, paged=False, capability=90)
    wide_heads = _cache((2, 40, 4, 16))[:, :, 1:3]  # a slice of heads: offset and strides still aligned
    assert triton_ops.tma_legal(wide_heads, wide_heads, paged=False, capability=90)


@pytest.mark.skipif(not INTERPRET, reason="interpreter case")
@pytest.mark.parametrize("page_size,head_dim", [(None, 6), (3, 16)], ids=["misaligned-d6", "paged-page3"])
def test_switch_on_falls_back_to_the_pointer_loop(tma_spy, page_size, head_dim):
    """A call TMA cannot serve (24-byte rows; a paged pool) runs the pointer loop, correctly.
    (With a page size ``check_cached_call`` runs the paged call, then its contiguous twin, which
    takes TMA.)"""
    check_cached_call("triton", Layout.DECODE, (37, 4), (4, 2), torch.float32, draft_len=2, head_dim=head_dim,
                      page_size=page_size)
    assert tma_spy.tma == ([False] if page_size is None else [False, True])


@pytest.mark.skipif(not INTERPRET, reason="interpreter case")
def test_switch_on_falls_back_before_sm90(tma_spy, monkeypatch):
    ampere = dataclasses.replace(triton_ops.device_figures(torch.device("cpu")), capability=80)
    monkeypatch.setattr(triton_ops, "device_figures", lambda device: ampere)
    check_cached_call("triton", Layout.DECODE, (9,), (2, 1), torch.float32, draft_len=2)
    assert tma_spy.tma == [False]


def test_switch_is_read_at_import_and_off_by_default():
    import subprocess
    import sys
    if "TIDAR_TRITON_TMA" not in os.environ:
        assert triton_ops.TMA_REQUESTED is False
    code = "from tidar_kernels.kernels.backends import triton_ops; print(triton_ops.TMA_REQUESTED)"
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TIDAR_TRITON_TMA="1"),
                            capture_output=True, text=True, check=True)
    assert result.stdout.split()[-1] == "True"


# ----------------------------------------------------------------------------
# GPU: TMA on vs off on the same inputs (sm_90+)
# ----------------------------------------------------------------------------

needs_hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                                  reason="TMA needs an sm_90+ GPU")


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("heads,head_dim,draft_len,cache_lens",
                         [pytest.param((12, 2), 128, 16, (4093, 0, 1000), id="qwen1.5b-k16",
                                       marks=pytest.mark.gpu_quick),
                          pytest.param((32, 8), 128, 4, (16381,), id="qwen8b-k4-long"),
                          pytest.param((4, 2), 64, 3, (37, 1), id="small-d64")])
def test_tma_on_gpu_matches_pointer_loop(monkeypatch, heads, head_dim, draft_len, cache_lens, dtype):
    """Same inputs (NaN past ``n``), TMA on vs off: the rule between them (tiles and order are the
    same, so they should agree far inside it), the same cache writes, and TMA really taken."""
    from tidar_kernels.kernels.tolerance import assert_close_by_rule, attention_bounds
    from tidar_kernels.kernels.backends import reference
    from tidar_kernels.kernels.mask import layout_clean_rows
    inputs = _decode_inputs(dtype, cache_lens, heads, head_dim, draft_len, "cuda")
    out_on, k_on, v_on, flags_on = _decode_with_tma(monkeypatch, True, inputs, draft_len)
    out_off, k_off, v_off, flags_off = _decode_with_tma(monkeypatch, False, inputs, draft_len)
    assert flags_on == [True] and flags_off == [False]
    assert torch.equal(k_on.nan_to_num(), k_off.nan_to_num()) and torch.equal(v_on.nan_to_num(), v_off.nan_to_num())
    q, k_new, v_new, k_cache, v_cache, seqlens = inputs
    rows = q.shape[1]
    allowed = reference.cached_mask(Layout.DECODE, seqlens, k_cache.shape[1], rows,
                                    layout_clean_rows(Layout.DECODE, rows, draft_len), draft_len, None)
    keys, values = torch.cat([k_cache.nan_to_num(), k_new], 1), torch.cat([v_cache.nan_to_num(), v_new], 1)
    scale = head_dim ** -0.5
    hi = reference.masked_attention(q.double(), keys.double(), values.double(), allowed, scale,
                                    dtype=torch.float64)[0]
    bound = attention_bounds(q, keys, values, allowed, scale, dtype)["out"]
    assert_close_by_rule(out_on, hi, out_off, bound, name="TMA out vs fp64, pointer loop as the low-precision twin")


@pytest.mark.gpu
@pytest.mark.gpu_quick
@needs_hopper
def test_tma_decode_step_under_torch_compile(monkeypatch):
    """torch.compile traces the op on fake tensors (``tma_legal`` then checks offsets only) and
    launches the TMA kernel from its own code: same output and cache writes as eager TMA."""
    monkeypatch.setattr(triton_ops, "TMA_REQUESTED", True)
    draft_len = 3
    q, k_new, v_new, k_cache, v_cache, seqlens = _decode_inputs(torch.bfloat16, (3, 400), (6, 2), 64, draft_len,
                                                                "cuda")
    k_cache, v_cache = k_cache.nan_to_num(), v_cache.nan_to_num()

    def decode(q_, k_new_, v_new_, k_cache_, v_cache_, lengths):
        return tk.decode_attention(q_, k_new_, v_new_, k_cache_, v_cache_, lengths, draft_len, backend="triton")

    eager_cache = (k_cache.clone(), v_cache.clone())
    expected = decode(q, k_new, v_new, *eager_cache, seqlens)
    got = torch.compile(decode, fullgraph=True)(q, k_new, v_new, k_cache, v_cache, seqlens)
    assert torch.equal(got, expected)
    assert torch.equal(k_cache, eager_cache[0]) and torch.equal(v_cache, eager_cache[1])


# ----------------------------------------------------------------------------
# The codegen report's handling of the opt-in rows (CI runs the report itself)
# ----------------------------------------------------------------------------


@pytest.fixture
def report(monkeypatch):
    """``scripts/triton_codegen_report.py`` as a module; the variables it sets on import are restored."""
    import importlib
    import sys
    from pathlib import Path
    for name in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "scripts"))
    module = importlib.import_module("triton_codegen_report")
    yield module
    sys.modules.pop("triton_codegen_report", None)


def test_report_counts_predicated_ptx_instructions(report):
    ptx = ("\t@%p15 cp.async.bulk.tensor.2d.shared::cta.global.mbarrier::complete_tx::bytes [%r1], [%rd2, {%r3}], [%r4];\n"
           "\tcp.async.bulk.tensor.2d.shared::cta.global [%r1], [%rd2, {%r3}], [%r4];\n"
           "\t// cp.async.bulk.tensor in a comment\n"
           "\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd1, %rd2, 1, 1, 1, 0, 0;\n")
    assert report.ptx_count(ptx, r"cp\.async\.bulk\.tensor") == 2
    assert report.ptx_count(ptx, r"wgmma\.mma_async") == 1
    assert report.ptx_count(ptx, r"mma\.sync") == 0


def test_report_keeps_opt_in_rows_out_of_the_failing_checks(report):
    row = {"kernel": "cached_attention", "shape": "decode-x-tma", "arch": "sm_90a", "compute_bound": True,
           "spills": 0, "mma_sync": 0, "tma": 8}
    spilling = row | {"spills": 64, "experimental": True}
    assert report.failures([row | {"experimental": False, "spills": 64}])  # a default row fails
    assert report.failures([spilling]) == []
    notes = report.experimental_notes([spilling])
    assert any("64 bytes of register spills" in note for note in notes)
    assert any("8 TMA copies" in note for note in notes)
