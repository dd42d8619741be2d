"""Process groups (torchrun: nccl on GPU, gloo on CPU), FSDP2 sharding and gathering full state for checkpoints."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


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


def shard_model(forward: nn.Module, dist_: Dist) -> bool:
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


def exit_without_finalization() -> None:
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

