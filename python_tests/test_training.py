"""The TiDAR objective (docs/semantics.md#loss): labels, loss, gradients, what the mask half sees."""
import math

import pytest
import torch
from helpers.models import tiny

from tidar_kernels.training.objective import (IGNORE_INDEX, PAD_DOC_ID, build_training_batch, causal_labels, label_counts,
                                    tidar_loss)

MASK = 96  # the "tiny" config's mask token id


# ----------------------------------------------------------------------------
# Layout and labels
# ----------------------------------------------------------------------------


def test_layout_and_labels_one_document():
    x = torch.tensor([[5, 6, 7, 8, 9, 10]])
    batch = build_training_batch(x, MASK, block_size=2)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 10] + [MASK] * 6]
    # clean i -> x_{i+1} (last has none); mask i -> x_i
    assert batch.labels.tolist() == [[6, 7, 8, 9, 10, IGNORE_INDEX, 5, 6, 7, 8, 9, 10]]


def test_labels_respect_document_boundaries_and_padding():
    # docs: A = x0..x2, B = x3..x4, padding x5; block size 2: blocks [0,1] ctx 0, [2,3] ctx 2, [4,5] ctx 4
    x = torch.tensor([[11, 12, 13, 21, 22, 0]])
    docs = torch.tensor([[0, 0, 0, 1, 1, PAD_DOC_ID]])
    labels = build_training_batch(x, MASK, 2, docs).labels[0].tolist()
    ig = IGNORE_INDEX
    # AR: 11->12, 12->13, 13->21 crosses A|B, 21->22, 22->pad, pad->none
    assert labels[:6] == [12, 13, ig, 22, ig, ig]
    # diffusion: block 0 (no context) keeps 11, 12; block 1 sees x0..x1 (doc A): keeps 13 (A), drops 21 (B);
    # block 2 sees x0..x3, last visible x3 is doc B: keeps 22, drops padding
    assert labels[6:] == [11, 12, 13, ig, 22, ig]
    assert label_counts(build_training_batch(x, MASK, 2, docs).labels) == (3, 4)
    assert causal_labels(x, docs)[0].tolist() == [12, 13, ig, 22, ig, ig]


def test_ignore_index_is_never_a_token_id():
    assert IGNORE_INDEX < 0


@pytest.mark.parametrize("case, kwargs, match", [
    ("seq_len not a multiple of block_size", dict(tokens=torch.zeros(1, 6, dtype=torch.long), block_size=4),
     "multiple of block_size"),
    ("missing mask token", dict(mask_token_id=None), "mask_token_id"),
    ("mask token in the clean half", dict(tokens=torch.full((1, 4), MASK)), "must not contain the mask token"),
    ("float tokens", dict(tokens=torch.zeros(1, 4)), "int64"),
    ("doc_ids shape", dict(doc_ids=torch.zeros(1, 3, dtype=torch.long)), "doc_ids"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_batches_raise(case, kwargs, match):
    args = dict(tokens=torch.zeros(1, 4, dtype=torch.long), mask_token_id=MASK, block_size=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        build_training_batch(**args)


# ----------------------------------------------------------------------------
# Loss equals a hand computation
# ----------------------------------------------------------------------------


def _hand_ce(logits_row, target):
    """-log softmax(logits_row)[target], written out."""
    z = [float(v) for v in logits_row]
    top = max(z)
    return -(z[target] - top - math.log(sum(math.exp(v - top) for v in z)))


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0], ids=["alpha0", "alpha1", "alpha2"])
def test_loss_equals_hand_computation(alpha):
    torch.manual_seed(3)
    vocab = 5
    labels = torch.tensor([[2, 4, IGNORE_INDEX, 1, 0, IGNORE_INDEX],
                           [3, IGNORE_INDEX, IGNORE_INDEX, 4, 4, 2]])
    logits = torch.randn(2, 6, vocab, dtype=torch.float64)
    ar_terms, diff_terms = [], []
    for b in range(2):
        for i in range(6):
            if labels[b, i] != IGNORE_INDEX:
                (ar_terms if i < 3 else diff_terms).append(_hand_ce(logits[b, i], int(labels[b, i])))
    ar = sum(ar_terms) / len(ar_terms)
    diff = sum(diff_terms) / len(diff_terms)
    loss = tidar_loss(logits, labels, alpha)
    assert (len(ar_terms), len(diff_terms)) == (3, 5)
    assert float(loss.ar) == pytest.approx(ar, rel=1e-6)
    assert float(loss.diffusion) == pytest.approx(diff, rel=1e-6)
    assert float(loss.total) == pytest.approx((alpha * ar + diff) / (1 + alpha), rel=1e-6)


def test_loss_with_global_counts_adds_up_over_micro_batches():
    """Splitting a batch and dividing by the whole batch's counts gives the whole batch's loss."""
    torch.manual_seed(4)
    labels = torch.randint(0, 7, (4, 8))
    labels[torch.rand(4, 8) < 0.3] = IGNORE_INDEX
    logits = torch.randn(4, 8, 7, dtype=torch.float64)
    whole = tidar_loss(logits, labels, 2.0)
    n_ar, n_diff = label_counts(labels)
    parts = [tidar_loss(logits[i:i + 1], labels[i:i + 1], 2.0, n_ar, n_diff) for i in range(4)]
    for name in ("total", "ar", "diffusion"):
        assert float(sum(getattr(p, name) for p in parts)) == pytest.approx(float(getattr(whole, name)), rel=1e-9)


def test_loss_rejects_bad_shapes_and_alpha():
    with pytest.raises(ValueError, match="logits must be"):
        tidar_loss(torch.zeros(1, 4, 3), torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="alpha"):
        tidar_loss(torch.zeros(1, 4, 3), torch.zeros(1, 4, dtype=torch.long), alpha=-1.0)


# ----------------------------------------------------------------------------
# Through the model: gradients and what the mask half sees
# ----------------------------------------------------------------------------


def test_gradients_reach_every_parameter():
    model = tiny().train().double()
    x = torch.randint(0, MASK, (2, 8))
    batch = build_training_batch(x, MASK, 4)
    loss = tidar_loss(model.forward_training(batch.input_ids, 4), batch.labels)
    loss.total.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"


def test_ar_part_alone_gives_no_gradient_through_mask_rows():
    """alpha -> only-AR: the diffusion half's logits do not enter the AR part (sanity of the split)."""
    model = tiny().train().double()
    x = torch.randint(0, MASK, (1, 8))
    batch = build_training_batch(x, MASK, 4)
    logits = model.forward_training(batch.input_ids, 4)
    logits.retain_grad()
    tidar_loss(logits, batch.labels).ar.backward()
    assert logits.grad[:, 8:].abs().max() == 0
    assert logits.grad[:, :8].abs().max() > 0


@pytest.mark.parametrize("block_size", [2, 4], ids=["B2", "B4"])
def test_mask_position_never_sees_its_label(block_size):
    """Changing x_i, or any clean token at or after the start of i's block, leaves mask logit i unchanged;
    changing a clean token before the block does change it (the test would notice a leak)."""
    model = tiny(seed=1).train().double()
    seq_len = 8
    torch.manual_seed(5)
    x = torch.randint(0, MASK, (1, seq_len))

    def mask_logits(tokens):
        return model.forward_training(build_training_batch(tokens, MASK, block_size).input_ids,
                                      block_size)[0, seq_len:]

    base = mask_logits(x)
    for i in range(seq_len):
        block_start = i // block_size * block_size
        for j in range(seq_len):
            changed = x.clone()
            changed[0, j] = (x[0, j] + 1 + j) % MASK
            diff = (mask_logits(changed)[i] - base[i]).abs().max()
            if j >= block_start:
                assert diff == 0, f"mask position {i} saw clean token {j} (block starts at {block_start})"
            else:
                assert diff > 1e-9, f"mask position {i} should see clean token {j}"


# ----------------------------------------------------------------------------
# Self-distillation: mask row i learns clean row i - 1's (detached) prediction of x_i
# ----------------------------------------------------------------------------


def _two_document_batch():
    # docs A = x0..x4, B = x5..x7 (block 2): mask row 0 has no teacher, clean row 4's label crosses A|B
    x = torch.tensor([[11, 12, 13, 14, 15, 21, 22, 23], [31, 32, 33, 34, 35, 36, 37, 38]])
    docs = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1], [0] * 8])
    return build_training_batch(x, MASK, 2, docs).labels


def test_hard_distill_from_a_perfect_ar_head_is_the_true_token_loss():
    labels = _two_document_batch()
    half = labels.shape[1] // 2
    torch.manual_seed(0)
    logits = torch.randn(*labels.shape, 100, dtype=torch.float64)
    for b, p in zip(*torch.nonzero(labels[:, :half] != IGNORE_INDEX, as_tuple=True)):
        logits[b, p, labels[b, p]] = 50.0  # clean row p's argmax is its next token x_{p+1}
    plain = tidar_loss(logits, labels, alpha=0.5)
    distilled = tidar_loss(logits, labels, alpha=0.5, distill="hard", distill_weight=1.0)
    assert torch.allclose(distilled.distill, plain.diffusion, rtol=0, atol=1e-12)
    assert torch.allclose(distilled.total, plain.total, rtol=0, atol=1e-12)
    # a wrong teacher changes it: the alignment is clean row i - 1 for mask row i, not clean row i
    shifted = logits.clone()
    shifted[:, :half] = logits[:, :half].roll(1, dims=1)
    assert not torch.allclose(tidar_loss(shifted, labels, distill="hard", distill_weight=1.0).distill,
                              plain.diffusion)


def test_soft_distill_targets_are_detached_and_the_mix_is_linear():
    labels = _two_document_batch()
    half = labels.shape[1] // 2
    logits = torch.randn(*labels.shape, 100, dtype=torch.float64, requires_grad=True)
    loss = tidar_loss(logits, labels, alpha=0.0, distill="soft", distill_weight=1.0)
    loss.total.backward()
    assert torch.count_nonzero(logits.grad[:, :half]) == 0  # no gradient through the teacher
    assert torch.count_nonzero(logits.grad[:, half:]) > 0
    mixed = tidar_loss(logits, labels, alpha=0.0, distill="soft", distill_weight=0.25)
    assert torch.allclose(mixed.total, 0.75 * mixed.diffusion + 0.25 * mixed.distill)


@pytest.mark.parametrize("kwargs, match", [(dict(distill="soft", distill_weight=1.5), r"distill_weight must lie in \[0, 1\]"),
                                           (dict(distill="soft", distill_weight=-0.1), r"distill_weight must lie in \[0, 1\]"),
                                           (dict(distill="kl"), "distill must be one of")])
def test_bad_distill_arguments_are_named(kwargs, match):
    from tidar_kernels.training.config import TrainArgs, parse_args
    labels = _two_document_batch()
    with pytest.raises(ValueError, match=match):
        tidar_loss(torch.zeros(*labels.shape, 100), labels, **kwargs)
    with pytest.raises(ValueError, match=match):
        TrainArgs(**kwargs).validate()
    assert parse_args(["--distill", "hard", "--distill-weight", "0.3"])[0].distill_weight == 0.3
