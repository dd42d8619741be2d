"""Sampling (docs/semantics.md#sampling): warping, the speculative acceptance rule, and the loop's output law.

Statistical tests use fixed seeds (deterministic, so never flaky) and enough
samples that a wrong rule fails by a wide margin: the chi-square p-value must
exceed 1e-3, while e.g. skipping the residual distribution gives p ~ 0.
"""
import itertools

import pytest
import torch

from tidar_kernels.model.generate import ar_generate, sample, speculative_accept, tidar_generate, warp
from tidar_kernels.model.transformer import Transformer, TransformerConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square p-value of ``counts`` against ``probs`` (cells with p = 0 must be empty)."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    assert int(counts[probs == 0].sum()) == 0, "a zero-probability outcome occurred"
    keep = probs > 0
    expected = probs[keep] * counts.sum()
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2))


def test_warp_top_k_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
    assert torch.allclose(warp(logits, 1.0), logits.softmax(-1))
    top2 = warp(logits, 1.0, top_k=2)
    assert (top2[0, [1, 2, 3]] == 0).all() and torch.allclose(top2.sum(), torch.tensor(1.0))
    probs = logits.softmax(-1)[0]  # sorted: 4 (0.64), 0 (0.24), 1 (0.09), ...
    nucleus = warp(logits, 1.0, top_p=0.7)  # 0.64 < 0.7: needs the second token too
    assert (nucleus[0] > 0).tolist() == [True, False, False, False, True]
    assert torch.allclose(nucleus[0, [0, 4]], probs[[0, 4]] / probs[[0, 4]].sum())
    assert (warp(logits, 1.0, top_p=0.5)[0] > 0).tolist() == [False, False, False, False, True]
    assert torch.allclose(warp(logits, 0.5), (logits / 0.5).softmax(-1))


def test_sample_follows_weights():
    weights = torch.tensor([0.5, 0.0, 1.5, 2.0])  # unnormalised on purpose
    draws = sample(weights.expand(40000, 4), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4)
    assert chi_square_pvalue(counts, weights / weights.sum()) > 1e-3


def test_sample_never_picks_a_zero_weight_on_a_zero_race(monkeypatch):
    """An exponential race of exactly 0 must not turn 0/0 into NaN, which argmax would pick."""
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, *args, **kwargs: self.zero_())
    assert sample(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])).tolist() == [1, 2]


@pytest.mark.parametrize("case", range(4))
def test_speculative_accept_emits_the_target(case):
    """One verified slot (k = 2): d_1 ~ q is accepted or replaced; the emitted token must follow p.

    Also the second emitted token, when d_1 is accepted, is the bonus from p_2.
    """
    gen = torch.Generator().manual_seed(case)
    vocab, n = 5, 40000
    p1, q1, p2 = (torch.rand(vocab, generator=gen) ** 3 for _ in range(3))
    if case == 1:
        q1[2] = 0.0  # the drafter never proposes token 2: only residual sampling can produce it
    if case == 2:
        p1[0] = 0.0  # a token the target forbids must never be emitted
    p1, q1, p2 = p1 / p1.sum(), q1 / q1.sum(), p2 / p2.sum()
    drafts = torch.stack([torch.zeros(n, dtype=torch.long), sample(q1.expand(n, vocab), gen)], dim=1)
    draft_probs = torch.stack([q1, torch.zeros(vocab)]).expand(n, 2, vocab)
    target_probs = torch.stack([p1, p2]).expand(n, 2, vocab)
    accepted, targets = speculative_accept(drafts, draft_probs, target_probs, gen)
    assert set(accepted.tolist()) <= {1, 2}
    first = targets[:, 0]
    assert torch.equal(first[accepted == 2], drafts[accepted == 2, 1])  # accepted drafts are kept
    assert chi_square_pvalue(torch.bincount(first, minlength=vocab), p1) > 1e-3
    bonus = targets[accepted == 2, 1]
    assert chi_square_pvalue(torch.bincount(bonus, minlength=vocab), p2) > 1e-3
    # acceptance rate of an exact rule: sum_x min(p, q)
    rate = float((accepted == 2).double().mean())
    assert abs(rate - float(torch.minimum(p1, q1).sum())) < 0.01


def exact_sequence_probs(model, prompt, length, temperature, top_k=None, top_p=None):
    """The AR model's exact distribution over the next ``length`` tokens (enumerated; mask token excluded)."""
    vocab = model.config.vocab_size
    real = [t for t in range(vocab) if t != model.config.mask_token_id]
    seqs = list(itertools.product(real, repeat=length))
    ids = torch.tensor([prompt + list(s) for s in seqs])
    with torch.no_grad():
        logits = model.forward_causal(ids)[:, len(prompt) - 1:-1]
    logits[..., model.config.mask_token_id] = torch.finfo(logits.dtype).min
    probs = warp(logits, temperature, top_k, top_p)
    step_probs = probs.gather(-1, ids[:, len(prompt):, None])[..., 0]
    return seqs, step_probs.prod(-1)


@pytest.mark.parametrize("draft_len, temperature, top_k, top_p", [
    (2, 1.0, None, None), (3, 0.7, None, None), (3, 1.3, 3, None), (2, 1.0, None, 0.8),
], ids=["k2", "k3-T0.7", "k3-top3", "k2-topp0.8"])
def test_tidar_sampling_matches_ar_distribution(draft_len, temperature, top_k, top_p):
    """beta = 1: sequences sampled by TiDAR follow the causal model's own (warped) distribution."""
    torch.manual_seed(11)
    model = Transformer(TransformerConfig.from_name("tiny", vocab_size=5, mask_token_id=4)).eval()
    with torch.no_grad():  # sharper logits so the law is far from uniform
        model.tok_embeddings.weight.mul_(3.0)
    prompt, length, n = [1, 3, 0], 3, 12000
    seqs, probs = exact_sequence_probs(model, prompt, length, temperature, top_k, top_p)
    ids = torch.tensor([prompt]).expand(n, -1).contiguous()
    gen = torch.Generator().manual_seed(1)
    result = tidar_generate(model, ids, length, draft_len, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=gen)
    assert sum(result.acceptance_histogram[2:]) > n // 10  # drafts do get accepted
    index = {s: i for i, s in enumerate(seqs)}
    counts = torch.bincount(torch.tensor([index[tuple(s)] for s in result.tokens.tolist()]),
                            minlength=len(seqs))
    assert chi_square_pvalue(counts, probs) > 1e-3


def test_ar_sampling_matches_distribution():
    torch.manual_seed(11)
    model = Transformer(TransformerConfig.from_name("tiny", vocab_size=5, mask_token_id=4)).eval()
    prompt, length, n = [2, 2], 2, 8000
    seqs, probs = exact_sequence_probs(model, prompt, length, 1.0)
    result = ar_generate(model, torch.tensor([prompt]).expand(n, -1).contiguous(), length, temperature=1.0,
                         generator=torch.Generator().manual_seed(2))
    index = {s: i for i, s in enumerate(seqs)}
    counts = torch.bincount(torch.tensor([index[tuple(s)] for s in result.tokens.tolist()]),
                            minlength=len(seqs))
    assert chi_square_pvalue(counts, probs) > 1e-3


def test_sampling_without_residual_would_fail():
    """The test has power: emitting the draft's law instead of p's is rejected by the chi-square."""
    gen = torch.Generator().manual_seed(0)
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.3, 0.5])
    wrong = sample(q.expand(40000, 3), gen)
    assert chi_square_pvalue(torch.bincount(wrong, minlength=3), p) < 1e-6
