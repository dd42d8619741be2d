"""Trainer checkpoints: the model, tokenizer, optimizer and RNG state, written atomically.

``OUT/step_NNNNNN/`` holds the model (:func:`tidar_kernels.model.checkpoints.save_pretrained`),
the tokenizer, ``trainer_state.safetensors`` (optimizer moments, RNG states) and
``trainer_state.json`` (step, arguments, scheduler and data positions); ``OUT/latest``
names the newest. Every write goes to a temporary directory that is renamed into place.
With ``keep_last`` only the newest step directories are kept (:func:`prune_checkpoints`),
deleted only once ``latest`` names the new one.

A checkpoint of an adapter run (``--adapter lora``) holds the adapter instead of the model
(:func:`tidar_kernels.model.checkpoints.save_adapter`: ``adapter_config.json`` with the
base's record, ``adapter_model.safetensors``, ``mask_embedding.safetensors`` when the mask
row trains), with the same tokenizer and trainer state files.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from torch import nn

from ..model.adapters import attach_lora, attach_mask_row, split_adapter_state
from ..model.checkpoints import build_model, save_adapter, save_pretrained
from ..model.loading import LATEST
from ..model.tokenizer import TextTokenizer
from .config import TrainArgs
from .data import BatchSampler


STATE_JSON = "trainer_state.json"


STATE_TENSORS = "trainer_state.safetensors"


STEP_DIR = re.compile(r"step_(\d+)")
"""Name of a checkpoint directory of the run directory: ``step_NNNNNN``."""


def plain_model(config, state: dict, device: torch.device, args: Optional[TrainArgs] = None) -> nn.Module:
    """An unsharded model holding a gathered state dict, on the run's device (rank 0 evaluates it alone).

    An adapter run's state (``args.adapter``) also holds the adapters: they are attached again.
    """
    if args is None or args.adapter is None:
        return build_model(config, state, device=device, dtype=torch.float32)
    base, lora, row = split_adapter_state(state, args.adapter_rank, args.lora_alpha)
    model = build_model(config, base, device=device, dtype=torch.float32)
    attach_lora(model, lora)
    if row is not None:
        attach_mask_row(model, row)
    return model


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, tokenizer: TextTokenizer,
                    optimizer, scheduler, sampler: BatchSampler, args: TrainArgs,
                    evaluation: Optional[dict] = None, history: Optional[list] = None,
                    model_state: Optional[dict] = None, optimizer_state: Optional[dict] = None,
                    keep_last: Optional[int] = None, adapter_base: Optional[dict] = None) -> Path:
    """Write ``out_dir/step_NNNNNN`` atomically (temp dir + rename) and point ``out_dir/latest`` at it.

    ``keep_last``: then delete all but the newest that many step directories
    (:func:`prune_checkpoints`); ``None`` keeps every one.

    ``model_state`` / ``optimizer_state``: full (gathered) state dicts of a sharded
    run (:func:`gather_full_state`); by default those of ``model`` and ``optimizer``.
    The files are the same either way, so any run can resume any checkpoint.

    ``adapter_base`` (an adapter run: the base's ``source`` and ``fingerprint``): the
    checkpoint holds the adapter (module docstring), not the frozen model.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"step_{step:06d}"
    tmp = out_dir / f".tmp-{final.name}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        if adapter_base is None:
            save_pretrained(model, tmp, state=model_state)  # creates tmp (itself atomically)
        else:
            _, lora, row = split_adapter_state(model.state_dict() if model_state is None else model_state,
                                               args.adapter_rank, args.lora_alpha)
            save_adapter(tmp, lora, model.config.n_layers,
                         {"base": adapter_base, "mask_token_id": model.config.mask_token_id}, row)
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
    if keep_last is not None:
        prune_checkpoints(out_dir, keep_last)
    return final


def prune_checkpoints(out_dir: Path, keep_last: int) -> list[Path]:
    """Delete the oldest ``step_NNNNNN`` directories of ``out_dir`` beyond the newest ``keep_last``; return them.

    The one ``latest`` names is never deleted. Each goes by a rename to a hidden
    name first, then is removed, so a kill midway leaves no half-deleted
    checkpoint under a step name; the trainer calls this only after ``latest``
    moved, so a loadable latest exists at every moment.
    """
    latest = (out_dir / LATEST).read_text().strip() if (out_dir / LATEST).is_file() else None
    steps = sorted((int(m.group(1)), p) for p in out_dir.iterdir()
                   if p.is_dir() and (m := STEP_DIR.fullmatch(p.name)))
    doomed = [p for _, p in steps[:max(0, len(steps) - keep_last)] if p.name != latest]
    for path in doomed:
        hidden = out_dir / f".deleting-{path.name}-{os.getpid()}"
        os.replace(path, hidden)
        shutil.rmtree(hidden)
    return doomed


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


def unflatten_optimizer(tensors: dict, opt_json: dict) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in opt_json["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": opt_json["param_groups"]}

