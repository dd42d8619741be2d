"""LoRA adapters on a :class:`~tidar_kernels.model.transformer.Transformer`'s projections, gated by rows.

One adapter per (layer, projection): ``y = W x + scale * B (A x)`` with ``A [r, in]``,
``B [out, r]`` (PEFT's convention), on any of q/k/v/o and the MLP's gate/up/down
projections (:data:`LORA_TARGETS` maps the Hugging Face names to ours); the weights
come as :class:`LoraWeights` (e.g. a checkpoint's PEFT files,
:func:`~tidar_kernels.model.checkpoints.load_spec_lora`).

An attached adapter runs only where a forward switches it on: its
:class:`~tidar_kernels.model.transformer.AttentionContext`'s ``adapter_from`` is the first row
it applies to (0: the whole forward, e.g. linear self-speculation's draft block; the
mask rows' start: a TiDAR layout's mask rows, which in every layout are a contiguous
suffix). The update is computed on that row slice only, never as a gate multiplied
over all rows, so a forward with the adapter off (``adapter_from`` None, or no row at
or past it) is bitwise the base model's.

A and B are ``nn.Parameter``s of a small module registered on the projection (as its
``adapter`` child): :func:`lora_parameters` hands them to an optimizer, with the base
frozen by :func:`freeze_base`.

A mask token the base never had (added at load time, an untrained mean row) can be
trained with the adapter as its own parameter: :class:`MaskRowAdapter`, registered on
the token embedding (:func:`attach_mask_row`), replaces the embedding of the mask id
on the same rows the adapters switch on (:func:`embed`). The base's embedding matrix
(and with tied embeddings the LM head's mask row) is never written, so the
adapter-off path stays bitwise the base model's.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_linear

LORA_TARGETS = {"q_proj": "attention.wq", "k_proj": "attention.wk", "v_proj": "attention.wv",
                "o_proj": "attention.wo", "gate_proj": "feed_forward.w1", "up_proj": "feed_forward.w3",
                "down_proj": "feed_forward.w2"}
"""Hugging Face (PEFT) projection names -> the projection's path in one of our layers."""


@dataclass
class LoraWeights:
    """A LoRA as plain tensors: ``weights[target][layer] = (A [rank, in], B [out, rank])``.

    ``target`` is a projection's path in a layer (a value of :data:`LORA_TARGETS`, e.g.
    ``"attention.wo"``); the adapted projection computes ``W x + scale * B (A x)`` with
    ``scale = alpha / rank`` (PEFT's convention).
    """

    rank: int
    alpha: float
    weights: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoraAdapter(nn.Module):
    """``scale * B (A x)`` added to a projection's output on a suffix of rows."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: float):
        super().__init__()
        self.a = nn.Parameter(a)
        self.b = nn.Parameter(b)
        self.scale = float(scale)

    def forward(self, y: torch.Tensor, x: torch.Tensor, start: int) -> torch.Tensor:
        """``y [B, T, out]`` (the base projection of ``x [B, T, in]``) with the update on rows ``[start, T)``.

        In place on that slice: rows before ``start`` are never touched.
        """
        if start < x.shape[1]:
            y[:, start:] += F.linear(F.linear(x[:, start:], self.a) * self.scale, self.b)
        return y


def projection(model: nn.Module, layer: int, target: str) -> nn.Linear:
    """The ``nn.Linear`` at path ``target`` (a value of :data:`LORA_TARGETS`) of block ``layer``."""
    return model.layers[layer].get_submodule(target)


def attach_lora(model: nn.Module, weights: LoraWeights) -> list[LoraAdapter]:
    """Attach ``weights`` to ``model``'s projections (replacing adapters already there); returns them.

    Every target, layer and shape is checked before anything is attached. The adapters
    take each projection's dtype and device and are off until a forward's context
    switches them on.
    """
    rank = weights.rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"weights.rank must be an integer >= 1, got {rank!r}")
    if not math.isfinite(float(weights.scale)):
        raise ValueError(f"weights.scale must be finite, got {weights.scale!r}")
    if not weights.weights:
        raise ValueError("weights.weights must name at least one projection, got none")
    n_layers = len(model.layers)
    known = sorted(LORA_TARGETS.values())
    planned = []
    for name, layers in weights.weights.items():
        if name not in known:
            raise ValueError(f"weights.weights: module {name!r} does not exist; expected one of {known}")
        for layer, (a, b) in layers.items():
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
                raise ValueError(f"weights.weights[{name!r}]: layer must be an integer in [0, {n_layers}), "
                                 f"got {layer!r}")
            linear = projection(model, layer, name)
            expected_a, expected_b = (rank, linear.in_features), (linear.out_features, rank)
            if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
                raise ValueError(f"weights.weights[{name!r}][{layer}]: A must be {list(expected_a)} and B "
                                 f"{list(expected_b)} (rank {rank}), got {list(a.shape)} and {list(b.shape)}")
            planned.append((linear, a, b))
    adapters = []
    for linear, a, b in planned:
        like = dict(dtype=linear.weight.dtype, device=linear.weight.device)
        adapter = LoraAdapter(a.detach().to(**like).clone(), b.detach().to(**like).clone(), weights.scale)
        linear.adapter = adapter
        adapters.append(adapter)
    return adapters


def detach_lora(model: nn.Module) -> None:
    """Remove every adapter from ``model``."""
    for module in model.modules():
        if "adapter" in module._modules:
            del module._modules["adapter"]


def adapters_of(model: nn.Module) -> list[LoraAdapter]:
    """The adapters attached to ``model`` (empty: none)."""
    return [m for m in model.modules() if isinstance(m, LoraAdapter)]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every adapter's A and B (what a LoRA trainer optimises)."""
    return [p for adapter in adapters_of(model) for p in adapter.parameters()]


def freeze_base(model: nn.Module) -> None:
    """Only the adapters train (A, B and an attached mask row): every other parameter gets ``requires_grad = False``."""
    trainable = {id(p) for p in adapter_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


class MaskRowAdapter(nn.Module):
    """The mask token's input embedding as its own parameter ``row [dim]`` (module docstring)."""

    def __init__(self, row: torch.Tensor, mask_id: int):
        super().__init__()
        self.row = nn.Parameter(row)
        self.mask_id = int(mask_id)


def attach_mask_row(model: nn.Module, row: Optional[torch.Tensor] = None) -> MaskRowAdapter:
    """Register a :class:`MaskRowAdapter` on ``model.tok_embeddings`` (replacing one there); returns it.

    ``row``: its value, default a copy of the embedding's current mask row; it takes the
    embedding's dtype and device.
    """
    mask_id = model.config.mask_token_id
    if mask_id is None:
        raise ValueError("model.config.mask_token_id must be set to attach a mask row, got None")
    weight = model.tok_embeddings.weight
    row = weight[mask_id] if row is None else row
    if tuple(row.shape) != (weight.shape[1],):
        raise ValueError(f"mask row must have shape [{weight.shape[1]}] (the embedding width), "
                         f"got {list(row.shape)}")
    adapter = MaskRowAdapter(row.detach().to(dtype=weight.dtype, device=weight.device).clone(), mask_id)
    model.tok_embeddings.adapter = adapter
    return adapter


def mask_row_of(model: nn.Module) -> Optional[MaskRowAdapter]:
    """The :class:`MaskRowAdapter` attached to ``model``'s embedding (None: none)."""
    return model.tok_embeddings._modules.get("adapter")


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What an adapter run trains: every LoRA's A and B, and the mask row if one is attached."""
    row = mask_row_of(model)
    return ([] if row is None else [row.row]) + lora_parameters(model)


def embed(embedding: nn.Embedding, ids: torch.Tensor, adapter_from: Optional[int]) -> torch.Tensor:
    """``embedding(ids)`` with an attached mask row on the mask ids of rows ``[adapter_from, T)``.

    None (or no mask row attached): bitwise ``embedding(ids)``. Rows before ``adapter_from``
    and other ids keep the embedding's values.
    """
    x = embedding(ids)
    extra = embedding._modules.get("adapter")
    if extra is None or adapter_from is None or adapter_from >= ids.shape[1]:
        return x
    suffix = ids[:, adapter_from:, None] == extra.mask_id
    return torch.cat([x[:, :adapter_from], torch.where(suffix, extra.row.to(x.dtype), x[:, adapter_from:])], dim=1)


def new_lora(model: nn.Module, targets, rank: int, alpha: float, generator: torch.Generator) -> LoraWeights:
    """A fresh trainable LoRA on ``targets`` (Hugging Face names) of every layer, PEFT's initialisation.

    A: Kaiming-uniform (``a = sqrt(5)``, as ``nn.Linear``); B: zeros, so the adapted model
    starts as the base model.
    """
    weights = {}
    for name in targets:
        path = LORA_TARGETS[name]
        weights[path] = {}
        for layer in range(len(model.layers)):
            linear = projection(model, layer, path)
            bound = 1.0 / math.sqrt(linear.in_features)  # kaiming_uniform_(a=sqrt(5)) of [rank, in]
            a = (torch.rand(rank, linear.in_features, generator=generator) * 2 - 1) * bound
            weights[path][layer] = (a, torch.zeros(linear.out_features, rank))
    return LoraWeights(rank, float(alpha), weights)


ADAPTER_KEY = re.compile(r"layers\.(\d+)\.(.+)\.adapter\.([ab])")
MASK_ROW_KEY = "tok_embeddings.adapter.row"


def split_adapter_state(state: dict, rank: int, alpha: float) -> tuple[dict, Optional[LoraWeights], Optional[torch.Tensor]]:
    """A model state dict split into ``(base state, LoRA weights or None, mask row or None)``.

    The adapters' entries are ``layers.N.<path>.adapter.a|b`` and
    ``tok_embeddings.adapter.row`` (the names :meth:`nn.Module.state_dict` gives them);
    a gathered (FSDP) state dict has the same names.
    """
    base, weights, row = {}, {}, None
    for name, tensor in state.items():
        match = ADAPTER_KEY.fullmatch(name)
        if match is not None:
            pair = weights.setdefault(match[2], {}).setdefault(int(match[1]), [None, None])
            pair["ab".index(match[3])] = tensor
        elif name == MASK_ROW_KEY:
            row = tensor
        else:
            base[name] = tensor
    lora = LoraWeights(rank, alpha, {path: {layer: tuple(pair) for layer, pair in sorted(layers.items())}
                                     for path, layers in weights.items()}) if weights else None
    return base, lora, row


def apply_adapter(linear: nn.Linear, x: torch.Tensor, adapter_from: Optional[int]) -> torch.Tensor:
    """``linear(x)`` plus its attached adapter on rows ``[adapter_from, T)`` (None: off, bitwise ``linear(x)``).

    Inside the decode loops' :func:`~tidar_kernels.model.cpu_linear.packed_linears` an fp32 CPU
    call runs on the prepacked weight instead of through the module."""
    y = cpu_linear.packed_linear(x, linear.weight, linear.bias) if cpu_linear.packs(x, linear.weight) else linear(x)
    adapter = linear._modules.get("adapter")
    if adapter is None or adapter_from is None:
        return y
    return adapter(y, x, adapter_from)
