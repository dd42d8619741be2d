"""The one definition of TiDAR's attention rule, its layouts and position ids.

Everything else in the package takes the rule from here: the PyTorch reference,
the Triton kernels (through :func:`key_ranges_tl`), the CUDA kernels (through
``csrc/tidar_mask.h``, a line-for-line mirror checked by CTest and by
``python_tests/test_mask.py``) and the tests.

Two forms of the same rule live here:

* the **token rule** (docs/semantics.md#attention-rule), stated over token attributes
  ``(is_mask, pos, block, ctx)``: :func:`may_attend`. Dense masks are built from
  it and are for reference and debugging only.
* the **compact rule** that kernels use: in every layout each query row sees at
  most two contiguous ranges of the forward's own keys, ``[0, clean_end)`` and
  ``[block_start, block_end)``, plus the whole committed KV cache in front of
  them. :func:`key_ranges` computes the ranges from the row index and a few
  integers; tests check it equals the token rule on every layout.

Local index space: rows and key columns of one forward pass, without the cache.
``clean_rows`` is where the mask rows start (training: ``S``, prefill: the padded
prompt length, decode: ``k``, causal: the number of rows).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from .validation import check_nonnegative, check_positive


class Layout(enum.IntEnum):
    """The four shapes of a forward pass. Mirrored in ``csrc/tidar_mask.h`` (checked by
    ``python_tests/test_shared_constants.py``)."""

    CAUSAL = 0  # plain AR / likelihood: every row is clean
    TRAINING = 1  # [x_0..x_{S-1} | [M] x S], mask blocks of size B
    PREFILL = 2  # [prompt (padded to clean_rows) | one mask block of k]
    DECODE = 3  # [d_0..d_{k-1} | block 1 | ... | block k], k slots each


class TileKind(enum.IntEnum):
    """Classification of a (query rows x key columns) tile. Mirrored in C++."""

    EMPTY = 0  # no row sees any column: skip the tile
    PARTIAL = 1  # apply the mask element-wise
    FULL = 2  # every row sees every column: no masking needed


# ----------------------------------------------------------------------------
# The token rule (docs/semantics.md#attention-rule)
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Tokens:
    """Attributes of a sequence of tokens: the inputs of the token rule.

    ``block`` is -1 and ``ctx`` is 0 for clean tokens.
    """

    is_mask: torch.Tensor  # bool [T]
    pos: torch.Tensor  # int64 [T]
    block: torch.Tensor  # int64 [T]
    ctx: torch.Tensor  # int64 [T]

    def __len__(self) -> int:
        return self.pos.numel()

    def cat(self, other: "Tokens") -> "Tokens":
        return Tokens(*(torch.cat([a, b]) for a, b in zip(
            (self.is_mask, self.pos, self.block, self.ctx),
            (other.is_mask, other.pos, other.block, other.ctx))))


def may_attend(q: Tokens, k: Tokens) -> torch.Tensor:
    """Dense ``[len(q), len(k)]`` bool matrix of the token rule (True = may attend).

    * clean query at ``p`` sees every clean key with ``pos <= p``, never a mask key;
    * mask query of block ``J`` with context end ``ctx`` sees every clean key with
      ``pos < ctx`` and every mask key of block ``J``.
    """
    qm, qp, qb, qc = (t[:, None] for t in (q.is_mask, q.pos, q.block, q.ctx))
    km, kp, kb = (t[None, :] for t in (k.is_mask, k.pos, k.block))
    sees_clean = ~km & torch.where(qm, kp < qc, kp <= qp)
    sees_own_block = km & qm & (kb == qb)
    return sees_clean | sees_own_block


def clean_tokens(start: int, count: int) -> Tokens:
    pos = torch.arange(start, start + count, dtype=torch.long)
    return Tokens(torch.zeros(count, dtype=torch.bool), pos,
                  torch.full((count,), -1, dtype=torch.long), torch.zeros(count, dtype=torch.long))


def mask_block_tokens(first_pos: int, count: int, block: int, ctx: int) -> Tokens:
    pos = torch.arange(first_pos, first_pos + count, dtype=torch.long)
    return Tokens(torch.ones(count, dtype=torch.bool), pos,
                  torch.full((count,), block, dtype=torch.long), torch.full((count,), ctx, dtype=torch.long))


def training_tokens(seq_len: int, block_size: int) -> Tokens:
    """docs/semantics.md#training-layout: ``S`` clean tokens, then ``S`` mask tokens; mask ``i`` is in
    block ``i // B`` whose context end is ``B * (i // B)``."""
    toks = clean_tokens(0, seq_len)
    for start in range(0, seq_len, block_size):
        toks = toks.cat(mask_block_tokens(start, block_size, start // block_size, start))
    return toks


def prefill_tokens(prompt_len: int, draft_len: int) -> Tokens:
    """docs/semantics.md#prefill: the prompt (causal) then one mask block with context end ``L``."""
    return clean_tokens(0, prompt_len).cat(mask_block_tokens(prompt_len, draft_len, 0, prompt_len))


def decode_tokens(prefix_len: int, draft_len: int) -> Tokens:
    """docs/semantics.md#decode-step: the ``k + k*k`` step tokens (without the cache).

    Block ``j = 1..k`` pre-drafts for "``d_0..d_{j-1}`` accepted": positions
    ``n+j+t`` and context end ``n+j``.
    """
    n, k = prefix_len, draft_len
    toks = clean_tokens(n, k)
    for j in range(1, k + 1):
        toks = toks.cat(mask_block_tokens(n + j, k, j, n + j))
    return toks


def training_mask(seq_len: int, block_size: int) -> torch.Tensor:
    """``[2S, 2S]`` bool mask of the training layout, order ``[clean 0..S-1 | mask 0..S-1]``."""
    check_training_shape(seq_len, block_size)
    toks = training_tokens(seq_len, block_size)
    return may_attend(toks, toks)


def prefill_mask(prompt_len: int, draft_len: int) -> torch.Tensor:
    """``[L+k, L+k]`` bool mask of the prefill layout."""
    check_positive("prompt_len", prompt_len)
    check_positive("draft_len", draft_len)
    toks = prefill_tokens(prompt_len, draft_len)
    return may_attend(toks, toks)


def decode_mask(prefix_len: int, draft_len: int) -> torch.Tensor:
    """``[k+k*k, n+k+k*k]`` bool mask of a decode step.

    Queries ``[d_0..d_{k-1} | block 1 | ... | block k]``; keys
    ``[cache 0..n-1 | the same step tokens]``.
    """
    check_positive("draft_len", draft_len)
    check_nonnegative("prefix_len", prefix_len)
    step = decode_tokens(prefix_len, draft_len)
    return may_attend(step, clean_tokens(0, prefix_len).cat(step))


def causal_mask(seq_len: int) -> torch.Tensor:
    """``[T, T]`` lower-triangular mask of the likelihood mode (docs/semantics.md#append-and-likelihood)."""
    toks = clean_tokens(0, seq_len)
    return may_attend(toks, toks)


def decode_position_ids(prefix_len: int, draft_len: int) -> torch.Tensor:
    """Position ids ``[k+k*k]`` of a decode step: drafts ``n+i``, block ``j`` slot ``t`` at ``n+j+t``."""
    check_positive("draft_len", draft_len)
    check_nonnegative("prefix_len", prefix_len)
    return decode_tokens(prefix_len, draft_len).pos


def training_position_ids(seq_len: int) -> torch.Tensor:
    """Position ids ``[2S]`` of the training layout: ``[0..S-1, 0..S-1]``."""
    return torch.arange(seq_len, dtype=torch.long).repeat(2)


# ----------------------------------------------------------------------------
# The compact rule that kernels use
# ----------------------------------------------------------------------------


def layout_clean_rows(layout: Layout, num_rows: int, block_size: int) -> int:
    """Where the mask rows begin in a forward of ``num_rows`` rows of ``layout``.

    Training ``[S clean | S mask]``: ``S``; decode ``[k drafts | k blocks]``: ``k``;
    prefill ``[padded prompt | one block of k]``: ``num_rows - k``; causal: no mask rows.
    """
    if layout == Layout.TRAINING:
        return num_rows // 2
    if layout == Layout.DECODE:
        return block_size
    if layout == Layout.PREFILL:
        return num_rows - block_size
    return num_rows


def rows_written_to_cache(layout: Layout, num_rows: int, block_size: int) -> int:
    """How many leading rows of a cached forward go into the KV cache: the clean ones
    (drafts, prompt, or every AR row); mask rows never do."""
    return layout_clean_rows(layout, num_rows, block_size)


def key_ranges(layout: Layout, row, clean_rows, block_size, context_len=0):
    """Visible local key ranges ``(clean_end, block_start, block_end)`` of query ``row``.

    Works on Python ints and on integer torch tensors (broadcast). Parameters:
    ``clean_rows`` is where the mask rows begin, ``block_size`` is ``B`` (training)
    or ``k`` (prefill, decode), ``context_len`` is the real prompt length (prefill
    only; ``<= clean_rows`` when prompts are padded). The committed cache, if any,
    lies in front of these keys and every row sees all of it.
    """
    is_mask_row = row >= clean_rows
    mask_index = _clamp_min0(row - clean_rows)
    block = mask_index // block_size
    if layout == Layout.TRAINING:
        mask_clean_end = block * block_size  # the clean tokens before the block
    elif layout == Layout.DECODE:
        mask_clean_end = block + 1  # block j = block+1 sees d_0..d_{j-1}
    elif layout == Layout.PREFILL:
        mask_clean_end = context_len + 0 * row  # the real prompt
    else:  # CAUSAL: no mask rows exist
        mask_clean_end = row + 1
    block_start = clean_rows + block * block_size
    clean_end = _where(is_mask_row, mask_clean_end, row + 1)
    zero = 0 * row
    return clean_end, _where(is_mask_row, block_start, zero), _where(is_mask_row, block_start + block_size, zero)


def local_mask(layout: Layout, num_rows: int, clean_rows: int, block_size: int,
               context_len: int = 0) -> torch.Tensor:
    """Dense ``[num_rows, num_rows]`` mask from the compact rule (for tests and the reference)."""
    rows = torch.arange(num_rows)
    clean_end, block_start, block_end = key_ranges(layout, rows[:, None], clean_rows, block_size, context_len)
    cols = rows[None, :]
    return (cols < clean_end) | ((cols >= block_start) & (cols < block_end))


def classify_tile(layout: Layout, row_start: int, row_end: int, col_start: int, col_end: int,
                  clean_rows: int, block_size: int, context_len: int = 0) -> TileKind:
    """Exact classification of local tile rows ``[row_start,row_end)`` x cols ``[col_start,col_end)``.

    Rows past the last query and columns past the last key are the caller's to
    clip; this only looks at the rule.
    """
    rows = torch.arange(row_start, row_end)
    clean_end, block_start, block_end = key_ranges(layout, rows, clean_rows, block_size, context_len)
    visible_clean = (torch.clamp(clean_end, max=col_end) - col_start).clamp(min=0)
    visible_block = (torch.minimum(block_end, torch.full_like(block_end, col_end))
                     - torch.maximum(block_start, torch.full_like(block_start, col_start))).clamp(min=0)
    # The two ranges never overlap (block_start >= clean_end), so counts add up.
    visible = visible_clean + visible_block
    if bool((visible == 0).all()):
        return TileKind.EMPTY
    if bool((visible == col_end - col_start).all()):
        return TileKind.FULL
    return TileKind.PARTIAL


def local_position_ids(layout: Layout, num_rows: int, clean_rows: int, block_size: int,
                       context_len: int = 0, start=0) -> torch.Tensor:
    """Position ids of the local rows, offset by ``start`` (the committed length ``n``).

    Works with ``start``/``context_len`` as ints or as ``[batch]`` tensors (then the
    result is ``[batch, num_rows]``), so a decode step builds them on the device.
    """
    device = next((t.device for t in (start, context_len) if isinstance(t, torch.Tensor)), None)
    rows = torch.arange(num_rows, device=device)
    if isinstance(start, torch.Tensor):
        start = start.long()[:, None]
    if isinstance(context_len, torch.Tensor):
        context_len = context_len.long()[:, None]
    mask_index = (rows - clean_rows).clamp(min=0)
    if layout == Layout.TRAINING:
        mask_pos = mask_index  # mask i sits at position i
    elif layout == Layout.DECODE:
        mask_pos = mask_index // block_size + 1 + mask_index % block_size  # j + t
    elif layout == Layout.PREFILL:
        mask_pos = context_len + mask_index
    else:
        mask_pos = rows
    return start + torch.where(rows >= clean_rows, mask_pos, rows)


def _where(cond, a, b):
    if isinstance(cond, torch.Tensor):
        return torch.where(cond, a, b)
    return a if cond else b


def _clamp_min0(x):
    return x.clamp(min=0) if isinstance(x, torch.Tensor) else max(x, 0)


def check_training_shape(seq_len: int, block_size: int) -> None:
    """The training layout needs whole mask blocks: ``S`` a multiple of ``B``."""
    check_positive("seq_len", seq_len)
    check_positive("block_size", block_size)
    if seq_len % block_size:
        raise ValueError(f"seq_len must be a multiple of block_size={block_size} (whole mask blocks), "
                         f"got seq_len={seq_len}")


# ----------------------------------------------------------------------------
# Triton mirror of key_ranges (used by the Triton kernels; tested equal above)
# ----------------------------------------------------------------------------

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is Linux-only
    triton = None

if triton is not None:

    @triton.jit
    def key_ranges_tl(LAYOUT: tl.constexpr, row, clean_rows, block_size, context_len):
        """Triton twin of :func:`key_ranges` (same arithmetic, element-wise on ``row``)."""
        is_mask_row = row >= clean_rows
        block = tl.maximum(row - clean_rows, 0) // block_size
        if LAYOUT == 1:  # TRAINING
            mask_clean_end = block * block_size
        elif LAYOUT == 3:  # DECODE
            mask_clean_end = block + 1
        elif LAYOUT == 2:  # PREFILL
            mask_clean_end = context_len + 0 * row
        else:  # CAUSAL
            mask_clean_end = row + 1
        block_start = clean_rows + block * block_size
        clean_end = tl.where(is_mask_row, mask_clean_end, row + 1)
        return (clean_end, tl.where(is_mask_row, block_start, 0),
                tl.where(is_mask_row, block_start + block_size, 0))
