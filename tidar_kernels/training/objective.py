"""The TiDAR training objective (docs/semantics.md#loss): layout, labels and loss.

A training row of ``S`` clean tokens ``x_0..x_{S-1}`` becomes an input of
length ``2S``: the clean tokens, then ``S`` mask tokens ("full mask": no random
corruption, no timestep). The attention rule, the mask blocks of size ``B`` and
the position ids ``[0..S-1, 0..S-1]`` come from :mod:`tidar_kernels.kernels.mask`
through the model's ``forward_training``; this module only builds the inputs
and labels and computes the loss:

* clean position ``i`` predicts ``x_{i+1}`` (shifted): the AR loss;
* mask position ``i`` predicts ``x_i`` (same position): the diffusion loss;
* ``L = (alpha * mean CE_AR + mean CE_diff) / (1 + alpha)``.

Self-distillation (:func:`distill_loss`) replaces part of the diffusion target
by the model's own AR prediction from the clean half of the same forward:
``CE_diff`` becomes ``(1 - W) * CE_true + W * CE_distill``. Mask row ``i``
predicts ``x_i``, and so does clean row ``i - 1`` (it predicts the next token),
so clean row ``i - 1``'s logits (detached) are the teacher of mask row ``i``.

Positions without a label carry :data:`IGNORE_INDEX`, which is negative and so
never a token id. A label is dropped when its target is padding, or when the
last clean token the predicting position sees belongs to another document than
the target (packed rows hold several documents; predicting the next document's
tokens from the previous one's text teaches nothing). For the AR half that is
the usual "no label across a boundary"; for mask position ``i`` in block ``J``
the last visible clean token is ``x_{B*J - 1}``, so a block that starts in one
document and continues into the next keeps labels only for the first one's
tokens. Block 0 sees no clean token and keeps its labels (a row start).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..kernels.mask import check_training_shape

DISTILL_MODES = ("none", "soft", "hard")
"""Self-distillation targets: none, the AR distribution (soft) or its argmax (hard)."""

IGNORE_INDEX = -100
"""Label of a position that has no target (padding, document boundary, last clean token)."""

PAD_DOC_ID = -1
"""Document id of padding tokens in ``doc_ids``."""


@dataclass
class TrainingBatch:
    """Inputs and labels of the ``2S`` training layout, ``[batch, 2S]`` int64 each."""

    input_ids: torch.Tensor
    labels: torch.Tensor


@dataclass
class TiDARLoss:
    """The weighted objective and its two parts (scalar tensors; ``total`` is differentiable)."""

    total: torch.Tensor
    ar: torch.Tensor
    diffusion: torch.Tensor  # the true-token diffusion loss
    distill: Optional[torch.Tensor] = None  # the self-distillation term, when distilling


def build_training_batch(tokens: torch.Tensor, mask_token_id: int, block_size: int,
                         doc_ids: Optional[torch.Tensor] = None) -> TrainingBatch:
    """Build the ``[clean | full mask]`` inputs and their labels from clean rows.

    ``tokens`` int64 ``[batch, S]`` with ``S`` a multiple of ``block_size``;
    ``doc_ids`` (same shape, optional) numbers the document of every token, with
    :data:`PAD_DOC_ID` for padding; without it the row is one document.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
        got = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be an int64 tensor [batch, seq_len], got {got}")
    batch, seq_len = tokens.shape
    check_training_shape(seq_len, block_size)
    if mask_token_id is None or isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) \
            or mask_token_id < 0:
        raise ValueError(f"mask_token_id must be a token id >= 0 (a dedicated [M] token), got {mask_token_id!r}")
    if bool((tokens == mask_token_id).any()):
        raise ValueError(f"tokens must not contain the mask token id {mask_token_id}: "
                         "the mask token is reserved for the mask half")
    if doc_ids is None:
        doc_ids = torch.zeros_like(tokens)
    elif doc_ids.shape != tokens.shape:
        raise ValueError(f"doc_ids must have tokens' shape {tuple(tokens.shape)}, got {tuple(doc_ids.shape)}")
    doc_ids = doc_ids.to(tokens.device)
    is_pad = doc_ids == PAD_DOC_ID

    ar_labels = torch.full_like(tokens, IGNORE_INDEX)
    same_doc = doc_ids[:, 1:] == doc_ids[:, :-1]
    keep_ar = same_doc & ~is_pad[:, 1:]
    ar_labels[:, :-1] = torch.where(keep_ar, tokens[:, 1:], IGNORE_INDEX)

    # Last clean token visible to mask position i: x_{ctx-1}, ctx = B * (i // B).
    ctx = torch.arange(seq_len, device=tokens.device) // block_size * block_size
    has_context = ctx > 0
    context_doc = doc_ids[:, (ctx - 1).clamp(min=0)]
    keep_diff = ~is_pad & (~has_context[None, :] | (context_doc == doc_ids))
    diff_labels = torch.where(keep_diff, tokens, IGNORE_INDEX)

    masks = torch.full_like(tokens, mask_token_id)
    return TrainingBatch(input_ids=torch.cat([tokens, masks], dim=1),
                         labels=torch.cat([ar_labels, diff_labels], dim=1))


def label_counts(labels: torch.Tensor) -> tuple[int, int]:
    """Numbers of labelled positions ``(AR half, diffusion half)`` of ``[batch, 2S]`` labels."""
    half = labels.shape[1] // 2
    valid = labels != IGNORE_INDEX
    return int(valid[:, :half].sum()), int(valid[:, half:].sum())


def distill_loss(logits: torch.Tensor, labels: torch.Tensor, mode: str,
                 diffusion_tokens: Optional[int] = None) -> torch.Tensor:
    """Cross-entropy of the mask rows to the model's own detached AR prediction of the same token.

    ``logits [batch, 2S, vocab]`` and ``labels [batch, 2S]`` as in
    :func:`tidar_loss`. The teacher of mask row ``i`` (target ``x_i``) is clean
    row ``i - 1`` (AR prediction of ``x_i``): ``soft`` targets its softmax,
    ``hard`` its argmax, both without gradient. Mask rows without a teacher
    (row 0, whose token no clean row predicts, and rows whose teacher's label
    crosses a document boundary) keep the true token. Summed over the labelled
    mask rows and divided by ``diffusion_tokens`` (default: their count), like
    the diffusion loss, so a perfect AR head with ``hard`` gives that loss exactly.
    """
    if mode not in DISTILL_MODES[1:]:
        raise ValueError(f"distill must be one of {list(DISTILL_MODES[1:])} here, got {mode!r}")
    half = labels.shape[1] // 2
    logits = logits if logits.dtype == torch.float64 else logits.float()
    student, truth = logits[:, half:], labels[:, half:]
    teacher = logits[:, :half - 1].detach()  # clean row i - 1 teaches mask row i, i >= 1
    has_teacher = torch.zeros_like(truth, dtype=torch.bool)
    has_teacher[:, 1:] = labels[:, :half - 1] != IGNORE_INDEX
    has_teacher &= truth != IGNORE_INDEX
    true_ce = F.cross_entropy(student.flatten(0, 1), truth.flatten(), ignore_index=IGNORE_INDEX,
                              reduction="none").view(truth.shape)
    rows = student[:, 1:]
    if mode == "hard":
        teacher_ce = F.cross_entropy(rows.flatten(0, 1), teacher.argmax(-1).flatten(),
                                     reduction="none").view(teacher.shape[:2])
    else:
        teacher_ce = -(teacher.softmax(-1) * rows.log_softmax(-1)).sum(-1)
    ce = true_ce.clone()
    ce[:, 1:] = torch.where(has_teacher[:, 1:], teacher_ce, true_ce[:, 1:])
    count = int((truth != IGNORE_INDEX).sum()) if diffusion_tokens is None else diffusion_tokens
    return ce.sum() / max(count, 1)


def tidar_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 1.0,
               ar_tokens: Optional[int] = None, diffusion_tokens: Optional[int] = None,
               distill: str = "none", distill_weight: float = 0.0) -> TiDARLoss:
    """``(alpha * mean CE_AR + mean CE_diff) / (1 + alpha)`` over the labelled positions.

    ``logits [batch, 2S, vocab]``, ``labels [batch, 2S]`` from
    :func:`build_training_batch`. Each mean divides the summed cross-entropy of
    its half by ``ar_tokens`` / ``diffusion_tokens``, by default this batch's own
    label counts. A trainer splitting one global batch over micro-batches and
    processes passes the global counts instead, so the summed losses equal the
    loss of the whole batch exactly. A half without labels contributes 0.

    ``distill`` ``soft``/``hard``: ``CE_diff = (1 - distill_weight) * true +
    distill_weight * distill`` with :func:`distill_loss`'s term (same counts).
    """
    if logits.dim() != 3 or logits.shape[:2] != labels.shape or labels.shape[1] % 2:
        raise ValueError(f"logits must be [batch, 2S, vocab] matching labels [batch, 2S], got logits "
                         f"{tuple(logits.shape)} and labels {tuple(labels.shape)}")
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if distill not in DISTILL_MODES:
        raise ValueError(f"distill must be one of {list(DISTILL_MODES)}, got {distill!r}")
    if not 0.0 <= distill_weight <= 1.0:
        raise ValueError(f"distill_weight must lie in [0, 1], got {distill_weight}")
    half = labels.shape[1] // 2
    local_ar, local_diff = label_counts(labels)
    ar_tokens = local_ar if ar_tokens is None else ar_tokens
    diffusion_tokens = local_diff if diffusion_tokens is None else diffusion_tokens
    logits = logits if logits.dtype == torch.float64 else logits.float()  # bf16 logits: CE in fp32
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                         reduction="none").view(labels.shape)
    ar = ce[:, :half].sum() / max(ar_tokens, 1)
    diffusion = ce[:, half:].sum() / max(diffusion_tokens, 1)
    distilled = None if distill == "none" else distill_loss(logits, labels, distill, diffusion_tokens)
    mixed = diffusion if distilled is None else (1.0 - distill_weight) * diffusion + distill_weight * distilled
    total = (alpha * ar + mixed) / (1.0 + alpha)
    return TiDARLoss(total=total, ar=ar, diffusion=diffusion, distill=distilled)


def causal_labels(tokens: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next-token labels ``[batch, S]`` for the likelihood mode (AR perplexity), same boundary rule."""
    doc_ids = torch.zeros_like(tokens) if doc_ids is None else doc_ids.to(tokens.device)
    labels = torch.full_like(tokens, IGNORE_INDEX)
    keep = (doc_ids[:, 1:] == doc_ids[:, :-1]) & (doc_ids[:, 1:] != PAD_DOC_ID)
    labels[:, :-1] = torch.where(keep, tokens[:, 1:], IGNORE_INDEX)
    return labels
