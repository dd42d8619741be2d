"""Pick the draft length from measured step latency: :func:`tune_draft_length`.

A TiDAR step with draft length ``k`` feeds ``k + k*k`` tokens and commits
``acc`` of them, ``1 <= acc <= k``. Throughput is ``batch * E[acc] / step
latency``: a larger ``k`` commits more per step only while the step stays in the
GPU's "free token slots", so the best ``k`` depends on the model, the device,
the batch and the cache length. The tuner times the step for every candidate
``k`` on the current device and picks the one with the highest expected tokens/s.

Acceptance models (``acceptance=``):

* a float ``a`` in ``[0, 1]``: per-token acceptance probability, geometric:
  ``d_0`` is always accepted, each further draft with probability ``a`` until
  the first rejection, so ``E[acc | k] = sum_{i<k} a**i``;
* a histogram ``h`` as :class:`tidar_kernels.model.generate.GenerationResult`'s
  ``acceptance_histogram`` from a run at draft length ``K = len(h) - 1``:
  ``h[c]`` steps accepted ``c`` tokens (``h[0]``, steps of finished sequences,
  is ignored). With the same drafter and a shorter draft the chain is cut at
  ``k``: ``E[acc | k] = sum_c p_c * min(c, k)`` for ``k <= K`` (longer drafts
  are not predicted by it: ValueError).

Timing: CUDA graph of the step, ``triton.testing.do_bench`` median (warm-up,
L2 flushed); on the CPU a ``perf_counter`` median, a functionality check only.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

from ..kernels import ops
from ..kernels.mask import Layout, local_position_ids
from ..kernels.validation import check_nonnegative, check_positive
from .kv_cache import KVCache
from .transformer import AttentionContext, Transformer

Acceptance = Union[float, Sequence[float]]


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------


def capture_graph(fn: Callable[[], object], warmup: int = 3) -> Callable[[], None]:
    """Capture ``fn`` in a CUDA graph (after warm-up on a side stream); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def median_ms(fn: Callable[[], object], device: torch.device, graph: bool = False, warmup_ms: float = 10,
              rep_ms: float = 40, cpu_reps: int = 3) -> float:
    """Median time of one call of ``fn`` in milliseconds.

    CUDA: ``triton.testing.do_bench`` (warm-up ``warmup_ms``, repetitions for
    ``rep_ms``, L2 flushed before each); ``graph=True`` times the replay of a
    CUDA graph of ``fn``. CPU: median of ``cpu_reps`` calls after one warm-up.
    """
    if device.type == "cuda":
        import triton.testing
        target = capture_graph(fn) if graph else fn
        return float(triton.testing.do_bench(target, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    samples = []
    for _ in range(cpu_reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


# ----------------------------------------------------------------------------
# The steps being timed
# ----------------------------------------------------------------------------


class DecodeStep:
    """One TiDAR decode step over static tensors (graph-capturable, no host sync).

    Forward of the ``k + k*k`` step tokens (docs/semantics.md#decode-step), LM head on the
    ``2k`` rows acceptance needs (``a_i`` at the drafts, ``b_{j,0}`` at each
    block's first slot), :func:`tidar_kernels.accept_drafts` (commits in place),
    then the LM head on the ``k - 1`` remaining slots of block ``acc`` for the
    next drafts. Each call first restores the committed lengths, so repeated
    calls time the same step.
    """

    def __init__(self, model: Transformer, cache: KVCache, draft_len: int):
        config, device, k = model.config, model.device, draft_len
        rows = k + k * k
        gen = torch.Generator(device=device).manual_seed(k)
        self.model, self.cache, self.k = model, cache, k
        self.ids = torch.randint(0, config.vocab_size, (cache.batch, rows), device=device, generator=gen)
        if config.mask_token_id is not None:
            self.ids[:, k:] = config.mask_token_id
        self.drafts = self.ids[:, :k].contiguous()
        self.positions = local_position_ids(Layout.DECODE, rows, k, k, start=cache.seqlens)
        self.context = AttentionContext(Layout.DECODE, block_size=k, cache=cache)
        self.lengths = cache.seqlens.clone()
        self.slots = torch.arange(1, k, device=device)

    def __call__(self) -> torch.Tensor:
        k = self.k
        self.cache.seqlens.copy_(self.lengths)
        hidden = self.model(self.ids, self.positions, self.context)
        draft_logits = self.model.lm_head(hidden[:, :k])  # a_i at d_i
        block_logits = self.model.lm_head(hidden[:, k::k])  # b_{j,0}: row j*k, j = 1..k
        accepted, _ = ops.accept_drafts(self.drafts, draft_logits, block_logits, self.cache.seqlens)
        rows = k + (accepted.long()[:, None] - 1) * k + self.slots  # block acc, slots 1..k-1
        rest = hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.model.lm_head(rest).argmax(dim=-1)


class ARStep:
    """One autoregressive step: forward of one token over the cache, LM head, greedy token, commit."""

    def __init__(self, model: Transformer, cache: KVCache):
        gen = torch.Generator(device=model.device).manual_seed(1)
        self.model, self.cache = model, cache
        self.ids = torch.randint(0, model.config.vocab_size, (cache.batch, 1), device=model.device, generator=gen)
        self.positions = cache.seqlens.long()[:, None].clone()
        self.context = AttentionContext(Layout.CAUSAL, cache=cache)
        self.lengths = cache.seqlens.clone()

    def __call__(self) -> torch.Tensor:
        self.cache.seqlens.copy_(self.lengths)
        token = self.model.lm_head(self.model(self.ids, self.positions, self.context)).argmax(dim=-1)
        self.cache.seqlens.add_(1)
        return token


def step_ms(model: Transformer, batch_size: int, cache_len: int, draft_len: Optional[int]) -> float:
    """Median latency of one decode step (``draft_len=None``: the AR step) at ``cache_len`` committed tokens."""
    check_positive("batch_size", batch_size)
    check_nonnegative("cache_len", cache_len)
    rows = 1 if draft_len is None else draft_len + draft_len * draft_len
    cache = KVCache.for_model(model, batch_size, cache_len + rows)
    cache.reset(torch.full((batch_size,), cache_len, dtype=torch.int32, device=model.device))
    step = ARStep(model, cache) if draft_len is None else DecodeStep(model, cache, draft_len)
    with torch.inference_mode():
        return median_ms(step, model.device, graph=model.device.type == "cuda")


# ----------------------------------------------------------------------------
# Acceptance models and the tuner
# ----------------------------------------------------------------------------


def expected_tokens(draft_len: int, acceptance: Acceptance) -> float:
    """``E[acc]`` committed per step at ``draft_len`` under ``acceptance`` (module docstring)."""
    check_positive("draft_len", draft_len)
    if isinstance(acceptance, (int, float)) and not isinstance(acceptance, bool):
        if not 0.0 <= acceptance <= 1.0:
            raise ValueError(f"acceptance must be a probability in [0, 1] or a histogram, got {acceptance}")
        return float(sum(acceptance ** i for i in range(draft_len)))
    counts = [float(c) for c in acceptance][1:]  # counts[c - 1]: steps that accepted c tokens
    if not counts or any(c < 0 for c in counts) or sum(counts) <= 0:
        raise ValueError(f"acceptance histogram must hold non-negative counts with a positive sum past index 0, "
                         f"got {list(acceptance)}")
    if draft_len > len(counts):
        raise ValueError(f"draft_len={draft_len} exceeds the histogram's draft length {len(counts)}: "
                         "a histogram only predicts shorter drafts")
    total = sum(counts)
    return sum(c / total * min(accepted, draft_len) for accepted, c in enumerate(counts, start=1))


def describe_acceptance(acceptance: Acceptance) -> str:
    """One line naming the acceptance model, for result files."""
    if isinstance(acceptance, (int, float)):
        return f"geometric, per-token acceptance {float(acceptance):g}"
    return f"histogram of accepted counts 0..{len(acceptance) - 1}: {list(acceptance)}"


@dataclass(frozen=True)
class DraftLengthRow:
    draft_len: int
    step_ms: float
    expected_tokens_per_step: float
    tokens_per_s: float


@dataclass(frozen=True)
class DraftLengthChoice:
    """The tuner's answer: the best ``draft_len`` and the whole table it came from."""

    draft_len: int
    batch_size: int
    cache_len: int
    acceptance: str
    device: str
    table: tuple[DraftLengthRow, ...]

    @property
    def best(self) -> DraftLengthRow:
        return next(row for row in self.table if row.draft_len == self.draft_len)


def tune_draft_length(model: Transformer, batch_size: int, cache_len: int, acceptance: Acceptance = 0.8,
                      draft_lens: Iterable[int] = range(1, 17),
                      measure: Optional[Callable[[int], float]] = None) -> DraftLengthChoice:
    """Time the TiDAR step for each ``k`` in ``draft_lens``; pick the best expected tokens/s.

    ``measure(k) -> ms`` replaces the timing (default: :func:`step_ms` of
    ``model`` at ``batch_size`` and ``cache_len`` on the model's device), for
    tests or for latencies measured elsewhere. Ties go to the smaller ``k``.
    """
    check_positive("batch_size", batch_size)
    check_nonnegative("cache_len", cache_len)
    draft_lens = list(draft_lens)
    if not draft_lens:
        raise ValueError("draft_lens must name at least one draft length, got none")
    for k in draft_lens:
        check_positive("draft_lens entry", k)
    expected = {k: expected_tokens(k, acceptance) for k in draft_lens}  # validates before any timing
    measure = measure or (lambda k: step_ms(model, batch_size, cache_len, k))
    table = []
    for k in draft_lens:
        ms = float(measure(k))
        if not ms > 0:
            raise ValueError(f"measure({k}) must return a positive latency in ms, got {ms}")
        table.append(DraftLengthRow(k, ms, expected[k], batch_size * expected[k] / ms * 1e3))
    best = max(table, key=lambda row: (row.tokens_per_s, -row.draft_len))
    device = model.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return DraftLengthChoice(best.draft_len, batch_size, cache_len, describe_acceptance(acceptance), name,
                             tuple(table))


CPU_DRAFT_LENGTH = 4
"""Draft length :func:`default_draft_length` gives without a GPU to time on (CPU timing ranks nothing)."""


def default_draft_length(model: Transformer, batch_size: int = 1, cache_len: int = 512,
                         acceptance: Acceptance = 0.8, measure: Optional[Callable[[int], float]] = None) -> int:
    """The draft length to decode ``model`` with when none is given (the generation CLI's default).

    Candidates are ``1..trained_block_size`` (the block the checkpoint was trained
    to fill; 16 when unknown). On CUDA, or with ``measure``, :func:`tune_draft_length`
    picks among them; on the CPU it is ``min(CPU_DRAFT_LENGTH, trained_block_size)``.
    """
    limit = getattr(model.config, "trained_block_size", None) or 16
    if measure is None and model.device.type != "cuda":
        return min(CPU_DRAFT_LENGTH, limit)
    return tune_draft_length(model, batch_size, cache_len, acceptance, range(1, limit + 1), measure).draft_len
