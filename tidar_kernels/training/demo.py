"""Train a small TiDAR model on real code, then decode with AR and TiDAR side by side.

``python -m tidar_kernels demo`` (no arguments, CPU, under three minutes):

1. builds the default corpus, the running Python's standard library sources
   (split train / held-out by file-name hash), and trains a byte-level BPE;
2. trains a tiny TiDAR model from scratch with the dual objective
   (``tidar_kernels.training.trainer``) for a bounded wall-clock time;
3. decodes held-out prompts greedily with plain AR decoding and with TiDAR
   (``beta = 1``, draft length = the training block size), and prints the text,
   tokens per forward, wall-clock tokens/s of each, and whether the two outputs
   are identical (they must be: with ``beta = 1`` TiDAR commits exactly the AR
   model's greedy tokens).

On a GPU it trains the larger "small" config with the fast attention backends.
Every figure printed is measured in this run.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from ..model.generate import ar_generate, tidar_generate
from .config import TrainArgs
from .trainer import train

# CPU: the "tiny" config (0.1 M parameters) and a near-byte-level BPE (384 tokens), which
# such a small model learns to draft within a minute or two of two cores.
CPU_DEFAULTS = TrainArgs(config="tiny", max_chars=2_000_000, vocab_size=384, seq_len=64, block_size=4,
                         batch_size=16, steps=600, lr=5e-3, eval_new_tokens=48, time_limit=60.0)
GPU_DEFAULTS = TrainArgs(config="small", max_chars=None, vocab_size=4096, seq_len=256, block_size=8,
                         batch_size=64, steps=1500, lr=2e-3, eval_prompts=4, eval_new_tokens=64,
                         time_limit=150.0)


def _clip(text: str, width: int = 400) -> str:
    return text if len(text) <= width else "..." + text[-width:]


def compare(model, tokenizer, prompts, draft_len: int, new_tokens: int, device) -> dict:
    """Decode every prompt with AR and TiDAR (greedy, beta = 1); print and return the figures."""
    if not prompts:
        raise ValueError("prompts must hold at least one prompt, got none")
    model.eval()
    eos = tokenizer.eos_id
    # Warm-up: one untimed pass over every prompt, so one-time costs (allocations, backend
    # selection, first-touch of memory) are not counted as decoding.
    for prompt in prompts:
        warm = torch.tensor([prompt], device=device)
        ar_generate(model, warm, new_tokens, eos_token_id=eos)
        tidar_generate(model, warm, new_tokens, draft_len, beta=1.0, eos_token_id=eos)
    totals = {"ar_tokens": 0, "ar_time": 0.0, "ar_forwards": 0, "tidar_tokens": 0, "tidar_time": 0.0,
              "tidar_forwards": 0, "tidar_tokens_per_forward_sum": 0.0, "identical": 0}
    for index, prompt in enumerate(prompts):
        ids = torch.tensor([prompt], device=device)
        ar = ar_generate(model, ids, new_tokens, eos_token_id=eos)
        td = tidar_generate(model, ids, new_tokens, draft_len, beta=1.0, eos_token_id=eos)
        ar_seq, td_seq = ar.sequences()[0], td.sequences()[0]
        same = ar_seq == td_seq
        print(f"\n--- held-out prompt {index + 1} ---")
        print(_clip(tokenizer.decode(prompt)), end="")
        print("\033[1m" if sys.stdout.isatty() else "", end="")
        print(tokenizer.decode(td_seq), end="")
        print("\033[0m" if sys.stdout.isatty() else "")
        print(f"[AR   ] {len(ar_seq)} tokens, {ar.forwards} forwards, {ar.tokens_per_second:7.1f} tokens/s")
        print(f"[TiDAR] {len(td_seq)} tokens, {td.forwards} forwards, {td.tokens_per_forward:.2f} tokens per "
              f"forward, {td.tokens_per_second:7.1f} tokens/s; output identical to AR: {same}")
        totals["ar_tokens"] += len(ar_seq)
        totals["ar_time"] += ar.wall_time
        totals["ar_forwards"] += ar.forwards
        totals["tidar_tokens"] += len(td_seq)
        totals["tidar_time"] += td.wall_time
        totals["tidar_forwards"] += td.forwards
        totals["tidar_tokens_per_forward_sum"] += td.tokens_per_forward
        totals["identical"] += int(same)
    count = len(prompts)
    summary = {
        "prompts": count,
        "identical": totals["identical"],
        "tidar_tokens_per_forward": totals["tidar_tokens_per_forward_sum"] / count,
        "ar_tokens_per_s": totals["ar_tokens"] / totals["ar_time"],
        "tidar_tokens_per_s": totals["tidar_tokens"] / totals["tidar_time"],
        "ar_forwards": totals["ar_forwards"],
        "tidar_forwards": totals["tidar_forwards"],
    }
    summary["speedup"] = summary["tidar_tokens_per_s"] / summary["ar_tokens_per_s"]
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m tidar_kernels demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--train-seconds", type=float, default=None, help="wall-clock bound on training")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (at most)")
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts to decode")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens to generate per prompt")
    parser.add_argument("--out", default=None, help="also save the trained model (a trainer checkpoint) here")
    ns = parser.parse_args(argv)
    for name in ("prompts", "new_tokens"):
        if getattr(ns, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(ns, name)}")
    start = time.perf_counter()
    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args = GPU_DEFAULTS if device.startswith("cuda") else CPU_DEFAULTS
    args = dataclasses.replace(args, device=device, out_dir=ns.out, eval_prompts=max(ns.prompts, 1),
                               steps=ns.steps or args.steps, time_limit=ns.train_seconds or args.time_limit)
    overrides = f" {args.overrides}" if args.overrides else ""
    print(f"TiDAR demo on {device}: training config {args.config!r}{overrides} "
          f"(block size {args.block_size}, {args.batch_size}x{args.seq_len} tokens per step, at most "
          f"{args.steps} steps / {args.time_limit:.0f} s) on the Python standard library", flush=True)
    result = train(args)
    history = result.history
    ev = result.evaluation
    params = sum(p.numel() for p in result.model.parameters())
    print(f"trained {len(history)} steps in {result.train_seconds:.1f} s "
          f"({len(history) * args.batch_size * args.seq_len / result.train_seconds:.0f} tokens/s), "
          f"{params / 1e6:.2f} M parameters; final loss {history[-1]['loss']:.3f} "
          f"(AR {history[-1]['ar']:.3f}, diffusion {history[-1]['diffusion']:.3f}); held-out AR perplexity "
          f"{ev['heldout_ar_ppl']:.1f}", flush=True)
    prompts = result.datasets.heldout_prompts[:ns.prompts]
    if not prompts:
        raise RuntimeError(f"no held-out document is long enough for a prompt of {args.eval_prompt_len} tokens "
                           f"(expected at least one of >= {2 * args.eval_prompt_len} tokens); got none")
    summary = compare(result.model, result.tokenizer, prompts, args.block_size, ns.new_tokens,
                      torch.device(device))
    print(f"\n=== summary over {summary['prompts']} held-out prompts (greedy, beta = 1, draft length "
          f"{args.block_size}) ===")
    print(f"AR   : {summary['ar_tokens_per_s']:8.1f} tokens/s, 1.00 tokens per forward "
          f"({summary['ar_forwards']} forwards)")
    print(f"TiDAR: {summary['tidar_tokens_per_s']:8.1f} tokens/s, {summary['tidar_tokens_per_forward']:.2f} tokens "
          f"per forward ({summary['tidar_forwards']} forwards); wall-clock speedup {summary['speedup']:.2f}x")
    print(f"TiDAR output identical to AR: {summary['identical']}/{summary['prompts']} prompts")
    print(f"total demo time {time.perf_counter() - start:.0f} s")
    return summary


if __name__ == "__main__":
    main()
