"""Accept-and-commit cases shared by the tests of the twin and of the CUDA kernels: random logits
with drafts that partly match, fp32 logits ordered by subnormals, and the check of an op
against the PyTorch twin (``reference.accept_drafts``)."""
import torch

from tidar_kernels.kernels.backends import reference

SUBNORMAL_VOCAB = 7


def random_case(batch, k, vocab, dtype, seed, tie_values=False, match_prob=0.7, beta=0.5, device="cpu"):
    """Random logits on ``device``, drafts that match the reference targets with probability match_prob,
    ragged lengths: ``(drafts, draft_logits, block_logits, cache_seqlens)``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if tie_values:  # few distinct values: many ties
        a = torch.randint(0, 4, (batch, k, vocab), generator=gen, device=device).to(dtype)
        b = torch.randint(0, 4, (batch, k, vocab), generator=gen, device=device).to(dtype)
    else:
        a = torch.randn(batch, k, vocab, generator=gen, device=device).to(dtype)
        b = torch.randn(batch, k, vocab, generator=gen, device=device).to(dtype)
    mixed = (beta * a.float() + (1.0 - beta) * b.float()).argmax(-1)
    drafts = torch.randint(0, vocab, (batch, k), generator=gen, device=device)
    keep = torch.rand(batch, k - 1, generator=gen, device=device) < match_prob
    drafts[:, 1:] = torch.where(keep, mixed[:, :-1], drafts[:, 1:])
    lengths = torch.randint(0, 1000, (batch,), generator=gen, device=device, dtype=torch.int32)
    return drafts, a, b, lengths


def check_against_twin(op, drafts, a, b, lengths, beta, active=None):
    """``op`` gives the twin's accepted counts and targets (int32 / int64) and commits the same lengths."""
    want_lengths, got_lengths = lengths.clone(), lengths.clone()
    want_acc, want_targets = reference.accept_drafts(drafts, a, b, want_lengths, active, beta)
    got_acc, got_targets = op(drafts, a, b, got_lengths, active, beta)
    if got_acc.is_cuda:
        torch.cuda.synchronize()
    assert got_acc.dtype == torch.int32 and got_targets.dtype == torch.int64
    assert torch.equal(got_targets, want_targets)
    assert torch.equal(got_acc, want_acc)
    assert torch.equal(got_lengths, want_lengths)


def subnormal_case():
    """fp32 logits [1, 3, SUBNORMAL_VOCAB] whose order is decided by subnormals: flushing them to zero
    (FTZ) changes every target.

    Row 0: the only nonzero is a subnormal at index 3 (FTZ: all zeros, argmax 0). Row 1: two
    subnormals, 2e-45 at 1 and 3e-45 at 5 (FTZ: tie at 0). Row 2: beta * a is subnormal while a is
    normal (beta = 0.5 halves 2^-126 to 2^-127). Drafts ``[[0, 3, 5]]`` match the exact targets
    ``[[3, 5, 6]]`` (beta 0.5), so FTZ also changes the accepted count.
    """
    tiny = torch.finfo(torch.float32).tiny  # 2^-126, smallest normal
    a = torch.zeros(1, 3, SUBNORMAL_VOCAB)
    a[0, 0, 3] = tiny / 4
    a[0, 1, 1], a[0, 1, 5] = 2e-45, 3e-45
    a[0, 2, 6] = tiny
    b = torch.zeros_like(a)
    b[0, 2, 2] = -tiny / 8  # a negative subnormal: FTZ would make it a zero tying index 0
    return a, b
