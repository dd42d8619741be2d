"""The CUDA kernels run on the CPU: the ``cuda_emulated`` backend (csrc/emulation/).

The same kernel sources as the ``cuda`` backend, behind the same binding checks, executed
by the emulator (an OS thread per CUDA thread, late-landing cp.async, ldmatrix/mma.sync with
the PTX fragment layouts). The cases of the GPU files scaled to the CPU: head dim 64 and 128,
fp16 and bf16, GQA groups 1, 2, 3, 4, 6, 8, draft lengths 1, 2, 3, 4, 8, 16, 32, caches from 0
to a few hundred rows with NaN in every unused row, split counts forced to 1, 3, 7
(TIDAR_FORCE_DECODE_SPLITS) or planned, caches filled to max_len, rows written and untouched;
the accept kernel's beta 0 / 0.5 / 1, inactive sequences, ragged lengths, strided and
mixed-dtype logits. Outputs against the reference under the tolerance rule. The checks the two
backends share case for case (seven splits whose weights and values span orders of magnitude,
bad input raising before any write; the accept kernel's ties, NaN and subnormals) are tests of
test_cuda_decode_attention.py and test_accept_drafts.py parametrised over both backends.
"""
import pytest
import torch
from helpers.accept_cases import check_against_twin, random_case
from helpers.cuda_backends import EMULATED, accept_drafts_op, cached_attention_op
from helpers.decode_steps import DECODE, check_step, make_step, references

import tidar_kernels as tk
from tidar_kernels.kernels import backends
from tidar_kernels.kernels.backends import Call, reference
from tidar_kernels.kernels.tolerance import assert_close_by_rule

pytestmark = EMULATED


# ================================================================================================
# Decode-step attention
# ================================================================================================

FP16, BF16 = torch.float16, torch.bfloat16
# (k, (q_heads, kv_heads), lengths per sequence, max_len, dtype, head_dim, forced splits or None)
CASES = [
    pytest.param(1, (4, 4), [0, 5], 16, FP16, 64, None, id="k1-g1-n0-fp16-d64-planned"),
    pytest.param(2, (8, 4), [17, 0, 63], 80, BF16, 64, 3, id="k2-g2-3seqs-bf16-d64-s3"),
    pytest.param(3, (6, 2), [100, 1], 110, FP16, 128, 7, id="k3-g3-fp16-d128-s7"),
    pytest.param(4, (8, 2), [190, 64], 200, BF16, 128, 3, id="k4-g4-bf16-d128-s3"),
    pytest.param(8, (6, 1), [192], 200, FP16, 64, 1, id="k8-g6-full-fp16-d64-s1"),
    pytest.param(16, (1, 1), [48], 64, BF16, 64, 7, id="k16-g1-full-bf16-d64-s7"),
    pytest.param(2, (8, 1), [300, 130], 310, FP16, 128, 3, id="k2-g8-fp16-d128-s3"),
    pytest.param(3, (4, 1), [37, 0], 40, BF16, 128, 1, id="k3-g4-full-and-empty-bf16-d128-s1"),
    # k = 32 (quadratic self-speculation's longest block): 1,056 rows, 17 local key tiles.
    pytest.param(32, (2, 1), [40], 72, FP16, 64, None, id="k32-g2-fp16-d64-planned"),
]


@pytest.mark.parametrize("k,heads,lengths,max_len,dtype,head_dim,splits", CASES)
def test_decode_matches_reference(monkeypatch, k, heads, lengths, max_len, dtype, head_dim, splits):
    op = cached_attention_op("cuda_emulated")
    if splits is not None:
        monkeypatch.setenv("TIDAR_FORCE_DECODE_SPLITS", str(splits))
    step = make_step(len(lengths), k, heads, head_dim, max_len, lengths, dtype, seed=k * 31 + head_dim)
    check_step(op, *step, k)


def test_split_counts_agree(monkeypatch):
    """One step under 1, 3 and 7 forced splits (chunks past n stay empty): each within the rule."""
    op = cached_attention_op("cuda_emulated")
    for splits in (1, 3, 7):
        monkeypatch.setenv("TIDAR_FORCE_DECODE_SPLITS", str(splits))
        step = make_step(1, 2, (4, 2), 64, 200, [190], FP16, seed=5)
        check_step(op, *step, 2, name=f"{splits} splits")


def test_forced_split_count_is_validated(monkeypatch):
    op = cached_attention_op("cuda_emulated")
    monkeypatch.setenv("TIDAR_FORCE_DECODE_SPLITS", "0")
    step = make_step(1, 1, (2, 2), 64, 8, [3], FP16)
    with pytest.raises(RuntimeError, match="TIDAR_FORCE_DECODE_SPLITS must be an integer in"):
        op(*step, None, DECODE, 1, 0.125)


def test_strided_inputs_and_custom_scale():
    """q/k/v as slices of one fused projection, caches as slices of one wider buffer."""
    op = cached_attention_op("cuda_emulated")
    batch, k, q_heads, kv_heads, dim, max_len = 2, 2, 4, 2, 64, 72
    steps = k + k * k
    fused = torch.randn(batch, steps, q_heads + 2 * kv_heads, dim, dtype=BF16)
    q, k_new, v_new = fused.split([q_heads, kv_heads, kv_heads], dim=2)
    wide = torch.full((2, batch, max_len, kv_heads + 1, dim), float("nan"), dtype=BF16)
    lengths = torch.tensor([65, 7], dtype=torch.int32)
    for b, n in enumerate(lengths.tolist()):
        wide[:, b, :n] = torch.randn(2, n, kv_heads + 1, dim).to(BF16)
    k_cache, v_cache = wide[0, :, :, :kv_heads], wide[1, :, :, 1:]
    check_step(op, q, k_new, v_new, k_cache, v_cache, lengths, k, scale=0.05)


def test_public_api_and_registry():
    assert "cuda_emulated" in tk.available_backends()
    emulated = backends.load("cuda_emulated")
    call = Call(backends.CACHED_ATTENTION, torch.device("cpu"), FP16, 64, DECODE)
    assert emulated.supports(call) and not emulated.supports(call._replace(head_dim=96))
    assert not emulated.supports(call._replace(dtype=torch.float32))
    assert not emulated.supports(Call(backends.ACCEPT_DRAFTS, torch.device("cpu"), torch.float64, 0, DECODE))
    assert backends.select(call, None).name in ("cpu", "reference")  # never picked automatically
    q, k_new, v_new, k_cache, v_cache, lengths = make_step(1, 2, (4, 2), 64, 30, [20], FP16)
    hi, lo, bound = references(q, k_new, v_new, k_cache, v_cache, lengths, 2, 64 ** -0.5)
    out = tk.decode_attention(q, k_new, v_new, k_cache, v_cache, lengths, 2, backend="cuda_emulated")
    assert_close_by_rule(out, hi, lo, bound)


def test_opcheck():
    op = cached_attention_op("cuda_emulated")
    step = make_step(1, 1, (2, 1), 64, 12, [5], BF16)
    step = tuple(t.nan_to_num() for t in step)  # opcheck compares repeated runs, NaN != NaN
    torch.library.opcheck(op, (*step, None, DECODE, 1, 0.125))


# ================================================================================================
# Accept and commit
# ================================================================================================

@pytest.mark.parametrize("dtype,batch,k,vocab,beta", [
    pytest.param(torch.float16, 1, 1, 50, 0.0, id="fp16-B1-k1-V50-beta0"),
    pytest.param(torch.bfloat16, 3, 4, 9001, 0.5, id="bf16-B3-k4-V9001-odd-beta0.5"),
    pytest.param(torch.float32, 2, 3, 4099, 1.0, id="fp32-B2-k3-V4099-beta1"),
    pytest.param(torch.float16, 1, 16, 1000, 0.3, id="fp16-B1-k16-V1000-beta0.3"),
])
def test_accept_matches_twin(dtype, batch, k, vocab, beta):
    op = accept_drafts_op("cuda_emulated")
    drafts, a, b, lengths = random_case(batch, k, vocab, dtype, seed=batch * 1000 + k, beta=beta)
    check_against_twin(op, drafts, a, b, lengths, beta)


def test_accept_inactive_strided_and_mixed_dtypes():
    op = accept_drafts_op("cuda_emulated")
    drafts, a, b, lengths = random_case(4, 3, 3000, torch.bfloat16, seed=7)
    wide_a = torch.randn(4, 3, 3008, dtype=torch.bfloat16)
    wide_a[..., :3000] = a
    active = torch.tensor([True, False, True, False])
    check_against_twin(op, drafts, wide_a[..., :3000], b, lengths, 1.0, active)
    check_against_twin(op, drafts, a, b.float(), lengths, 0.5)


def test_accept_public_api_opcheck_and_bad_input():
    op = accept_drafts_op("cuda_emulated")
    drafts, a, b, lengths = random_case(2, 2, 300, torch.bfloat16, seed=9)
    want = lengths.clone()
    want_acc, want_targets = reference.accept_drafts(drafts, a, b, want, None, 0.5)
    got_acc, got_targets = tk.accept_drafts(drafts, a, b, lengths, beta=0.5, backend="cuda_emulated")
    assert torch.equal(got_acc, want_acc) and torch.equal(got_targets, want_targets) and torch.equal(lengths, want)
    torch.library.opcheck(op, (drafts, a, b, lengths, torch.tensor([True, False]), 1.0))
    before = lengths.clone()
    with pytest.raises(RuntimeError, match="drafts must be int64"):
        op(drafts.int(), a, b, lengths, None, 0.5)
    with pytest.raises(RuntimeError, match="block_logits must be"):
        op(drafts, a, b[:, :1], lengths, None, 0.5)
    with pytest.raises(RuntimeError, match="block_logits must be float16, bfloat16 or float32"):
        op(drafts, a, b.double(), lengths, None, 0.5)
    assert torch.equal(lengths, before)
