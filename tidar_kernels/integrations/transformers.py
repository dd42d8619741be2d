"""Hugging Face transformers drop-in: train and decode an unmodified ``AutoModelForCausalLM`` as TiDAR.

Importing this module registers the attention implementation ``"tidar"`` with
transformers' ``AttentionInterface`` and ``AttentionMaskInterface``. Every
attention call of a Llama / Qwen2 / Qwen3 / Mistral model then goes to the
tidar ops, chosen by what the forward was given:

=============================  ========================================  ============================
forward keyword                op                                        used by
=============================  ========================================  ============================
``tidar_block_size=B``         ``training_attention`` (differentiable)   :func:`tidar_loss`, Trainer
``tidar_context=ctx``          ``ctx.attend``: prefill, decode, append   :func:`generate`
neither, no cache              ``causal_attention`` (likelihood mode)    ``model(input_ids)``
neither, Hugging Face cache    ``append_attention`` over its K/V         ``model.generate``
=============================  ========================================  ============================

No dense mask is built: the mask interface only checks the 2-d padding mask
(right padding leaves causal attention of the real tokens exact; anything else
is refused) and returns ``None``. The HF model keeps its own modules (embedding,
RoPE at the position ids given, norms, MLP, LM head); only attention changes.

* :func:`prepare_model` gives the model a mask token (``config.tidar_mask_token_id``,
  saved with ``save_pretrained``) and the ``"tidar"`` attention.
* :func:`tidar_loss` is TiDAR's training objective through the model's own forward;
  :class:`TiDARDataCollator` and :func:`tidar_compute_loss_func` plug it into
  ``transformers.Trainer``.
* :func:`generate` is :func:`tidar_kernels.model.generate.tidar_generate` on the model's
  modules (through :class:`HFDecoder`), returning ids like ``model.generate``; it
  also works as ``model.generate(..., custom_generate=generate, draft_len=k)``.
* :func:`load_nemotron` reads a diffusion checkpoint (docs/nemotron.md) as the native
  ``Ministral3ForCausalLM``, prepared: no remote code.

Unsupported models and inputs (absolute positions, MoE, a sliding window the
sequence exceeds, attention-mask holes, no mask token) raise before any forward.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from transformers import AttentionInterface, GenerationConfig
from transformers.masking_utils import AttentionMaskInterface

from ..kernels import ops
from ..kernels.mask import Layout, training_position_ids
from ..kernels.validation import check_positive
from ..model import checkpoints
from ..model.checkpoints import init_mask_row, mask_token_slot
from ..model.generate import StopTokens, tidar_generate
from ..model.transformer import CAUSAL, AttentionContext
from ..training.objective import IGNORE_INDEX, PAD_DOC_ID, build_training_batch
from ..training.objective import tidar_loss as loss_from_logits

ATTN_IMPLEMENTATION = "tidar"
MASK_TOKEN = "<|mask|>"
CONFIG_KEY = "tidar_mask_token_id"
"""Attribute of ``model.config`` holding the mask token id (saved in ``config.json``)."""

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "ministral3")

# Keyword arguments model.generate(custom_generate=generate) passes that TiDAR decoding does not use:
# it keeps its own cache and positions, and samples with its own arguments.
_HF_GENERATE_KWARGS = frozenset({"logits_processor", "stopping_criteria", "cache", "past_key_values",
                                 "logits_to_keep", "position_ids", "use_cache"})


# ----------------------------------------------------------------------------
# Attention and mask interfaces
# ----------------------------------------------------------------------------


def tidar_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                            dropout: float = 0.0, sliding_window: Optional[int] = None,
                            tidar_context: Optional[AttentionContext] = None,
                            tidar_block_size: Optional[int] = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The ``"tidar"`` attention: HF's ``[B, heads, T, D]`` q/k/v (RoPE applied) through a tidar op.

    Returns ``(output [B, T, heads, D], None)`` as transformers expects.
    """
    if attention_mask is not None:
        raise ValueError(f"attention_mask must be None under attn_implementation='tidar' (its mask interface "
                         f"builds none), got a tensor of shape {tuple(attention_mask.shape)}: custom dense masks "
                         f"are not supported")
    if dropout:
        raise ValueError(f"attention dropout must be 0 under attn_implementation='tidar', got {dropout}")
    head_dim = query.shape[-1]
    if scaling is not None and not math.isclose(scaling, head_dim ** -0.5, rel_tol=1e-6):
        raise ValueError(f"attention scaling must be head_dim**-0.5 = {head_dim ** -0.5} for the tidar ops, "
                         f"got {scaling}")
    q, k, v = (t.transpose(1, 2).contiguous() for t in (query, key, value))  # -> [B, T, heads, D]
    if tidar_context is not None:
        return tidar_context.attend(module.layer_idx, q, k, v), None
    if tidar_block_size is not None:
        return AttentionContext(Layout.TRAINING, int(tidar_block_size)).attend(module.layer_idx, q, k, v), None
    if sliding_window is not None and k.shape[1] > sliding_window:
        raise ValueError(f"sequence length {k.shape[1]} exceeds the model's sliding window {sliding_window}: "
                         f"sliding-window attention is not supported by attn_implementation='tidar'")
    if k.shape[1] == q.shape[1]:
        return CAUSAL.attend(module.layer_idx, q, k, v), None
    return _attend_over_hf_cache(q, k, v), None


def _attend_over_hf_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of the last ``T`` rows of HF's cached ``k``/``v`` (plain ``model.generate``).

    ``k``/``v`` are the caller's ``[B, T, heads, D]`` copies of HF's cache (a transpose made
    contiguous; a view only when it holds one head, where rewriting the same rows changes
    nothing), so ``append_attention`` may write the new rows into them; the new rows it
    reads are cloned so that source and destination never alias.
    """
    new = q.shape[1]
    past = torch.full((q.shape[0],), k.shape[1] - new, dtype=torch.int32, device=q.device)
    return ops.append_attention(q, k[:, -new:].clone(), v[:, -new:].clone(), k, v, past, check_lengths=False)


def tidar_mask_interface(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                         mask_function=None, attention_mask: Optional[torch.Tensor] = None, **kwargs) -> None:
    """The ``"tidar"`` mask interface builds no mask: the tidar ops take the rule from :mod:`tidar_kernels.kernels.mask`.

    It only checks what the attention function cannot see: that the keys are
    exactly the past and the new rows (a growing cache such as ``DynamicCache``;
    a preallocated ``StaticCache`` also holds unused rows it would need a mask
    for), and that the 2-d padding mask has zeros only at the end of each row
    (right padding leaves the real tokens' causal attention exact).
    """
    if int(kv_length) - int(kv_offset) != int(q_offset) + q_length:
        raise ValueError(f"the key length must be the past plus the new rows ({int(q_offset)} + {q_length}) under "
                         f"attn_implementation='tidar', got {int(kv_length) - int(kv_offset)}: preallocated caches "
                         f"(cache_implementation='static') are not supported; use the default dynamic cache")
    if attention_mask is not None and not bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        raise ValueError("attention_mask must be all ones or right-padded (zeros only at the end of each row) for "
                         "a forward under attn_implementation='tidar', got left padding or holes; for padded "
                         "batches use tidar_kernels.integrations.transformers.generate (left or right padding)")
    return None


AttentionInterface.register(ATTN_IMPLEMENTATION, tidar_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, tidar_mask_interface)


@contextmanager
def tidar_attention(model):
    """Run ``model`` with the ``"tidar"`` attention inside the block, restoring its previous one after."""
    previous = model.config._attn_implementation
    if previous != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    try:
        yield model
    finally:
        if previous != ATTN_IMPLEMENTATION:
            model.set_attn_implementation(previous)


# ----------------------------------------------------------------------------
# What is supported (checked before any forward or change)
# ----------------------------------------------------------------------------


def check_supported(model) -> None:
    """Raise ValueError naming what is unsupported: not a causal LM, model family, MoE, attention dropout."""
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(model, "get_output_embeddings", None)) \
            or model.get_output_embeddings() is None:
        raise ValueError(f"model must be a Hugging Face causal LM (AutoModelForCausalLM), got {type(model).__name__}")
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model.config.model_type must be one of {SUPPORTED_MODEL_TYPES} (rotary-position, dense "
                         f"decoder-only models), got {model_type!r}{_unsupported_reason(config)}")
    experts = [name for name in ("num_experts", "num_local_experts", "n_routed_experts")
               if (getattr(config, name, None) or 0) > 1]
    if experts:
        raise ValueError(f"mixture-of-experts models are not supported, got config.{experts[0]}="
                         f"{getattr(config, experts[0])}")
    if getattr(config, "attention_dropout", 0.0):
        raise ValueError(f"config.attention_dropout must be 0 for the tidar ops, got {config.attention_dropout}")


def check_window(model, sequence_len: int) -> None:
    """Raise ValueError when the model's sliding window is shorter than ``sequence_len`` positions
    (then it would be in use; a longer window never masks anything)."""
    window = sliding_window(model.config)
    if window is not None and sequence_len > window:
        raise ValueError(f"sliding-window attention is not supported: config.sliding_window={window} is shorter "
                         f"than the {sequence_len} positions needed; use a shorter input or a model without "
                         f"a sliding window")


def _unsupported_reason(config) -> str:
    if any(getattr(config, name, None) for name in ("num_experts", "num_local_experts", "n_routed_experts")):
        return " (mixture of experts)"
    if getattr(config, "n_positions", None) is not None or "rope_parameters" not in config.to_dict():
        return " (absolute position embeddings: TiDAR's layouts need explicit rotary positions)"
    return ""


def sliding_window(config) -> Optional[int]:
    """The sliding window the model's layers use, or None (Qwen2/3 keep one in the config but only
    apply it to layers typed ``sliding_attention``)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


def mask_token_id(model) -> int:
    """The mask token id :func:`prepare_model` gave ``model``; ValueError when it has none."""
    mask_id = getattr(model.config, CONFIG_KEY, None)
    if mask_id is None:
        raise ValueError(f"model.config.{CONFIG_KEY} must be set (TiDAR needs a mask token), got None; call "
                         f"tidar_kernels.integrations.transformers.prepare_model(model, tokenizer) first")
    return int(mask_id)


def _check_padding(attention_mask: torch.Tensor, input_ids: torch.Tensor) -> None:
    """Left or right padding only: each row's real tokens are one non-empty contiguous run."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, got {got}")
    real = attention_mask.bool()
    count = real.sum(1)
    first = real.int().argmax(1)
    last = real.shape[1] - 1 - real.flip(1).int().argmax(1)
    bad = (count == 0) | (last - first + 1 != count)
    if bool(bad.any()):
        rows = bad.nonzero()[:, 0].tolist()
        raise ValueError(f"attention_mask rows must hold one contiguous run of real tokens (left or right padding, "
                         f"no holes, not empty), got rows {rows} with holes or no token")


# ----------------------------------------------------------------------------
# The mask token
# ----------------------------------------------------------------------------


def prepare_model(model, tokenizer=None) -> int:
    """Give ``model`` a TiDAR mask token and the ``"tidar"`` attention; returns the mask token id.

    A model prepared before (``config.tidar_mask_token_id`` set, e.g. after
    ``save_pretrained`` and reload) keeps its id. Otherwise the tokenizer's own mask
    token is used as is if it has one; else ``<|mask|>`` is added to the tokenizer (when
    given) and gets the embedding row :mod:`tidar_kernels.model.checkpoints` picks: the
    first row the tokenizer does not use, or a new row (embedding and LM head
    resized together, tied or not). The row is initialised to the mean of the
    token rows, like :func:`tidar_kernels.model.checkpoints.add_mask_token`.
    """
    check_supported(model)
    existing = getattr(model.config, CONFIG_KEY, None)
    if existing is not None:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        return int(existing)
    rows = model.get_input_embeddings().weight.shape[0]
    tokenizer_size = None if tokenizer is None else len(tokenizer)
    reserved = None if tokenizer is None else tokenizer.mask_token_id
    if reserved is not None:
        if not 0 <= reserved < rows:
            raise ValueError(f"tokenizer.mask_token_id must index the embedding (< {rows} rows), got {reserved}")
        mask_id, append = reserved, False
    else:
        if tokenizer_size is not None and tokenizer_size > rows:
            raise ValueError(f"tokenizer has {tokenizer_size} tokens but the model's embedding only {rows} rows: "
                             f"they must match before a mask token is added")
        mask_id, append = mask_token_slot(rows, tokenizer_size)
    if tokenizer is not None and reserved is None:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
        if tokenizer.mask_token_id != mask_id:  # defensive: a tokenizer that numbers added tokens otherwise
            raise RuntimeError(f"tokenizer gave {MASK_TOKEN} id {tokenizer.mask_token_id}, expected {mask_id}")
    if append:
        model.resize_token_embeddings(rows + 1, mean_resizing=False)
    if reserved is None:
        embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        init_mask_row(embedding, mask_id)
        if head is not embedding:
            init_mask_row(head, mask_id)
    setattr(model.config, CONFIG_KEY, mask_id)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return mask_id


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------


def build_tidar_batch(input_ids: torch.Tensor, mask_token_id: int, block_size: int,
                      attention_mask: Optional[torch.Tensor] = None, pad_token_id: int = 0) -> dict:
    """Model inputs of TiDAR's training layout from clean rows ``input_ids [B, S]``.

    Left padding is moved to the right (right padding changes no real token's
    attention), rows are right-padded to a multiple of ``block_size`` with
    ``pad_token_id``, and :func:`tidar_kernels.training.build_training_batch` makes
    the ``[clean | mask]`` ids and labels (padding unlabelled). Returns the
    keyword arguments of the HF forward plus ``labels``: ``input_ids``,
    ``position_ids`` (``[0..S-1, 0..S-1]``), ``labels`` (all ``[B, 2S]``) and
    ``tidar_block_size``.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.long or input_ids.dim() != 2:
        got = f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(
            input_ids).__name__
        raise ValueError(f"input_ids must be an int64 tensor [batch, seq_len], got {got}")
    check_positive("block_size", block_size)
    if pad_token_id == mask_token_id:
        raise ValueError(f"pad_token_id must differ from the mask token id {mask_token_id}, got {pad_token_id}")
    real = torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask is not None:
        _check_padding(attention_mask, input_ids)
        real = attention_mask.to(input_ids.device).bool()
        order = torch.argsort((~real).int(), dim=1, stable=True)  # real tokens first, in order
        input_ids, real = input_ids.gather(1, order), real.gather(1, order)
    short = -input_ids.shape[1] % block_size
    if short:
        input_ids = torch.nn.functional.pad(input_ids, (0, short), value=pad_token_id)
        real = torch.nn.functional.pad(real, (0, short), value=False)
    tokens = input_ids.masked_fill(~real, pad_token_id)
    doc_ids = torch.where(real, 0, PAD_DOC_ID)
    batch = build_training_batch(tokens, mask_token_id, block_size, doc_ids)
    positions = training_position_ids(tokens.shape[1]).to(tokens.device).expand_as(batch.input_ids)
    return {"input_ids": batch.input_ids, "position_ids": positions, "labels": batch.labels,
            "tidar_block_size": block_size}


def tidar_loss(model, input_ids: torch.Tensor, block_size: int, alpha: float = 1.0,
               attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(alpha * CE_AR + CE_diff) / (1 + alpha)`` of clean rows ``input_ids [B, S]``, differentiable.

    Runs the HF model's own forward on the ``[clean | mask]`` layout (positions
    ``[0..S-1, 0..S-1]``) with ``training_attention``; labels and loss are
    :mod:`tidar_kernels.training.objective`'s. ``attention_mask`` marks padding (left or right).
    """
    check_supported(model)
    mask_id = mask_token_id(model)
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    batch = build_tidar_batch(input_ids, mask_id, block_size, attention_mask, _filler_token(mask_id))
    check_window(model, batch["input_ids"].shape[1] // 2)
    labels = batch.pop("labels")
    with tidar_attention(model):
        logits = model(**batch, use_cache=False).logits
    return loss_from_logits(logits, labels, alpha).total


def _filler_token(mask_id: int) -> int:
    """A token id for padding that carries no label: any id but the mask token's."""
    return 0 if mask_id != 0 else 1


@dataclass
class TiDARDataCollator:
    """``transformers.Trainer`` collator: token-id rows -> the TiDAR training layout (see :func:`build_tidar_batch`).

    Takes features with ``input_ids`` (lists or tensors, any lengths) and an
    optional ``attention_mask``; rows are right-padded with ``pad_token_id``.
    Emits ``labels`` and an identical ``shift_labels`` (so the Trainer counts
    every labelled position of both halves in ``num_items_in_batch``).
    """

    mask_token_id: int
    block_size: int
    pad_token_id: int = 0

    def __call__(self, features: Sequence[dict]) -> dict:
        rows = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        real = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, feature) in enumerate(zip(rows, features)):
            ids[i, :len(row)] = row
            given = feature.get("attention_mask")
            real[i, :len(row)] = 1 if given is None else torch.as_tensor(given, dtype=torch.long)
        batch = build_tidar_batch(ids, self.mask_token_id, self.block_size, real, self.pad_token_id)
        batch["shift_labels"] = batch["labels"]
        return batch


def tidar_compute_loss_func(alpha: float = 1.0):
    """A ``compute_loss_func`` for ``transformers.Trainer`` with :class:`TiDARDataCollator` batches.

    Each batch's loss is :func:`tidar_kernels.training.tidar_loss` of its logits;
    with gradient accumulation (``num_items_in_batch`` given) it is weighted by the
    batch's share of the labelled positions, so one batch alone gives exactly
    its TiDAR loss and micro-batches sum to their token-weighted mean.
    """
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")

    def compute_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        loss = loss_from_logits(outputs.logits, labels, alpha).total
        if num_items_in_batch is not None:
            loss = loss * (labels != IGNORE_INDEX).sum() / num_items_in_batch
        return loss

    return compute_loss


# ----------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _DecoderShape:
    """The fields of ``config`` the decode loop and :meth:`KVCache.for_model` read."""

    vocab_size: int
    mask_token_id: int
    n_layers: int
    n_kv_heads: int
    head_dim: int


class HFDecoder:
    """A Hugging Face causal LM as the decode loop's :class:`tidar_kernels.model.generate.DecoderModel`.

    Calls the model's base (embedding, layers, final norm) with the loop's token
    and position ids and passes the loop's :class:`AttentionContext` to every
    attention layer (``tidar_context``); the model's own LM head makes the logits.
    The model must run with the ``"tidar"`` attention (see :func:`tidar_attention`).
    """

    def __init__(self, model, mask_id: int):
        c = model.config
        self.model, self.head = model, model.get_output_embeddings()
        self.config = _DecoderShape(
            vocab_size=self.head.weight.shape[0], mask_token_id=mask_id, n_layers=c.num_hidden_layers,
            n_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
        self.device, self.dtype = self.head.weight.device, self.head.weight.dtype

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 context: AttentionContext) -> torch.Tensor:
        out = self.model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                    tidar_context=context)
        return out.last_hidden_state

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, draft_len: int, beta: float = 1.0,
             temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_token_id: StopTokens = None, pad_token_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None, cuda_graph: bool = False, **kwargs) -> torch.Tensor:
    """TiDAR decoding of a Hugging Face model; returns ``[input_ids | new tokens]`` like ``model.generate``.

    ``attention_mask`` (keyword, 1 = real token; taken from ``**kwargs`` because
    ``model.generate`` passes its own, which a named parameter would receive
    twice) allows left or right padding;
    the new tokens of each row continue its real tokens and are padded with
    ``pad_token_id`` after a stop token, the output as wide as the longest row
    needs. ``eos_token_id`` / ``pad_token_id`` default to the model's
    ``generation_config`` (as ``model.generate``); the rest is
    :func:`tidar_kernels.model.generate.tidar_generate` (``beta = 1`` and greedy
    equals plain greedy decoding; ``temperature > 0`` samples with the exact
    speculative acceptance). ``cuda_graph`` captures the step on CUDA (off by
    default: transformers' forward may synchronise with the host).

    As ``model.generate(input_ids, custom_generate=generate, draft_len=k,
    max_new_tokens=n)``: sampling follows this function's own arguments, not the
    generation config's logits processors.
    """
    attention_mask = kwargs.pop("attention_mask", None)
    generation_config = kwargs.pop("generation_config", None) or getattr(model, "generation_config", None)
    unknown = sorted(set(kwargs) - _HF_GENERATE_KWARGS)
    if unknown:
        raise ValueError(f"generate got unexpected keyword arguments {unknown}; expected those of its signature "
                         f"and attention_mask")
    check_supported(model)
    mask_id = mask_token_id(model)
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:  # else tidar_generate reports it
        if isinstance(max_new_tokens, int) and isinstance(draft_len, int):
            check_window(model, input_ids.shape[1] + max_new_tokens + 2 * draft_len)
        if attention_mask is not None:
            _check_padding(attention_mask, input_ids)
    if eos_token_id is None and generation_config is not None:
        eos_token_id = generation_config.eos_token_id
    if pad_token_id is None and generation_config is not None:
        pad_token_id = generation_config.pad_token_id
    with tidar_attention(model):
        result = tidar_generate(HFDecoder(model, mask_id), input_ids, max_new_tokens, draft_len, beta=beta,
                                temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                                attention_mask=attention_mask, generator=generator, pad_token_id=pad_token_id,
                                cuda_graph=cuda_graph)
    new_tokens = result.tokens[:, :int(result.lengths.max())].to(input_ids.device)
    return torch.cat([input_ids, new_tokens], dim=1)


# ----------------------------------------------------------------------------
# Diffusion checkpoints as native transformers models
# ----------------------------------------------------------------------------


def load_nemotron(directory, dtype: torch.dtype = torch.float32, device=None):
    """A diffusion checkpoint directory (docs/nemotron.md) as transformers' ``Ministral3ForCausalLM``.

    Its ``encoder.*`` / ``diffusion_head`` tensors are the causal LM's ``model.*`` /
    ``lm_head`` (:func:`tidar_kernels.model.checkpoints.diffusion_to_hf_name`), read
    tensor by tensor into ``dtype`` on ``device`` after every name and shape is
    checked. The model is returned in eval mode, prepared (:func:`prepare_model`)
    with the checkpoint's own ``mask_token_id`` (no vocabulary growth) and the
    ``"tidar"`` attention, its ``generation_config`` from ``generation_config.json``:
    ``generate(model, ...)`` and ``model.generate`` work without remote code.
    """
    from transformers import Ministral3Config, Ministral3ForCausalLM  # transformers >= 5

    hf = checkpoints.read_hf_config(directory)
    if hf.get("model_type") not in checkpoints.DIFFUSION_MODEL_TYPES:
        raise ValueError(f"directory must hold a diffusion checkpoint (config.json model_type one of "
                         f"{checkpoints.DIFFUSION_MODEL_TYPES}), got model_type {hf.get('model_type')!r}")
    ours = checkpoints.config_from_hf(hf)  # checks paradigm, mask id, RoPE, sliding window
    if ours.tie_embeddings:
        raise ValueError("config.json tie_word_embeddings must be false (the diffusion head is its own matrix), "
                         "got true")
    values = {key: value for key, value in hf.items() if key not in ("model_type", "auto_map", "architectures")}
    config = Ministral3Config(**values, architectures=["Ministral3ForCausalLM"])
    stored = checkpoints.hf_tensors(directory)
    with torch.device("meta"):
        model = Ministral3ForCausalLM(config)
    for name, parameter in model.state_dict().items():
        if name not in stored:
            raise ValueError(f"checkpoint {str(directory)!r} lacks the tensor for {name!r}")
        if stored[name].shape != tuple(parameter.shape):
            raise ValueError(f"tensor for {name!r} has shape {list(stored[name].shape)}, the config needs "
                             f"{list(parameter.shape)}")
    state = checkpoints.read_tensors({name: stored[name] for name in model.state_dict()}, device, dtype)
    model.load_state_dict(state, assign=True, strict=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)  # its fp32 frequencies, not meta
    if (Path(directory) / checkpoints.GENERATION_CONFIG_FILE).is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory, local_files_only=True)
    setattr(model.config, CONFIG_KEY, ours.mask_token_id)
    prepare_model(model)
    return model.eval()
