"""Greedy accept-and-commit (docs/semantics.md#acceptance).

CPU: the PyTorch twin (backends/reference.py ``accept_drafts``, reached through
``tidar_kernels.accept_drafts``) against expectations worked out by hand from
logits with a known argmax. Subnormal logits, NaN and ties on random logits: one test
each over the backends (the twin, ``cuda_emulated`` on the CPU, ``cuda``). GPU (marked): the
CUDA op ``tidar::accept_drafts_cuda`` against the twin, opcheck, and CUDA-graph replay.
"""
import pytest
import torch
from helpers.accept_cases import check_against_twin, random_case, subnormal_case
from helpers.cuda_backends import EMULATED, ON_GPU, accept_drafts_op, device_of
from helpers.cuda_checks import capture_after_warmup

import tidar_kernels as tk
from tidar_kernels.kernels.backends import reference

VOCAB = 7


def peaked(*argmaxes, vocab=VOCAB, height=4.0):
    """Logits [len(argmaxes), vocab]: zeros with one peak per row at the given index."""
    rows = torch.zeros(len(argmaxes), vocab)
    for r, index in enumerate(argmaxes):
        rows[r, index] = height
    return rows


def accept(drafts, draft_logits, block_logits, lengths, beta=1.0, active=None):
    """Run the CPU twin; returns (accepted, targets, the lengths tensor it updated in place)."""
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32)
    accepted, targets = tk.accept_drafts(torch.tensor(drafts), draft_logits, block_logits, cache_seqlens,
                                         beta=beta, active=active, backend="reference")
    return accepted, targets, cache_seqlens


# --- single sequence, beta = 1 (trust AR): targets are argmax a_r ------------------------------

def test_partial_acceptance_stops_at_first_mismatch():
    # v_1..v_4 = argmax a_0..a_3 = 2, 5, 1, 3. Drafts d_1 = 2 and d_2 = 5 match, d_3 = 0 != 1.
    a = peaked(2, 5, 1, 3)[None]
    accepted, targets, lengths = accept([[6, 2, 5, 0]], a, torch.zeros_like(a), [10])
    assert accepted.tolist() == [3]
    assert targets.tolist() == [[2, 5, 1, 3]]
    assert lengths.tolist() == [13]  # 10 + 3 committed
    assert targets[0, accepted[0] - 1].item() == 1  # next first draft: the correction v_3


def test_all_accepted_gives_the_bonus_token():
    a = peaked(4, 4, 0)[None]
    accepted, targets, lengths = accept([[1, 4, 4]], a, torch.zeros_like(a), [0])
    assert accepted.tolist() == [3]
    assert lengths.tolist() == [3]
    assert targets[0, 2].item() == 0  # bonus: v_k from a_{k-1}


def test_first_draft_always_accepted_even_if_all_others_mismatch():
    a = peaked(1, 1, 1)[None]
    accepted, targets, lengths = accept([[3, 2, 1]], a, torch.zeros_like(a), [5])
    assert accepted.tolist() == [1]
    assert lengths.tolist() == [6]
    assert targets.tolist() == [[1, 1, 1]]


def test_draft_length_one_accepts_one():
    a = peaked(6)[None]
    accepted, targets, lengths = accept([[2]], a, torch.zeros_like(a), [7])
    assert accepted.tolist() == [1] and targets.tolist() == [[6]] and lengths.tolist() == [8]


def test_a_match_after_a_mismatch_is_not_accepted():
    # d_1 mismatches, d_2 would match v_2: acceptance stops at the first mismatch.
    a = peaked(3, 5, 0)[None]
    accepted, _, _ = accept([[0, 4, 5]], a, torch.zeros_like(a), [0])
    assert accepted.tolist() == [1]


# --- beta mixes a (AR) and b (diffusion) --------------------------------------------------------

# a row prefers token 1 (3.0), b row prefers token 2 (4.0); mixed = beta*a + (1-beta)*b:
#   beta = 1   -> [0, 3, 0, 0] -> 1
#   beta = 0   -> [0, 0, 4, 0] -> 2
#   beta = 0.5 -> [0, 1.5, 2, 0] -> 2
# a second row: a prefers 3 (5.0), b prefers 0 (2.0): beta 0.5 -> [1, 0, 0, 2.5] -> 3
@pytest.mark.parametrize("beta,expected", [(1.0, [1, 3]), (0.0, [2, 0]), (0.5, [2, 3])],
                         ids=["beta1", "beta0", "beta0.5"])
def test_beta_mixes_ar_and_diffusion_logits(beta, expected):
    a = torch.tensor([[0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0]])[None]
    b = torch.tensor([[0.0, 0.0, 4.0, 0.0], [2.0, 0.0, 0.0, 0.0]])[None]
    accepted, targets, lengths = accept([[0, expected[0]]], a, b, [4], beta=beta)
    assert targets.tolist() == [expected]
    assert accepted.tolist() == [2]  # d_1 was chosen equal to v_1
    assert lengths.tolist() == [6]


def test_beta_half_uses_the_sum_not_either_side():
    # Neither a nor b alone prefers token 3, their average does: a = [2, 0, 0, 1.5], b = [0, 2, 0, 1.5].
    a = torch.tensor([[2.0, 0.0, 0.0, 1.5]])[None]
    b = torch.tensor([[0.0, 2.0, 0.0, 1.5]])[None]
    _, targets, _ = accept([[0]], a, b, [0], beta=0.5)
    assert targets.tolist() == [[3]]


# --- batches -------------------------------------------------------------------------------------

def test_batch_with_different_lengths_and_acceptance():
    # k = 3; per sequence v = argmax a rows:
    #   seq 0: v = (1, 2, 3), drafts (0, 1, 2) -> d_1, d_2 match -> 3
    #   seq 1: v = (4, 4, 4), drafts (5, 0, 4) -> d_1 mismatch -> 1
    #   seq 2: v = (6, 0, 1), drafts (2, 6, 5) -> d_1 match, d_2 mismatch -> 2
    a = torch.stack([peaked(1, 2, 3), peaked(4, 4, 4), peaked(6, 0, 1)])
    accepted, targets, lengths = accept([[0, 1, 2], [5, 0, 4], [2, 6, 5]], a, torch.zeros_like(a),
                                        [0, 17, 100])
    assert accepted.dtype == torch.int32
    assert accepted.tolist() == [3, 1, 2]
    assert lengths.tolist() == [3, 18, 102]
    assert targets.tolist() == [[1, 2, 3], [4, 4, 4], [6, 0, 1]]
    next_first = targets.gather(1, (accepted.long() - 1)[:, None])[:, 0]
    assert next_first.tolist() == [3, 4, 0]  # bonus, correction, correction


def test_inactive_sequences_accept_nothing_and_keep_their_length():
    a = torch.stack([peaked(1, 2), peaked(3, 4)])
    accepted, targets, lengths = accept([[0, 1], [0, 3]], a, torch.zeros_like(a), [8, 9],
                                        active=torch.tensor([False, True]))
    assert accepted.tolist() == [0, 2]
    assert lengths.tolist() == [8, 11]
    assert targets.tolist() == [[1, 2], [3, 4]]  # targets are still computed


def test_lengths_are_updated_in_place():
    a = peaked(2, 2)[None]
    cache_seqlens = torch.tensor([5], dtype=torch.int32)
    before = cache_seqlens.data_ptr()
    tk.accept_drafts(torch.tensor([[0, 2]]), a, torch.zeros_like(a), cache_seqlens, backend="reference")
    assert cache_seqlens.data_ptr() == before and cache_seqlens.tolist() == [7]


def test_ties_go_to_the_lowest_index():
    a = torch.tensor([[1.0, 5.0, 5.0, 2.0], [3.0, 3.0, 3.0, 3.0]])[None]
    _, targets, _ = accept([[0, 1]], a, torch.zeros_like(a), [0])
    assert targets.tolist() == [[1, 0]]


# --- every backend: the same cases on the twin and on the CUDA kernels ---------------------------

@pytest.mark.parametrize("backend", ["reference", pytest.param("cuda_emulated", marks=EMULATED),
                                     pytest.param("cuda", marks=ON_GPU)])
def test_subnormal_logits_compare_exactly(backend):
    """Subnormal fp32 logits order exactly as in torch.argmax (the CUDA kernels are built with
    -ftz=false): the targets and accepted count worked out by hand, and the twin's."""
    op, device = accept_drafts_op(backend), device_of(backend)
    a, b = (t.to(device) for t in subnormal_case())
    assert a[0, 0, 3] != 0 and a[0, 1, 1] != 0  # the values really are subnormal, not flushed
    drafts, lengths = torch.tensor([[0, 3, 5]], device=device), torch.tensor([4], dtype=torch.int32, device=device)
    check_against_twin(op, drafts, a, b, lengths, 0.5)
    accepted, targets = op(drafts, a, b, lengths, None, 0.5)
    assert targets.tolist() == [[3, 5, 6]]
    assert accepted.tolist() == [3] and lengths.tolist() == [7]


@pytest.mark.parametrize("backend,vocab,last_nan", [pytest.param("cuda_emulated", 5000, 4500, marks=EMULATED),
                                                    pytest.param("cuda", 9000, 8000, marks=ON_GPU)])
def test_nan_wins_like_torch_argmax(backend, vocab, last_nan):
    op = accept_drafts_op(backend)
    drafts, a, b, lengths = random_case(2, 3, vocab, torch.float32, seed=11, device=device_of(backend))
    a[0, 1, 4321] = float("nan")
    a[1, 2, 7] = float("nan")
    a[1, 2, last_nan] = float("nan")
    check_against_twin(op, drafts, a, b, lengths, 1.0)


@pytest.mark.parametrize("backend,k,vocab,seed", [
    pytest.param("cuda_emulated", 3, 8200, 3, marks=EMULATED, id="cuda_emulated-k3-V8200"),
    pytest.param("cuda", 5, 37, 37, marks=pytest.mark.gpu, id="cuda-k5-V37"),
    pytest.param("cuda", 5, 8192, 8192, marks=pytest.mark.gpu, id="cuda-k5-V8192"),
    pytest.param("cuda", 5, 100003, 100003, marks=ON_GPU, id="cuda-k5-V100003"),
])
def test_ties_go_to_lowest_index_on_random_logits(backend, k, vocab, seed):
    op = accept_drafts_op(backend)
    drafts, a, b, lengths = random_case(4, k, vocab, torch.float16, seed=seed, tie_values=True,
                                        device=device_of(backend))
    check_against_twin(op, drafts, a, b, lengths, 0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_low_precision_logits(dtype):
    a = peaked(2, 5, 1)[None].to(dtype)
    accepted, targets, lengths = accept([[0, 2, 4]], a, torch.zeros_like(a), [1], beta=0.5)
    assert accepted.tolist() == [2] and targets.tolist() == [[2, 5, 1]] and lengths.tolist() == [3]


# ================================================================================================
# GPU: the CUDA op against the twin
# ================================================================================================

SHAPES = [
    pytest.param(1, 1, 50, id="B1-k1-V50"),
    pytest.param(1, 16, 151936, id="B1-k16-V151936"),
    pytest.param(3, 4, 32001, id="B3-k4-V32001-odd"),
    pytest.param(16, 16, 152064, id="B16-k16-V152064", marks=pytest.mark.gpu_quick),
    pytest.param(5, 3, 4099, id="B5-k3-V4099"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("batch,k,vocab", SHAPES)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.3], ids=["beta0", "beta0.5", "beta1", "beta0.3"])
def test_cuda_matches_twin(dtype, batch, k, vocab, beta):
    op = accept_drafts_op("cuda")
    drafts, a, b, lengths = random_case(batch, k, vocab, dtype, seed=batch * 1000 + k, beta=beta, device="cuda")
    check_against_twin(op, drafts, a, b, lengths, beta)


@pytest.mark.gpu
@pytest.mark.gpu_quick
def test_cuda_inactive_and_strided_logits():
    op = accept_drafts_op("cuda")
    drafts, a, b, lengths = random_case(4, 6, 5000, torch.bfloat16, seed=7, device="cuda")
    # logits as slices of a wider buffer: row strides are not vocab
    wide_a = torch.randn(4, 6, 5008, device="cuda", dtype=torch.bfloat16)
    wide_a[..., :5000] = a
    active = torch.tensor([True, False, True, False], device="cuda")
    check_against_twin(op, drafts, wide_a[..., :5000], b, lengths, 1.0, active)


@pytest.mark.gpu
@pytest.mark.gpu_quick
def test_cuda_mixed_logit_dtypes():
    op = accept_drafts_op("cuda")
    drafts, a, b, lengths = random_case(2, 4, 3000, torch.float16, seed=3, device="cuda")
    check_against_twin(op, drafts, a, b.float(), lengths, 0.5)


@pytest.mark.gpu
@pytest.mark.gpu_quick
def test_cuda_public_api_selects_cuda():
    accept_drafts_op("cuda")
    drafts, a, b, lengths = random_case(2, 4, 1000, torch.float16, seed=5, device="cuda")
    want = lengths.clone()
    want_acc, want_targets = reference.accept_drafts(drafts, a, b, want, None, 0.5)
    got_acc, got_targets = tk.accept_drafts(drafts, a, b, lengths, beta=0.5, backend="cuda")
    assert torch.equal(got_acc, want_acc) and torch.equal(got_targets, want_targets)
    assert torch.equal(lengths, want)


@pytest.mark.gpu
@pytest.mark.gpu_quick
def test_cuda_opcheck():
    op = accept_drafts_op("cuda")
    drafts, a, b, lengths = random_case(2, 4, 1000, torch.bfloat16, seed=9, device="cuda")
    torch.library.opcheck(op, (drafts, a, b, lengths, None, 0.5))
    active = torch.tensor([True, False], device="cuda")
    torch.library.opcheck(op, (drafts, a, b, lengths, active, 1.0))


@pytest.mark.gpu
@pytest.mark.gpu_quick
def test_cuda_bad_input_raises_before_launch():
    op = accept_drafts_op("cuda")
    drafts, a, b, lengths = random_case(2, 4, 1000, torch.float16, seed=1, device="cuda")
    before = lengths.clone()
    with pytest.raises(RuntimeError, match="drafts must be int64"):
        op(drafts.int(), a, b, lengths, None, 0.5)
    with pytest.raises(RuntimeError, match="block_logits must be"):
        op(drafts, a, b[:, :3], lengths, None, 0.5)
    with pytest.raises(RuntimeError, match="cache_seqlens must be a contiguous int32"):
        op(drafts, a, b, lengths.long(), None, 0.5)
    with pytest.raises(RuntimeError, match="active must be"):
        op(drafts, a, b, lengths, torch.ones(2, device="cuda"), 0.5)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        op(drafts, a.cpu(), b, lengths, None, 0.5)
    assert torch.equal(lengths, before)


@pytest.mark.gpu
@pytest.mark.gpu_quick
def test_cuda_graph_replay_advances_lengths():
    op = accept_drafts_op("cuda")
    batch, k, vocab = 3, 4, 2048
    drafts, a, b, lengths = random_case(batch, k, vocab, torch.float16, seed=0, device="cuda")
    static = [t.clone() for t in (drafts, a, b)]
    cache_seqlens = torch.zeros(batch, dtype=torch.int32, device="cuda")
    graph, (accepted, targets) = capture_after_warmup(lambda: op(*static, cache_seqlens, None, 0.5),
                                                      preserve=(cache_seqlens,))
    expected = torch.zeros_like(cache_seqlens)
    for step in range(10):
        new = random_case(batch, k, vocab, torch.float16, seed=100 + step, device="cuda")
        for dst, src in zip(static, new[:3]):
            dst.copy_(src)
        want_acc, want_targets = reference.accept_drafts(*new[:3], expected, None, 0.5)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(accepted, want_acc), f"step {step}"
        assert torch.equal(targets, want_targets), f"step {step}"
        assert torch.equal(cache_seqlens, expected), f"step {step}"
