"""Train a TiDAR model: from scratch or by continual pre-training of an AR checkpoint.

Single process::

    python -m tidar_kernels train --config tiny --steps 300 --out runs/tiny

Several processes (one per GPU, or CPU processes with gloo) through torchrun::

    torchrun --nproc_per_node 2 -m tidar_kernels train --config small --out runs/small

The global batch (``--batch-size`` rows of ``--seq-len`` clean tokens) is split
across ranks and micro-batches (gradient accumulation). Every micro-batch's loss
is normalised by the label counts of the whole global batch, so the gradient
and the reported loss equal those of one process seeing the whole batch at once,
whatever the split (DDP averages gradients over ranks; the loss is scaled by the
world size to turn that average into the sum).

An adapter run (``--init BASE --adapter lora --adapter-rank R``) freezes the base and trains
a LoRA on the mask rows only (rows ``[S, 2S)`` of the training layout: the AR rows, and so
likelihood mode and the verification, stay the base's), plus the mask token's input
embedding as its own parameter when the base had no mask token.

Checkpoints (``OUT/step_NNNNNN/``) hold the model (``checkpoints.save_pretrained``:
safetensors + config), the tokenizer, ``trainer_state.safetensors`` (optimizer
moments and RNG states) and ``trainer_state.json`` (step, training arguments,
scheduler and data positions), so ``--resume`` continues bit-identically on CPU.
A checkpoint is written into a temporary directory and renamed into place: a
failure never leaves a partial checkpoint behind. ``OUT/latest`` names the last one.
``--keep-last N`` deletes all but the newest N step directories after each save
(once ``latest`` names the new one; never the one it names).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from ..model.adapters import adapters_of, attach_lora, attach_mask_row, freeze_base, new_lora
from ..model.checkpoints import adapter_record, base_fingerprint
from ..model.generate import tidar_generate
from ..model.loading import SMOLLM2, adds_mask_token, load_model, resolve_run_dir
from ..model.tokenizer import TextTokenizer
from ..model.transformer import Transformer, TransformerConfig
from . import data as tdata
from .checkpointing import (STATE_JSON, STATE_TENSORS, plain_model, resolve_checkpoint, save_checkpoint,
                            unflatten_optimizer)
from .config import TrainArgs, parse_args
from .distributed import (Dist, exit_without_finalization, gather_full_state, load_optimizer_state, setup_distributed,
                          shard_model)
from .evaluate import heldout_ar_loss
from .objective import build_training_batch, label_counts, tidar_loss


@dataclass
class TrainResult:
    model: nn.Module
    tokenizer: TextTokenizer
    history: list  # one dict per optimizer step: step, loss, ar, diffusion (true tokens), lr; distill if on
    evaluation: dict  # the last evaluation (see :func:`evaluate`)
    checkpoint: Optional[Path]  # the last checkpoint written, if any
    datasets: "Datasets"
    train_seconds: float  # wall time of the optimizer steps (without data preparation and evaluation)


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


class TrainingForward(nn.Module):
    """``forward(input_ids) -> logits`` of the training layout: the module DDP wraps.

    DDP hooks ``forward``; the Transformer's training entry point is
    ``forward_training``, so this adapter makes it the forward.
    """

    def __init__(self, model: nn.Module, block_size: int, mask_rows_adapter: bool = False):
        super().__init__()
        self.model, self.block_size, self.mask_rows_adapter = model, block_size, mask_rows_adapter

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.forward_training(input_ids, self.block_size, mask_rows_adapter=self.mask_rows_adapter)


def base_source(init: str) -> str:
    """``--init`` as a base record's source: ``smollm2``, or the checkpoint directory as an absolute path."""
    if init == SMOLLM2:
        return init
    return str(Path(resolve_run_dir(init)).resolve())


def add_adapter(model: nn.Module, args: TrainArgs) -> dict:
    """Attach a fresh LoRA (and a mask row when ``--init`` had no mask token) to the loaded base; its record.

    Refuses an adapter run as the base. The record (``source``, ``fingerprint``) is taken
    before anything is attached.
    """
    source = base_source(args.init)
    if source != SMOLLM2 and adapter_record(source) is not None:
        raise ValueError(f"init must be a base model, not an adapter run's checkpoint, got {args.init!r}")
    record = {"source": source, "fingerprint": base_fingerprint(model)}
    attach_lora(model, new_lora(model, args.lora_targets, args.adapter_rank, args.lora_alpha,
                                torch.Generator().manual_seed(args.seed)))
    if adds_mask_token(source):
        attach_mask_row(model)
    return record


def load_initial_model(args: TrainArgs, corpus: tdata.Corpus, dist_: Dist):
    """The model and tokenizer to start from: a new model of ``args.config`` or ``args.init``'s."""
    if args.init is None:
        tokenizer = _shared_tokenizer(corpus, args.vocab_size, dist_)
        config = TransformerConfig.from_name(args.config, **{**args.overrides, "vocab_size": tokenizer.vocab_size,
                                                             "mask_token_id": tokenizer.mask_id})
        torch.manual_seed(args.seed)
        return Transformer(config), tokenizer
    model, tokenizer = load_model(args.init)
    return model, tokenizer


def _shared_tokenizer(corpus: tdata.Corpus, vocab_size: int, dist_: Dist) -> TextTokenizer:
    """Train the BPE on rank 0 and hand every rank the same tokenizer (BPE ties must not diverge)."""
    from tokenizers import Tokenizer

    payload = [tdata.train_tokenizer((d.text for d in corpus.train), vocab_size).tokenizer.to_str()
               if dist_.main else None]
    if dist_.enabled:
        dist.broadcast_object_list(payload, src=0)
    return TextTokenizer(Tokenizer.from_str(payload[0]))


@dataclass
class Datasets:
    train: tdata.PackedData
    heldout: tdata.PackedData
    heldout_prompts: list  # lists of token ids, starts of held-out documents


def prepare_data(corpus: tdata.Corpus, tokenizer: TextTokenizer, args: TrainArgs) -> Datasets:
    train = tdata.pack_documents(tokenizer.encode_batch([d.text for d in corpus.train]), args.seq_len,
                                 tokenizer.eos_id)
    heldout_ids = tokenizer.encode_batch([d.text for d in corpus.heldout])
    heldout = tdata.pack_documents(heldout_ids, args.seq_len, tokenizer.eos_id)
    prompts = tdata.held_out_prompts(heldout_ids, args.eval_prompt_len, args.eval_prompts)
    return Datasets(train, heldout, prompts)


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


@torch.no_grad()
def evaluate(model: nn.Module, datasets: Datasets, args: TrainArgs) -> dict:
    """Held-out AR-mode loss / perplexity and greedy TiDAR tokens per forward (draft length ``B``)."""

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = heldout_ar_loss(model, datasets.heldout.tokens[:args.eval_rows],
                                   datasets.heldout.doc_ids[:args.eval_rows])
    ar_loss = total / max(count, 1)
    tpf = []
    for prompt in datasets.heldout_prompts:
        ids = torch.tensor([prompt], device=device)
        result = tidar_generate(model, ids, args.eval_new_tokens, args.block_size,
                                spec_lora="mask_rows" if adapters_of(model) else None)
        tpf.append(float(result.tokens_per_forward))
    model.train(was_training)
    return {"heldout_ar_loss": ar_loss, "heldout_ar_ppl": math.exp(min(ar_loss, 50.0)),
            "tidar_tokens_per_forward": sum(tpf) / len(tpf) if tpf else float("nan"),
            "draft_len": args.block_size, "eval_prompts": len(tpf)}


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


def train(args: TrainArgs, resume: Optional[str] = None) -> TrainResult:
    """Run (or resume) training; returns the trained model, history and last evaluation.

    With ``resume`` the run's arguments come from the checkpoint, except
    ``steps``, ``out_dir``, ``save_every``, ``keep_last``, ``eval_every``, ``progress``,
    ``device``, ``time_limit`` and ``fsdp``, which are taken from ``args`` (so a
    run can be extended; the cosine schedule then follows the new ``steps``), and
    ``budget_minutes``, which a resumed run does not have (its steps are given).

    ``budget_minutes``: the first steps (the warmup, at most
    :data:`BUDGET_PROBE_STEPS`) are timed, then ``steps`` is set by
    :func:`plan_budget`; the warmup's LR does not depend on ``steps``, so the
    cosine is the one of the final step count from the first step on.
    """

    run_start = time.perf_counter()  # --budget-minutes counts from here
    state = None
    if resume is not None and args.budget_minutes is not None:
        raise ValueError(f"budget_minutes must be None when resuming (give --steps), got {args.budget_minutes}")
    if resume is not None:
        ckpt = resolve_checkpoint(resume)
        state = json.loads((ckpt / STATE_JSON).read_text())
        saved = TrainArgs(**state["args"])
        args = dataclasses.replace(saved, steps=args.steps, out_dir=args.out_dir, save_every=args.save_every,
                                   keep_last=args.keep_last,
                                   eval_every=args.eval_every, progress=args.progress, device=args.device,
                                   time_limit=args.time_limit, fsdp=args.fsdp,
                                   budget_minutes=None)  # the saved run's budget was spent planning its steps
    args.validate()
    dist_ = setup_distributed(args.device)
    corpus = tdata.build_corpus(args.data or None, args.heldout_fraction, args.max_chars, args.text_field,
                                require_heldout=args.recipe is not None)
    if state is not None:
        model, tokenizer = load_model(str(ckpt))
    else:
        model, tokenizer = load_initial_model(args, corpus, dist_)
    freeze_lower_layers(model, args.trainable_layers)
    adapter_base = None
    if args.adapter is not None:
        adapter_base = add_adapter(model, args) if state is None else adapter_record(ckpt)["base"]
        freeze_base(model)
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
    forward = TrainingForward(model, args.block_size, mask_rows_adapter=args.adapter is not None)
    own_group = args.fsdp and shard_model(forward, dist_)  # before the optimizer: it holds the sharded parameters
    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args)
    sampler = tdata.BatchSampler(len(datasets.train), args.seed)
    start = 0
    if state is not None:
        tensors = load_file(str(ckpt / STATE_TENSORS))
        load_optimizer_state(model, optimizer, unflatten_optimizer(tensors, state["optimizer"]), args.fsdp)
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
        sums = [0.0, 0.0, 0.0, 0.0]
        for index, batch in enumerate(batches):
            sync = index == accum - 1 or not dist_.enabled
            if args.fsdp:  # gradients reduce-scattered on the last micro-batch only
                forward.set_requires_gradient_sync(sync)
            with (contextlib.nullcontext() if sync or args.fsdp else forward.no_sync()), autocast:
                logits = forward(batch.input_ids.to(dist_.device))
                loss = tidar_loss(logits, batch.labels.to(dist_.device), args.alpha, ar_tokens, diff_tokens,
                                  args.distill, args.distill_weight)
            (loss.total * world).backward()
            parts = (loss.total, loss.ar, loss.diffusion, loss.diffusion if loss.distill is None else loss.distill)
            sums = [s + float(x.detach()) for s, x in zip(sums, parts)]
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        total, ar, diff, distilled = dist_.all_sum(sums)
        history.append({"step": step + 1, "loss": total, "ar": ar, "diffusion": diff, "lr": lr,
                        **({"distill": distilled} if args.distill != "none" else {})})
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
            evaluation = evaluate(model if model_state is None else plain_model(model.config, model_state,
                                                                                 dist_.device, args),
                                  datasets, args)
            bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in evaluation.items()))
        if save_now:
            failure = None
            if dist_.main:
                try:
                    checkpoint = save_checkpoint(out_dir, done, model, tokenizer, optimizer, scheduler, sampler,
                                                 args, evaluation or None, history, model_state, optimizer_state,
                                                 keep_last=args.keep_last, adapter_base=adapter_base)
                except Exception as error:  # the other ranks must stop too, not wait at a barrier forever
                    failure = error
            if dist_.all_sum([float(failure is not None)])[0]:  # doubles as the barrier
                raise failure or RuntimeError(f"rank 0 failed to save the checkpoint of step {done}; see its log")
    bar.close()
    if own_group:
        dist.destroy_process_group()
    return TrainResult(model=model, tokenizer=tokenizer, history=history, evaluation=evaluation,
                       checkpoint=checkpoint, datasets=datasets, train_seconds=train_seconds)


def main(argv=None) -> None:
    args, resume = parse_args(argv)
    result = train(args, resume)
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")
    used_process_group = dist.is_initialized() or args.fsdp  # torchrun's group, or FSDP2's own one
    if dist.is_initialized():
        dist.destroy_process_group()
    if used_process_group:
        exit_without_finalization()


if __name__ == "__main__":
    main()

