"""The TiDAR decode loop (docs/semantics.md, prefill to sampling), linear self-speculation and the AR baseline.

:func:`tidar_generate` runs one prefill, then steps. Each step feeds the ``k``
drafts of the last step and ``k`` mask blocks (``k + k*k`` rows), verifies the
drafts causally, commits the accepted prefix by advancing the cache lengths on
the device, and takes the next drafts from the mask block that matches the
outcome. :func:`ar_generate` is plain causal decoding with the same model, cache
and stopping rules; with ``beta = 1`` and greedy decoding both return the same
tokens (the exactness the tests check). :func:`linear_spec_generate` is the
two-forward self-speculation of diffusion checkpoints: a read-only bidirectional
draft block, then a causal verify (greedy, equal to AR as well).

Bookkeeping shared by both loops. A sequence *emits* the tokens the verifier
has fixed: the prefill emits ``d_0`` (AR: the first token), and a step that
accepts ``acc`` drafts emits ``v_1..v_acc`` (``= d_1..d_{acc-1}`` and the
correction or bonus ``v_acc``, which becomes the next ``d_0``). So a step emits
exactly ``acc`` tokens, the committed length is always ``prompt + emitted - 1``,
and tokens per forward is the mean ``acc``.

Shapes are static and every step reads and writes only persistent device
buffers: a step never synchronises with the host, stop checks read ``done``
once every ``sync_every`` steps, and on CUDA the step is captured once in a
``torch.cuda.CUDAGraph`` and replayed. Batches: prompts are right-padded with
``prompt_lens`` (or given an ``attention_mask``, left or right padded); every
sequence has its own lengths, acceptance and stop; finished sequences stay in
the batch with ``active = False`` (they accept nothing and emit nothing).

With ``page_size`` the loops run on a :class:`~tidar_kernels.model.kv_cache.PagedKVCache`:
at each stop check (already a synchronisation) every running sequence gets the
pages of the rows the next ``sync_every`` steps can write, and a finished
sequence gives back all pages but those of its scratch rows, so a step never
allocates. Output is identical to the contiguous cache's.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Protocol, Sequence, Union

import torch

from ..kernels import ops
from ..kernels.mask import Layout, local_position_ids
from ..kernels.validation import check_positive
from . import checkpoints, cpu_linear
from .adapters import adapters_of, attach_lora
from .kv_cache import KVCache, PagedKVCache
from .loading import load_chat_tokenizer, load_model
from .transformer import AttentionContext
from .tuning import default_draft_length

StopTokens = Union[int, Sequence[int], None]


class DecoderModel(Protocol):
    """What the decode loops use of a model: :class:`tidar_kernels.model.Transformer`, or an adapter
    (:class:`tidar_kernels.integrations.transformers.HFDecoder` drives a Hugging Face model).

    ``model(input_ids, position_ids, context)`` returns the final hidden states
    with every layer's attention done by ``context`` (an :class:`AttentionContext`);
    ``lm_head`` turns rows of them into logits. ``config`` has ``vocab_size``,
    ``mask_token_id`` and the cache shape ``n_layers``, ``n_kv_heads``, ``head_dim``
    (:meth:`KVCache.for_model`).
    """

    config: Any
    device: torch.device
    dtype: torch.dtype

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 context: AttentionContext) -> torch.Tensor: ...

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor: ...


@dataclass
class GenerationResult:
    """Generated tokens and decode statistics.

    ``tokens [B, max_new_tokens]`` (CPU int64) holds each sequence's new tokens,
    ``pad_token_id`` after its end; ``lengths [B]`` counts them (a stop token
    included). ``forwards`` counts model forward passes (prefill included);
    ``tokens_per_forward`` is the mean number of tokens a decode step emitted per
    active sequence divided by the forwards a step runs (TiDAR's mean ``acc``, T/NFE; 1 for
    AR; linear self-speculation runs two);
    ``acceptance_histogram[i]`` counts (sequence, step) pairs that emitted ``i``.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    forwards: int
    tokens_per_forward: float
    acceptance_histogram: list[int]
    wall_time: float

    def sequences(self) -> list[list[int]]:
        """Each sequence's new tokens as a list, without padding."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths.tolist())]

    @property
    def tokens_per_second(self) -> float:
        """New tokens of the whole batch per second of wall time (prefill and validation included)."""
        return float(self.lengths.sum()) / self.wall_time if self.wall_time > 0 else float("inf")


# ----------------------------------------------------------------------------
# Sampling (docs/semantics.md#sampling). Nothing here synchronises with the host.
# ----------------------------------------------------------------------------


def warp(logits: torch.Tensor, temperature: float, top_k: Optional[int] = None,
         top_p: Optional[float] = None) -> torch.Tensor:
    """Probabilities ``softmax(logits / T)`` restricted to the top-k / top-p tokens (fp32).

    Top-p keeps the smallest set of most likely tokens whose mass reaches ``top_p``
    (always at least one). The loop applies the same warp to targets and drafts.
    """
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the strictly more likely tokens
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(weights: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One index per row of non-negative ``weights [..., V]`` (need not sum to 1), int64.

    ``argmax(w / E)`` with ``E ~ Exp(1)`` i.i.d. picks ``i`` with probability
    ``w_i / sum(w)`` (the exponential race); unlike ``torch.multinomial`` it never
    synchronises.
    """
    race = torch.empty_like(weights, dtype=torch.float32).exponential_(1.0, generator=generator)
    # A race of exactly 0 would give 0/0 = NaN at a zero-weight token, and argmax picks NaN: a token
    # the warp forbade. Clamping to the smallest normal float changes no law (a measure-zero event).
    race.clamp_(min=torch.finfo(torch.float32).tiny)
    return (weights.float() / race).argmax(dim=-1)


def speculative_accept(drafts: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                       generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling of one TiDAR step (docs/semantics.md#sampling).

    ``drafts [B, k]`` are ``d_0..d_{k-1}`` (``d_0`` is always accepted);
    ``target_probs[:, j-1]`` is ``p_j`` for the position of ``d_j`` (``j = 1..k``,
    ``p_k`` gives the bonus); ``draft_probs[:, j-1]`` is the ``q_j`` that ``d_j`` was
    sampled from, and ``draft_probs[:, k-1]`` must be zero (no draft there). ``d_j``
    is accepted with probability ``min(1, p_j(d_j) / q_j(d_j))``; at the first
    rejection ``j`` the replacement is sampled from ``normalize(max(0, p_j - q_j))``,
    which with ``q_k = 0`` is the bonus from ``p_k``. Returns ``(accepted int32 [B],
    targets int64 [B, k])`` shaped like :func:`tidar_kernels.accept_drafts`: the
    sequence emits ``targets[:, :accepted]``, whose last entry is the next ``d_0``.
    """
    proposed = drafts[:, 1:]  # d_1..d_{k-1}
    p_of_draft = target_probs[:, :-1].gather(-1, proposed[..., None])[..., 0]
    q_of_draft = draft_probs[:, :-1].gather(-1, proposed[..., None])[..., 0]
    uniform = torch.rand(p_of_draft.shape, device=drafts.device, generator=generator)
    keep = uniform * q_of_draft < p_of_draft  # u < p/q without dividing by q
    accepted = 1 + torch.cumprod(keep.long(), dim=1).sum(dim=1)  # 1..k
    slot = (accepted - 1)[:, None, None].expand(-1, 1, target_probs.shape[-1])
    p, q = target_probs.gather(1, slot)[:, 0], draft_probs.gather(1, slot)[:, 0]
    residual = (p - q).clamp(min=0)
    # p == q leaves no residual mass; a rejection is then impossible, but keep p as a guard.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
    fix = sample(residual, generator)
    targets = torch.cat([proposed, fix[:, None]], dim=1).scatter(1, (accepted - 1)[:, None], fix[:, None])
    return accepted.int(), targets


# ----------------------------------------------------------------------------
# The loops
# ----------------------------------------------------------------------------


@dataclass
class _Sampling:
    """How tokens are picked: argmax at ``temperature = 0``, else drawn from :func:`warp`'s law."""

    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]
    generator: Optional[torch.Generator]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return warp(logits, self.temperature, self.top_k, self.top_p)

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1) if self.greedy else sample(self.probs(logits), self.generator)


class _Loop:
    """State every decode loop shares: the cache, the output buffer and the stop flags.

    ``width`` is the most tokens a step can emit (``k``; AR: 1). The output buffer
    has ``max_new_tokens + 2 * width`` columns so that a step's writes, which start
    at ``emitted < max_new_tokens + width``, never need clipping. ``forwards_per_step``:
    model forwards a step runs (for the statistics).
    """

    forwards_per_step = 1

    def __init__(self, model: DecoderModel, setup: "_Setup", width: int):
        self.model, self.sampling, self.width = model, setup.sampling, width
        self.prompt_ids, self.prompt_lens = setup.input_ids, setup.prompt_lens
        self.max_new_tokens = max_new_tokens = setup.max_new_tokens
        batch, device = self.prompt_ids.shape[0], self.prompt_ids.device
        if setup.page_size is None:
            self.cache = KVCache.for_model(model, batch, setup.cache_len)
        else:
            self.cache = PagedKVCache.for_model(model, batch, setup.cache_len, setup.page_size, setup.num_pages)
        self.released = [False] * batch  # paged: sequences whose pages went back to the pool
        self.out = torch.zeros(batch, max_new_tokens + 2 * width, dtype=torch.long, device=device)
        self.emitted = torch.zeros(batch, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.histogram = torch.zeros(width + 1, dtype=torch.long, device=device)
        self.stop_tokens = torch.tensor(setup.stop_tokens, dtype=torch.long, device=device)
        self.mask_token_id = model.config.mask_token_id

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head of the given rows; the mask token is never an output, so it gets the lowest logit.

        (A finite minimum, not -inf: ``beta * a + (1 - beta) * b`` must stay finite at ``beta = 1``.)
        """
        logits = self.model.lm_head(hidden)
        if self.mask_token_id is not None:
            logits[..., self.mask_token_id] = torch.finfo(logits.dtype).min
        return logits

    def emit(self, tokens: torch.Tensor, counts: torch.Tensor, active: Optional[torch.Tensor] = None) -> None:
        """Append ``tokens[b, :counts[b]]`` to each sequence's output and update the stop flags.

        A decode step passes ``active`` (who ran) to count its acceptances in the histogram.
        """
        columns = torch.arange(tokens.shape[1], device=tokens.device)
        index = self.emitted[:, None] + columns
        valid = columns < counts[:, None]
        self.out.scatter_(1, index, torch.where(valid, tokens, self.out.gather(1, index)))
        self.emitted += counts
        hit_stop = (torch.isin(tokens, self.stop_tokens) & valid).any(dim=1)
        self.done |= hit_stop | (self.emitted >= self.max_new_tokens)
        if active is not None:
            self.histogram.scatter_add_(0, counts.long(), active.long())

    def run(self, max_steps: int, sync_every: int, use_graph: bool, stream: Optional[Callable]) -> int:
        """Prefill, then up to ``max_steps`` steps; returns the number of forwards."""
        with torch.inference_mode():
            if isinstance(self.cache, PagedKVCache):  # the prefill writes the padded prompt rows
                self.cache.reserve([self.prompt_ids.shape[1]] * self.cache.batch)
            self.prefill()
            graph, steps, streamed = None, 0, 0
            while steps < max_steps:
                if steps % sync_every == 0:  # the only host synchronisation of the loop
                    if stream is not None:
                        streamed = self._stream(stream, streamed)
                    if bool(self.done.all()):
                        break
                    if isinstance(self.cache, PagedKVCache):
                        self._manage_pages(min(sync_every, max_steps - steps))
                if use_graph and graph is None and steps > 0:  # step 0 ran eagerly: the warm-up
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        self.step()
                if graph is not None:
                    graph.replay()
                elif use_graph:  # warm up on a side stream, as CUDA graph capture requires
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        self.step()
                    torch.cuda.current_stream().wait_stream(side)
                else:
                    self.step()
                steps += 1
            if stream is not None:
                self._stream(stream, streamed)
        return 1 + steps * self.forwards_per_step

    def _manage_pages(self, steps: int) -> None:
        """Paged cache, at a stop check: pages for the next ``steps`` steps, finished sequences' back.

        A step of a running sequence writes ``width`` rows past ``n_b`` and commits at
        most ``width``, so ``steps`` steps write below ``n_b + steps * width``. A finished
        sequence still runs (inactive), writing ``width`` scratch rows past its length:
        its length goes to 0 and it keeps only the pages of rows ``[0, width)``.
        """
        finished = [b for b, done in enumerate(self.done.tolist()) if done and not self.released[b]]
        if finished:
            self.cache.seqlens[finished] = 0
            self.cache.release(finished, keep_rows=self.width)
            for b in finished:
                self.released[b] = True
        lengths = self.cache.seqlens.tolist()
        self.cache.reserve([self.width if released else min(n + steps * self.width, self.cache.max_len)
                            for n, released in zip(lengths, self.released)])

    def _stream(self, stream: Callable, streamed: int) -> int:
        """Hand sequence 0's new tokens to ``stream``, up to ``max_new_tokens`` or a stop token."""
        upto = min(int(self.emitted[0]), self.max_new_tokens)
        tokens = self.out[0, streamed:upto].tolist()
        stop_tokens = set(self.stop_tokens.tolist())
        stops = [i for i, t in enumerate(tokens) if t in stop_tokens]
        if stops:  # nothing after the first stop token is ever handed out
            tokens, upto = tokens[:stops[0] + 1], self.max_new_tokens
        if tokens:
            stream(tokens)
        return max(upto, streamed)

    def result(self, forwards: int, wall_start: float, pad_token_id: int) -> GenerationResult:
        """Tokens cut at ``max_new_tokens`` and at each sequence's first stop token, and the statistics."""
        tokens = self.out[:, :self.max_new_tokens].cpu()
        lengths = self.emitted.clamp(max=self.max_new_tokens).cpu()
        if self.stop_tokens.numel():  # end at the first stop token (a step may emit past it)
            is_stop = torch.isin(tokens, self.stop_tokens.cpu())
            first = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, tokens.shape[1])
            lengths = torch.minimum(lengths, first)
        tokens = tokens.masked_fill(torch.arange(tokens.shape[1]) >= lengths[:, None], pad_token_id)
        histogram = self.histogram.cpu()
        steps = int(histogram.sum())
        mean_acc = float((histogram * torch.arange(histogram.numel())).sum()) / steps if steps else 0.0
        return GenerationResult(tokens, lengths, forwards, mean_acc / self.forwards_per_step, histogram.tolist(),
                                time.perf_counter() - wall_start)


class _TidarLoop(_Loop):
    """TiDAR decoding: drafts, their distributions, and the ``k`` mask blocks of a step.

    ``mask_rows_adapter``: attached adapters run on the mask rows of the prefill and of
    every step (the clean rows never see them: the verification is the base model's).
    """

    def __init__(self, model: DecoderModel, setup: "_Setup", draft_len: int, beta: float,
                 mask_rows_adapter: bool = False):
        super().__init__(model, setup, width=draft_len)
        k, batch, device = draft_len, self.prompt_ids.shape[0], self.prompt_ids.device
        self.k, self.beta, self.mask_rows_adapter = k, beta, mask_rows_adapter
        self.drafts = torch.zeros(batch, k, dtype=torch.long, device=device)
        # q_1..q_{k-1} of the drafts d_1..d_{k-1}; slot k-1 stays zero (see speculative_accept).
        self.draft_probs = None if self.sampling.greedy else torch.zeros(
            batch, k, self.model.config.vocab_size, device=device)
        self.mask_blocks = torch.full((batch, k * k), self.mask_token_id, dtype=torch.long, device=device)

    def mix(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``beta * a + (1 - beta) * b`` in fp32 like :func:`tidar_kernels.accept_drafts` (``a`` at ``beta = 1``)."""
        return self.beta * a.float() + (1.0 - self.beta) * b.float() if self.beta < 1.0 else a

    def set_drafts(self, first: torch.Tensor, rest_logits: torch.Tensor) -> None:
        """``d_0 = first`` (already fixed by the verifier); ``d_1..d_{k-1}`` from diffusion logits."""
        if self.sampling.greedy:
            rest = rest_logits.argmax(-1)
        else:
            rest_probs = self.sampling.probs(rest_logits)
            rest = sample(rest_probs, self.sampling.generator)
            self.draft_probs[:, :-1].copy_(rest_probs)
        self.drafts.copy_(torch.cat([first[:, None], rest], dim=1))

    def prefill(self) -> None:
        """docs/semantics.md#prefill: ``[prompt | one mask block]``; the first drafts."""
        k, (batch, padded) = self.k, self.prompt_ids.shape
        ids = torch.cat([self.prompt_ids, self.mask_blocks[:, :k]], dim=1)
        positions = local_position_ids(Layout.PREFILL, padded + k, padded, k, context_len=self.prompt_lens)
        context = AttentionContext(Layout.PREFILL, k, self.cache, self.prompt_lens,
                                   adapter_from=padded if self.mask_rows_adapter else None)
        hidden = self.model(ids, positions, context)
        last = hidden[torch.arange(batch, device=ids.device), self.prompt_lens.long() - 1]
        a_last, b = self.logits(last), self.logits(hidden[:, padded:])
        first = self.sampling.pick(self.mix(a_last, b[:, 0]))
        self.set_drafts(first, b[:, 1:])
        self.cache.reset(self.prompt_lens)
        self.emit(first[:, None], torch.ones_like(self.emitted))

    def step(self) -> None:
        """docs/semantics.md#decode-step to #sampling: verify, commit, emit, the next drafts from block ``acc``."""
        k, model = self.k, self.model
        active = ~self.done
        ids = torch.cat([self.drafts, self.mask_blocks], dim=1)
        positions = local_position_ids(Layout.DECODE, k + k * k, k, k, start=self.cache.seqlens)
        hidden = model(ids, positions, AttentionContext(Layout.DECODE, k, self.cache,
                                                        adapter_from=k if self.mask_rows_adapter else None))
        a = self.logits(hidden[:, :k])  # a_i at draft d_i
        b_first = self.logits(hidden[:, k::k])  # b_{j,0}: first slot of block j = 1..k (row j*k)
        if self.sampling.greedy:
            accepted, targets = ops.accept_drafts(self.drafts, a, b_first, self.cache.seqlens, self.beta, active)
        else:
            target_probs = self.sampling.probs(self.mix(a, b_first))
            accepted, targets = speculative_accept(self.drafts, self.draft_probs, target_probs,
                                                   self.sampling.generator)
            accepted = accepted * active.int()
            self.cache.commit(accepted)
        # Next drafts: d'_0 = v_acc, d'_t = from block acc, slot t (rows acc*k + t).
        block = accepted.long().clamp(min=1)  # finished sequences: any block will do
        first = targets.gather(1, (block - 1)[:, None])[:, 0]
        rows = block[:, None] * k + torch.arange(1, k, device=ids.device)
        rest = hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1]))
        self.set_drafts(first, self.logits(rest))
        self.emit(targets, accepted.long(), active)


class _ArLoop(_Loop):
    """Plain autoregressive decoding: one token per step (``width``: see :class:`_LinearLoop`)."""

    def __init__(self, model: DecoderModel, setup: "_Setup", width: int = 1):
        super().__init__(model, setup, width=width)
        self.token = torch.zeros(self.prompt_ids.shape[0], 1, dtype=torch.long, device=self.prompt_ids.device)

    def prefill(self) -> None:
        """The prompt, causal, into the cache; the first token from the last real prompt row."""
        batch, padded = self.prompt_ids.shape
        positions = torch.arange(padded, device=self.prompt_ids.device).expand(batch, padded)
        hidden = self.model(self.prompt_ids, positions, AttentionContext(Layout.CAUSAL, cache=self.cache))
        last = hidden[torch.arange(batch, device=hidden.device), self.prompt_lens.long() - 1]
        self.token.copy_(self.sampling.pick(self.logits(last))[:, None])
        self.cache.reset(self.prompt_lens)  # padding rows past L_b are scratch
        self.emit(self.token, torch.ones_like(self.emitted))

    def step(self) -> None:
        """One token per active sequence: its K/V is committed, the next token picked (no host sync)."""
        active = ~self.done
        positions = self.cache.seqlens.long()[:, None]
        hidden = self.model(self.token, positions, AttentionContext(Layout.CAUSAL, cache=self.cache))
        self.token.copy_(self.sampling.pick(self.logits(hidden[:, -1]))[:, None])
        self.cache.commit(active.int())
        self.emit(self.token, active.long(), active)


class _LinearLoop(_ArLoop):
    """Linear self-speculation with blocks of ``b`` tokens: the AR prefill, then two forwards a step.

    ``token`` is the seed: the token after the committed prefix, fixed by the last
    verification but not yet in the cache (at position ``n``). Draft: the block
    ``[seed, [M] x (b-1)]`` at positions ``n..n+b-1``, bidirectional over the committed
    cache (:func:`tidar_kernels.kernels.ops.block_attention`: it writes no cache row, so
    nothing of the committed prefix can be disturbed and no scratch row is needed),
    attached adapters on every row when ``draft_adapter``; ``d_1..d_{b-1}`` are the mask
    rows' argmaxes. Verify: ``[seed, d_1..d_{b-1}]`` causal over the cache, adapters off,
    writing their K/V at ``[n, n+b)``; :func:`tidar_kernels.kernels.ops.accept_drafts`
    (``beta = 1``) keeps the longest prefix with ``argmax a_i == d_{i+1}`` plus the
    correction or bonus and commits it on the device. The verification is AR's argmax at
    every emitted position: output equals greedy AR.
    """

    def __init__(self, model: DecoderModel, setup: "_Setup", block_len: int, draft_adapter: bool):
        super().__init__(model, setup, width=block_len)
        self.forwards_per_step = 2 if block_len > 1 else 1  # b = 1: no draft, plain AR
        self.adapter_from = 0 if draft_adapter else None
        batch, device = self.prompt_ids.shape[0], self.prompt_ids.device
        self.masks = torch.full((batch, block_len - 1), self.mask_token_id, dtype=torch.long, device=device)
        self.offsets = torch.arange(block_len, device=device)

    def step(self) -> None:
        """Draft, verify, commit and emit ``1..b`` tokens per active sequence (no host sync)."""
        b, active = self.width, ~self.done
        positions = self.cache.seqlens.long()[:, None] + self.offsets
        drafts = self.token
        if b > 1:
            ids = torch.cat([self.token, self.masks], dim=1)
            context = AttentionContext(Layout.PREFILL, b, self.cache, read_only=True, adapter_from=self.adapter_from)
            hidden = self.model(ids, positions, context)
            drafts = torch.cat([self.token, self.logits(hidden[:, 1:]).argmax(-1)], dim=1)
        hidden = self.model(drafts, positions, AttentionContext(Layout.CAUSAL, cache=self.cache))
        a = self.logits(hidden)  # a_i predicts position n + i + 1
        accepted, targets = ops.accept_drafts(drafts, a, a, self.cache.seqlens, 1.0, active)
        last = (accepted.long().clamp(min=1) - 1)[:, None]  # finished sequences: any column will do
        self.token.copy_(targets.gather(1, last))
        self.emit(targets, accepted.long(), active)


# ----------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------


def tidar_generate(model: DecoderModel, input_ids: torch.Tensor, max_new_tokens: int, draft_len: int,
                   beta: float = 1.0, temperature: float = 0.0, top_k: Optional[int] = None,
                   top_p: Optional[float] = None, eos_token_id: StopTokens = None,
                   prompt_lens: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                   generator: Optional[torch.Generator] = None, pad_token_id: Optional[int] = None,
                   max_len: Optional[int] = None, sync_every: int = 8, cuda_graph: bool = True,
                   stream: Optional[Callable[[list[int]], None]] = None, page_size: Optional[int] = None,
                   num_pages: Optional[int] = None, spec_lora: Optional[str] = None) -> GenerationResult:
    """TiDAR decoding (docs/semantics.md) of a batch of prompts.

    Also quadratic self-speculation of diffusion checkpoints: ``draft_len`` = their block
    length, ``beta`` their AR mix weight (none: 1).

    ``input_ids [B, P]`` int64 prompts, right-padded with ``prompt_lens`` (int ``[B]``,
    default all ``P``) or padded either side with ``attention_mask`` (1 = real
    token). ``draft_len`` is ``k``; ``beta`` the trust-AR weight; ``temperature = 0``
    is greedy (then top-k/top-p are unused). Generation of a sequence stops after
    ``max_new_tokens`` or at a token of ``eos_token_id`` (an id or a list);
    ``pad_token_id`` (default: the first stop token, else 0) fills the rest.
    ``max_len`` is the KV-cache size (default and minimum ``P + max_new_tokens +
    2k``). ``sync_every``: steps between stop checks on CUDA (CPU: every step).
    ``cuda_graph``: capture the step on CUDA (not with a custom ``generator``, whose
    state a graph would not advance). ``stream(tokens)`` receives sequence 0's new
    tokens at each stop check. ``page_size``: run on a paged KV cache with pages of
    that many rows, from a pool of ``num_pages`` (default: enough for every sequence
    at ``max_len``; a smaller pool that runs short raises RuntimeError at a stop check).
    ``spec_lora="mask_rows"``: the adapters attached to the model
    (:func:`tidar_kernels.model.adapters.attach_lora`) run on the mask rows of the prefill
    and of every step only (None: off); the drafts change, the verification does not.
    """
    start = time.perf_counter()
    check_positive("draft_len", draft_len)
    _check_mask_token(model)
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    _check_spec_lora(model, spec_lora, "mask_rows")
    setup = _prepare(model, input_ids, max_new_tokens, draft_len, temperature, top_k, top_p, eos_token_id,
                     prompt_lens, attention_mask, generator, max_len, sync_every, page_size, num_pages)
    loop = _TidarLoop(model, setup, draft_len, float(beta), mask_rows_adapter=spec_lora is not None)
    return _finish(loop, setup, start, pad_token_id, cuda_graph, stream)


def ar_generate(model: DecoderModel, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                top_k: Optional[int] = None, top_p: Optional[float] = None, eos_token_id: StopTokens = None,
                prompt_lens: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None, pad_token_id: Optional[int] = None,
                max_len: Optional[int] = None, sync_every: int = 8, cuda_graph: bool = True,
                stream: Optional[Callable[[list[int]], None]] = None, page_size: Optional[int] = None,
                num_pages: Optional[int] = None) -> GenerationResult:
    """Plain autoregressive decoding with the same model, cache and stopping rules (the baseline).

    Arguments as :func:`tidar_generate`; the cache default is ``P + max_new_tokens``.
    """
    start = time.perf_counter()
    setup = _prepare(model, input_ids, max_new_tokens, 0, temperature, top_k, top_p, eos_token_id, prompt_lens,
                     attention_mask, generator, max_len, sync_every, page_size, num_pages)
    return _finish(_ArLoop(model, setup), setup, start, pad_token_id, cuda_graph, stream)


MAX_BLOCK_LEN = 32  # linear self-speculation: the longest block the draft checkpoints use


def linear_spec_generate(model: DecoderModel, input_ids: torch.Tensor, max_new_tokens: int, block_len: int,
                         temperature: float = 0.0, eos_token_id: StopTokens = None,
                         prompt_lens: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                         pad_token_id: Optional[int] = None, max_len: Optional[int] = None, sync_every: int = 8,
                         cuda_graph: bool = True, stream: Optional[Callable[[list[int]], None]] = None,
                         page_size: Optional[int] = None, num_pages: Optional[int] = None,
                         spec_lora: Optional[str] = None) -> GenerationResult:
    """Linear self-speculation: per step a read-only draft block of ``block_len`` tokens, then a causal verify.

    See :class:`_LinearLoop` for the step. Greedy only (``temperature`` must be 0): its
    output is greedy AR's. ``spec_lora="draft"``: the attached adapters
    (:func:`tidar_kernels.model.adapters.attach_lora`) run in the draft forward, never in
    the prefill or the verification (None: the base model drafts). Other arguments as
    :func:`tidar_generate` (``block_len`` in the place of ``draft_len``); ``tokens_per_forward``
    counts both forwards of a step.
    """
    start = time.perf_counter()
    check_positive("block_len", block_len)
    if block_len > MAX_BLOCK_LEN:
        raise ValueError(f"block_len must be <= {MAX_BLOCK_LEN}, got {block_len}")
    if temperature != 0.0:
        raise ValueError(f"temperature must be 0: linear_spec_generate is greedy only (no speculative sampling "
                         f"against the draft law), got {temperature}")
    _check_mask_token(model)
    _check_spec_lora(model, spec_lora, "draft")
    setup = _prepare(model, input_ids, max_new_tokens, block_len, 0.0, None, None, eos_token_id, prompt_lens,
                     attention_mask, None, max_len, sync_every, page_size, num_pages)
    loop = _LinearLoop(model, setup, block_len, draft_adapter=spec_lora is not None)
    return _finish(loop, setup, start, pad_token_id, cuda_graph, stream)


def _check_mask_token(model: DecoderModel) -> None:
    if model.config.mask_token_id is None:
        raise ValueError("model.config.mask_token_id must be set for TiDAR decoding (it drafts with [M]), got "
                         "None; load the checkpoint with tidar_kernels.model.checkpoints, which adds one")


def _check_spec_lora(model: DecoderModel, spec_lora: Optional[str], where: str) -> None:
    """``spec_lora`` is None or ``where``, and then the model has adapters attached."""
    if spec_lora is None:
        return
    if spec_lora != where:
        raise ValueError(f"spec_lora must be None or {where!r}, got {spec_lora!r}")
    if not isinstance(model, torch.nn.Module) or not adapters_of(model):
        raise ValueError(f"spec_lora={where!r} needs adapters attached to the model "
                         f"(tidar_kernels.model.adapters.attach_lora), found none")


class _Setup(NamedTuple):
    """Validated arguments of a generate call."""

    input_ids: torch.Tensor  # [B, P] right-padded, on the model's device
    prompt_lens: torch.Tensor  # int32 [B]
    max_new_tokens: int
    cache_len: int
    stop_tokens: list[int]
    sampling: _Sampling
    sync_every: int
    page_size: Optional[int] = None  # paged KV cache (None: contiguous)
    num_pages: Optional[int] = None


def _finish(loop: _Loop, setup: _Setup, start: float, pad_token_id, cuda_graph, stream) -> GenerationResult:
    """Run ``loop`` (graph-captured on CUDA unless a custom generator is given) and collect its result."""
    on_cuda = loop.prompt_ids.device.type == "cuda"
    use_graph = cuda_graph and on_cuda and setup.sampling.generator is None
    # Each step emits >= 1 token per active sequence, and the prefill emits the first. On the CPU the
    # linears run on prepacked weights (cpu_linear: the fp32 small-M GEMMs are 2-3x faster so).
    with cpu_linear.packed_linears(not on_cuda and cpu_linear.requested()):
        forwards = loop.run(setup.max_new_tokens - 1, setup.sync_every if on_cuda else 1, use_graph, stream)
    if pad_token_id is None:
        pad_token_id = setup.stop_tokens[0] if setup.stop_tokens else 0
    return loop.result(forwards, start, pad_token_id)


def _prepare(model, input_ids, max_new_tokens, draft_len, temperature, top_k, top_p, eos_token_id, prompt_lens,
             attention_mask, generator, max_len, sync_every, page_size=None, num_pages=None) -> _Setup:
    """Validate the arguments, compact padded prompts to the right, size the cache (syncs: once, up front)."""
    device = model.device
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.long or input_ids.dim() != 2:
        got = f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(
            input_ids).__name__
        raise ValueError(f"input_ids must be an int64 tensor [batch, prompt_len], got {got}")
    batch, padded = input_ids.shape
    if batch < 1 or padded < 1:
        raise ValueError(f"input_ids must hold at least one sequence with a non-empty prompt, "
                         f"got shape {tuple(input_ids.shape)}")
    check_positive("max_new_tokens", max_new_tokens)
    check_positive("sync_every", sync_every)
    for name, value in (("page_size", page_size), ("num_pages", num_pages)):
        if value is not None:
            check_positive(name, value)
    if num_pages is not None and page_size is None:
        raise ValueError(f"num_pages ({num_pages}) needs page_size (the paged cache), got page_size None")
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None:
        check_positive("top_k", top_k)
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p}")
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= model.config.vocab_size:
        raise ValueError(f"input_ids must lie in [0, vocab_size={model.config.vocab_size}), got values in "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")
    stop_tokens = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(
        eos_token_id)
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        if prompt_lens is not None:
            raise ValueError("give prompt_lens (right padding) or attention_mask (any padding), not both")
        if tuple(attention_mask.shape) != (batch, padded):
            raise ValueError(f"attention_mask must have input_ids' shape {(batch, padded)}, "
                             f"got {tuple(attention_mask.shape)}")
        real = attention_mask.to(device).bool()
        # Stable sort moves each sequence's real tokens to the front, in order: right padding.
        order = torch.argsort((~real).int(), dim=1, stable=True)
        input_ids = input_ids.gather(1, order)
        prompt_lens = real.sum(1)
    if prompt_lens is None:
        prompt_lens = torch.full((batch,), padded)
    prompt_lens = torch.as_tensor(prompt_lens).to(device=device, dtype=torch.int32)
    if tuple(prompt_lens.shape) != (batch,):
        raise ValueError(f"prompt_lens must have shape [batch={batch}], got {tuple(prompt_lens.shape)}")
    if bool(((prompt_lens < 1) | (prompt_lens > padded)).any()):
        raise ValueError(f"prompt_lens must lie in [1, {padded}] (no empty prompt), got {prompt_lens.tolist()}")
    # A sequence emits at most max_new_tokens + k - 1 tokens, and finished sequences keep running
    # (masked out), writing k scratch rows past their committed length: 2k rows of slack (AR: none).
    needed = padded + max_new_tokens + 2 * draft_len
    if max_len is None:
        max_len = needed
    elif max_len < needed:
        raise ValueError(f"max_len (KV cache rows) must be >= prompt length {padded} + max_new_tokens "
                         f"{max_new_tokens} + 2 * draft_len {draft_len} = {needed}, got {max_len}")
    sampling = _Sampling(float(temperature), top_k, top_p, generator)
    return _Setup(input_ids, prompt_lens, max_new_tokens, max_len, stop_tokens, sampling, sync_every, page_size,
                  num_pages)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_token_id: int = 0, device=None):
    """Right-pad token lists: ``(input_ids [B, P] int64, prompt_lens [B] int32)``."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of non-empty token lists, got lengths "
                         f"{[len(p) for p in prompts]}")
    padded = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), padded), pad_token_id, dtype=torch.long)
    for row, prompt in zip(ids, prompts):
        row[:len(prompt)] = torch.as_tensor(prompt, dtype=torch.long)
    return ids.to(device), torch.tensor([len(p) for p in prompts], dtype=torch.int32, device=device)


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tidar_kernels generate", description="TiDAR (and AR) generation from a checkpoint, streamed.")
    parser.add_argument("--model", required=True, help="'smollm2' or a checkpoint directory")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--draft-len", type=int, default=None,
                        help="draft length k; default: tuned on CUDA up to the checkpoint's trained block, "
                             "else 4 (see tuning.default_draft_length)")
    parser.add_argument("--mode", choices=["quadratic", "linear"], default="quadratic",
                        help="quadratic: TiDAR's one-forward step (tidar_generate); linear: draft block then "
                             "causal verify (linear_spec_generate, greedy)")
    parser.add_argument("--block-len", type=int, default=None,
                        help="the block length B (quadratic: the draft length k); default --draft-len")
    parser.add_argument("--spec-lora", default=None, metavar="DIR",
                        help="a linear_spec_lora/ directory: its adapter runs on the mask rows (quadratic) "
                             "or in the draft forward (linear); the adapter of an adapter run (--model) runs "
                             "there too")
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--ar", action="store_true", help="also run AR decoding on the same prompt")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on CUDA, float32 on CPU")
    args = parser.parse_args(argv)
    block_len = args.draft_len if args.block_len is None else args.block_len
    if block_len is not None and not 1 <= block_len <= MAX_BLOCK_LEN:
        parser.error(f"--block-len must lie in [1, {MAX_BLOCK_LEN}], got {block_len}")
    if args.mode == "linear" and args.temperature != 0.0:
        parser.error(f"--temperature must be 0 with --mode linear (greedy only), got {args.temperature}")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, device, dtype, require_mask_token=False)
    if args.spec_lora is not None:
        attach_lora(model, checkpoints.load_spec_lora(args.spec_lora, model.config, device, dtype))
    block_len = block_len or default_draft_length(model)
    if args.chat:
        chat = load_chat_tokenizer(args.model)
        ids = chat.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tokenizer.encode(args.prompt)
    input_ids = torch.tensor([list(ids)], dtype=torch.long, device=device)
    common = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  eos_token_id=tokenizer.stop_ids, sync_every=1)
    if args.mode == "linear":
        spec_lora = "draft" if adapters_of(model) else None
        runs = [("linear", lambda **kw: linear_spec_generate(
            model, input_ids, args.max_new_tokens, block_len, eos_token_id=tokenizer.stop_ids, sync_every=1,
            spec_lora=spec_lora, **kw))]
    else:
        spec_lora = "mask_rows" if adapters_of(model) else None
        runs = [("TiDAR", lambda **kw: tidar_generate(model, input_ids, args.max_new_tokens, block_len,
                                                        beta=args.beta, spec_lora=spec_lora, **common, **kw))]
    if args.ar:
        runs.append(("AR", lambda **kw: ar_generate(model, input_ids, args.max_new_tokens, **common, **kw)))
    for name, run in runs:
        shown: list[int] = []
        printed = ""

        def stream(tokens: list[int]) -> None:  # decode the whole text so far: BPE pieces merge
            nonlocal printed
            shown.extend(tokens)
            text = tokenizer.decode(shown, skip_special_tokens=True)
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

        print(f"--- {name} ---\n{args.prompt}", end="", flush=True)
        result = run(stream=stream)
        print(f"\n[{name}] {int(result.lengths[0])} tokens in {result.wall_time:.2f} s: "
              f"{result.tokens_per_second:.1f} tokens/s, {result.forwards} forwards, "
              f"{result.tokens_per_forward:.2f} tokens per forward, acceptance {result.acceptance_histogram}")


if __name__ == "__main__":
    main()
