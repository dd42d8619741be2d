"""End-to-end decode speed: TiDAR against AR on the same model, prompt and cache length.

Both decoders run the same model (random weights, bf16) on the same prompt of
``--cache-len`` random tokens. Two latencies are measured for each:

* ``step_ms``: one graph-captured step's compute (AR: one token forward, LM
  head, greedy pick, commit; TiDAR at draft length ``k``: the ``k + k*k`` token
  forward, LM head on the rows acceptance needs, the acceptance op, the next
  drafts: :mod:`tidar_kernels.model.tuning`), median with warm-up;
* ``loop_ms``: per forward of the real loops, :func:`tidar_kernels.model.generate.
  ar_generate` / ``tidar_generate`` (CUDA graphs, stop checks and all): two
  runs of ``--new-tokens`` lengths, ``(wall_long - wall_short) / (forwards_long -
  forwards_short)``, which cancels the prefill; median of ``--repeats``.

Tokens per forward depends on the weights. Random weights accept next to
nothing, so it comes from an acceptance model given on the command line and
stated in every output: ``--acceptance a`` (geometric, per-token probability
``a``; the default 0.885 gives the paper's 7.45 tokens per forward at k = 16
for the 1.5B model) or ``--acceptance-hist h0,h1,...`` (a trained model's
``GenerationResult.acceptance_histogram``: ``h[c]`` steps accepted ``c``).
``--steps`` accepted counts are drawn from it (seeded) and ``tokens/s = drawn
tokens / (steps x loop_ms)``; the expectation is reported beside the draw.

The draft length is the one :func:`tidar_kernels.tune_draft_length` picks for
this device, batch and cache from ``step_ms`` (``--draft-len K`` fixes it
instead); k = 16, the paper's choice, is reported too when among ``--draft-lens``.

On an H100 SXM or H200 every ``step_ms`` row also gets ``limit_ms``, the roofline limit of the
step (:func:`tidar_kernels.kernels.roofline.model_forward`: weights and cache read once, the
projection, MLP, attention and LM-head FLOPs), and ``of_limit = limit_ms / step_ms``.

Self-speculation (``decode_self_spec.csv``): the real loops of AR, quadratic self-speculation
(``tidar_generate`` at k = ``--spec-lens``, default 4, 8, 16, 32) and linear self-speculation
(``linear_spec_generate``, two forwards a step, same block lengths), at ``--spec-batches``
(default 1 and 8): tokens/s of the whole call (prefill included) and the measured tokens
per forward, greedy. Random weights accept next to nothing; ``--model DIR`` loads a
checkpoint (:func:`tidar_kernels.model.loading.load_model`) for every table instead of
``--models``, ``--prompt`` gives it real text, and ``--spec-lora DIR`` attaches its
speculation adapter (on the mask rows in quadratic mode, in the draft in linear mode).

Outputs ``decode.csv`` (AR and TiDAR rows: both latencies, tokens per forward,
tokens/s and speedup from ``loop_ms``, both latency ratios to AR), ``decode_tuning.csv`` (the tuner's
table), ``decode_self_spec.csv`` and ``decode.png``.

Reproduce (GPU): ``python bench/decode.py --models qwen2.5-1.5b,qwen3-8b``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common
from tidar_kernels.kernels import roofline
from tidar_kernels.model import checkpoints
from tidar_kernels.model.adapters import adapters_of, attach_lora
from tidar_kernels.model.generate import ar_generate, linear_spec_generate, tidar_generate
from tidar_kernels.model.loading import load_model
from tidar_kernels.model.transformer import CONFIGS
from tidar_kernels.model.tuning import describe_acceptance, expected_tokens, step_ms, tune_draft_length

PAPER_DRAFT_LEN = 16
DEFAULT_ACCEPTANCE = 0.885  # sum_{i<16} 0.885**i = 7.45, the paper's 1.5B tokens per forward


def sample_accepted(draft_len: int, acceptance, steps: int, batch: int, seed: int = 0) -> torch.Tensor:
    """Accepted counts ``[steps, batch]`` (``1..draft_len``) drawn from the acceptance model."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(acceptance, (int, float)) and not isinstance(acceptance, bool):  # as tuning.expected_tokens
        hits = torch.rand(steps, batch, draft_len - 1, generator=gen) < acceptance
        return 1 + torch.cumprod(hits.int(), dim=-1).sum(-1)
    counts = torch.tensor([float(c) for c in acceptance[1:]])  # index 0 (finished sequences) ignored
    draws = 1 + torch.multinomial(counts / counts.sum(), steps * batch, replacement=True, generator=gen)
    return draws.clamp(max=draft_len).view(steps, batch)


def random_prompt(model, batch: int, length: int) -> torch.Tensor:
    """``[batch, length]`` random token ids, never the mask token."""
    gen = torch.Generator(device=model.device).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device=model.device, generator=gen)
    if model.config.mask_token_id is not None:
        ids[ids == model.config.mask_token_id] = 0
    return ids


def loop_ms(generate, model, prompt: torch.Tensor, new_tokens: tuple[int, int], repeats: int, **kwargs) -> dict:
    """Per-forward latency of a real decode loop (module docstring) and its measured tokens per forward."""
    for n in new_tokens:  # warm-up at both lengths: kernels, graph captures and pools of every shape
        generate(model, prompt, n, **kwargs)
    per_forward, tokens_per_forward = [], []
    for _ in range(repeats):
        short, long = (generate(model, prompt, n, **kwargs) for n in new_tokens)
        if long.forwards <= short.forwards:
            raise RuntimeError(f"--new-tokens {new_tokens} gave no extra forwards ({short.forwards} vs "
                               f"{long.forwards}); widen the gap")
        per_forward.append((long.wall_time - short.wall_time) / (long.forwards - short.forwards) * 1e3)
        tokens_per_forward.append(long.tokens_per_forward)
    return {"loop_ms": statistics.median(per_forward), "loop_tokens_per_forward": statistics.median(tokens_per_forward)}


def decode_rows(base: dict, acceptance, steps: int, ar: dict, tidar: dict[int, dict], chosen: int) -> list[dict]:
    """The AR row and one TiDAR row per reported draft length (the tuned one and k = 16).

    ``ar`` and ``tidar[k]`` hold ``step_ms``, ``loop_ms`` and ``loop_tokens_per_forward``;
    tokens/s and the speedup use ``loop_ms`` (the real loop), both latency ratios are given.
    """
    ar_tps = base["batch"] / ar["loop_ms"] * 1e3

    def row(method, k, latencies, per_forward, expected, tps, simulated):
        return base | {"method": method, "draft_len": k} | latencies | {
            "tokens_per_forward": per_forward, "expected_tokens_per_forward": expected, "tokens_per_s": tps,
            "speedup_vs_ar": tps / ar_tps, "step_ms_ratio_vs_ar": latencies["step_ms"] / ar["step_ms"],
            "loop_ms_ratio_vs_ar": latencies["loop_ms"] / ar["loop_ms"], "steps_simulated": simulated}

    rows = [row("ar", "", ar, 1.0, 1.0, ar_tps, "")]
    for k in common.unique([chosen, PAPER_DRAFT_LEN]):
        if k in tidar:
            accepted = sample_accepted(k, acceptance, steps, base["batch"])
            tps = float(accepted.sum()) / (steps * tidar[k]["loop_ms"]) * 1e3
            rows.append(row("tidar (tuned k)" if k == chosen else f"tidar (k={k})", k, tidar[k],
                            float(accepted.float().mean()), expected_tokens(k, acceptance), tps, steps))
    return rows


def plot(tuning: list[dict], rows: list[dict], path: Path, meta: dict) -> Path:
    """Per model: step latency and expected tokens/s against k, AR as a horizontal line, tuned k marked."""
    plt = common.pyplot()
    models = common.unique(r["model"] for r in rows)
    fig, axes = plt.subplots(len(models), 2, squeeze=False, figsize=(11, 4 * len(models)))
    for (left, right), model in zip(axes, models):
        ar = next(r for r in rows if r["method"] == "ar" and r["model"] == model)
        table = [r for r in tuning if r["model"] == model]
        ks = [r["draft_len"] for r in table]
        left.plot(ks, [r["step_ms"] for r in table], marker="o", label="TiDAR step")
        left.axhline(ar["step_ms"], color="gray", linestyle="--", label="AR step")
        left.set_xlabel("draft length k (k + k*k tokens per step)")
        left.set_ylabel("step latency, ms (median)")
        left.set_title(f"{model} batch {ar['batch']} cache {ar['cache_len']}", fontsize=9)
        left.legend(fontsize=8)
        right.plot(ks, [r["tokens_per_s"] for r in table], marker="o", label="TiDAR (expected, from step_ms)")
        right.axhline(ar["batch"] / ar["step_ms"] * 1e3, color="gray", linestyle="--", label="AR (from step_ms)")
        best = next(r for r in table if r["tuned"])  # the tuner's pick (ties go to the smaller k)
        right.scatter([best["draft_len"]], [best["tokens_per_s"]], color="red", zorder=3,
                      label=f"tuned k={best['draft_len']}")
        right.set_xlabel("draft length k")
        right.set_ylabel("tokens/s")
        right.set_title(f"acceptance: {ar['acceptance']}", fontsize=8)
        right.legend(fontsize=8)
    fig.tight_layout()
    return common.save_figure(fig, path, meta)


def step_roofline(config, batch: int, cache_len: int, draft_len: Optional[int], ms: float, figures) -> dict:
    """Roofline columns of one graph-captured step (:func:`common.roofline_columns`): AR is one
    token with the LM head on it; TiDAR ``k + k*k`` tokens with the LM head on the ``3k - 1``
    rows acceptance and the next drafts read (:mod:`tidar_kernels.model.tuning`)."""
    tokens, lm_rows = (1, 1) if draft_len is None else (draft_len + draft_len * draft_len, 3 * draft_len - 1)
    work, traffic = roofline.model_forward(config, batch, tokens, cache_len, lm_rows)
    return common.roofline_columns(work, traffic, ms, figures)


def self_speculation_rows(name: str, model, args, prompt_ids: Optional[list[int]]) -> list[dict]:
    """AR, quadratic and linear self-speculation rows of one model (module docstring).

    Each configuration runs once to warm up (kernels, graph capture), then once measured
    with ``--new-tokens``' LONG count; ``prompt_ids`` (else random tokens of ``--cache-len``).
    """
    lora = bool(adapters_of(model))
    runs = [("ar", "", ar_generate, {})]
    runs += [("quadratic", b, tidar_generate, {"draft_len": b, "spec_lora": "mask_rows" if lora else None})
             for b in args.spec_lens]
    runs += [("linear", b, linear_spec_generate, {"block_len": b, "spec_lora": "draft" if lora else None})
             for b in args.spec_lens]
    rows = []
    for batch in args.spec_batches:
        if prompt_ids is None:
            prompt = random_prompt(model, batch, max(1, args.cache_len))
        else:
            prompt = torch.tensor([prompt_ids] * batch, dtype=torch.long, device=model.device)
        for method, block_len, generate, kwargs in runs:
            generate(model, prompt, args.new_tokens[0], **kwargs)
            result = generate(model, prompt, args.new_tokens[1], **kwargs)
            rows.append({"model": name, "batch": batch, "prompt_len": prompt.shape[1], "method": method,
                         "block_len": block_len, "spec_lora": lora and method != "ar",
                         "new_tokens": int(result.lengths.sum()), "forwards": result.forwards,
                         "tokens_per_forward": result.tokens_per_forward,
                         "tokens_per_s": result.tokens_per_second})
    return rows


def load_models(args, device: torch.device, dtype: torch.dtype):
    """``(name, model, prompt ids or None)`` of every model to measure: ``--model DIR`` or ``--models``."""
    if args.model is None:
        for name in args.models:
            yield name, common.random_model(name, device, dtype), None
        return
    model, tokenizer = load_model(args.model, device, dtype)
    if args.spec_lora is not None:
        attach_lora(model, checkpoints.load_spec_lora(args.spec_lora, model.config, model.device, model.dtype))
    yield Path(args.model).name, model, (tokenizer.encode(args.prompt) if args.prompt else None)


def measure_model(name: str, model, args, figures=None) -> tuple[list[dict], list[dict]]:
    """``(decode rows, tuning rows)`` of one model; with the GPU's datasheet ``figures`` the
    step rows carry their roofline limit and the fraction of it reached."""
    prompt = random_prompt(model, args.batch, args.cache_len)
    choice = tune_draft_length(model, args.batch, args.cache_len, args.acceptance_model, args.draft_lens)
    chosen = args.draft_len or choice.draft_len
    step = {row.draft_len: row.step_ms for row in choice.table}
    ar = {"step_ms": step_ms(model, args.batch, args.cache_len, None)}
    ar |= step_roofline(model.config, args.batch, args.cache_len, None, ar["step_ms"], figures)
    ar |= loop_ms(ar_generate, model, prompt, tuple(args.new_tokens), args.repeats)
    tidar = {}
    for k in common.unique([chosen, PAPER_DRAFT_LEN]):
        if k in step or k == chosen:
            tidar[k] = {"step_ms": step[k] if k in step else step_ms(model, args.batch, args.cache_len, k)}
            tidar[k] |= step_roofline(model.config, args.batch, args.cache_len, k, tidar[k]["step_ms"], figures)
            tidar[k] |= loop_ms(tidar_generate, model, prompt, tuple(args.new_tokens), args.repeats, draft_len=k)
    base = {"model": name, "batch": args.batch, "cache_len": args.cache_len,
            "acceptance": describe_acceptance(args.acceptance_model)}
    ar_step_tps = args.batch / ar["step_ms"] * 1e3
    tuning = [base | {"draft_len": row.draft_len, "step_ms": row.step_ms,
                      "expected_tokens_per_forward": row.expected_tokens_per_step, "tokens_per_s": row.tokens_per_s,
                      "speedup_vs_ar": row.tokens_per_s / ar_step_tps,
                      "step_ms_ratio_vs_ar": row.step_ms / ar["step_ms"],
                      "tuned": row.draft_len == choice.draft_len}
              | step_roofline(model.config, args.batch, args.cache_len, row.draft_len, row.step_ms, figures)
              for row in choice.table]
    return decode_rows(base, args.acceptance_model, args.steps, ar, tidar, chosen), tuning


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--models", type=lambda text: text.split(","), default=["qwen2.5-1.5b", "qwen3-8b"],
                        help="TransformerConfig names (random weights), comma-separated")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cache-len", type=int, default=1024, help="committed tokens (the prompt) in the cache")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--acceptance", type=float, default=None,
                       help=f"per-token acceptance probability, geometric model (default {DEFAULT_ACCEPTANCE})")
    group.add_argument("--acceptance-hist", type=common.parse_int_list, default=None,
                       help="h0,h1,...: h[c] steps accepted c tokens (a trained model's acceptance_histogram)")
    parser.add_argument("--draft-lens", type=common.parse_int_list, default=list(range(1, 17)),
                        help="draft lengths the tuner times")
    parser.add_argument("--draft-len", type=int, default=None, help="fix k instead of tuning it")
    parser.add_argument("--steps", type=int, default=1000, help="simulated decode steps per TiDAR row")
    parser.add_argument("--new-tokens", type=common.parse_int_list, default=[32, 160],
                        help="SHORT,LONG new tokens of the two real-loop runs whose difference is timed")
    parser.add_argument("--repeats", type=int, default=3, help="real-loop measurements (median)")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="a checkpoint (tidar_kernels.model.loading.load_model) instead of --models")
    parser.add_argument("--prompt", default=None, help="with --model: the self-speculation rows' prompt text")
    parser.add_argument("--spec-lora", default=None, metavar="DIR",
                        help="with --model: a linear_spec_lora/ directory to attach")
    parser.add_argument("--spec-lens", type=common.parse_int_list, default=[4, 8, 16, 32],
                        help="block lengths of the self-speculation rows (1..32)")
    parser.add_argument("--spec-batches", type=common.parse_int_list, default=[1, 8],
                        help="batch sizes of the self-speculation rows")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.cache_len, args.draft_lens, args.steps = ["tiny"], 32, [1, 2, 3, 4], 50
        args.new_tokens, args.repeats = [4, 12], 1
        args.spec_lens, args.spec_batches = [2, 4], [1, 2]
    if (args.prompt is not None or args.spec_lora is not None) and args.model is None:
        parser.error("--prompt and --spec-lora need --model DIR")
    if any(not 1 <= b <= 32 for b in args.spec_lens) or any(b < 1 for b in args.spec_batches):
        parser.error(f"--spec-lens must lie in [1, 32] and --spec-batches be >= 1, got {args.spec_lens} and "
                     f"{args.spec_batches}")
    unknown = [name for name in args.models if name not in CONFIGS]
    if unknown:
        parser.error(f"--models must be from {sorted(CONFIGS)}, got {unknown}")
    if len(args.new_tokens) != 2 or not 1 <= args.new_tokens[0] < args.new_tokens[1]:
        parser.error(f"--new-tokens must be SHORT,LONG with 1 <= SHORT < LONG, got {args.new_tokens}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    acceptance = args.acceptance_hist if args.acceptance_hist is not None else (
        DEFAULT_ACCEPTANCE if args.acceptance is None else args.acceptance)
    try:
        for k in args.draft_lens + ([args.draft_len] if args.draft_len else []):
            expected_tokens(k, acceptance)
    except ValueError as err:
        parser.error(f"--acceptance / --acceptance-hist / --draft-lens: {err}")
    args.acceptance_model = acceptance
    if args.batch < 1 or args.cache_len < 0 or args.steps < 1:
        parser.error(f"--batch and --steps must be >= 1 and --cache-len >= 0, got {args.batch}, {args.steps}, "
                     f"{args.cache_len}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Measure AR and TiDAR steps, tune k, simulate acceptance; returns the CSV path."""
    args, argv, device, dtype, out_dir, meta = common.start_run(argv, parse_args, __file__)
    meta["weights"] = "random (acceptance simulated from the stated model)"
    meta["acceptance"] = describe_acceptance(args.acceptance_model)
    common.print_header(meta)
    print(f"# acceptance: {meta['acceptance']} (a parameter, not measured: the weights are random)")

    rows, tuning, spec = [], [], []
    figures = common.roofline_device(args.smoke)
    for name, model, prompt_ids in load_models(args, device, dtype):
        new_rows, new_tuning = measure_model(name, model, args, figures)
        rows, tuning = rows + new_rows, tuning + new_tuning
        spec += self_speculation_rows(name, model, args, prompt_ids)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    path = common.write_csv(out_dir / "decode.csv", rows, meta)
    common.write_csv(out_dir / "decode_tuning.csv", tuning, meta)
    common.write_csv(out_dir / "decode_self_spec.csv", spec, meta)
    plot(tuning, rows, out_dir / "decode.png", meta)
    common.print_table(tuning, ["model", "draft_len", "step_ms", "expected_tokens_per_forward", "tokens_per_s",
                                "speedup_vs_ar", "step_ms_ratio_vs_ar", "limit_ms", "of_limit"])
    print()
    common.print_table(rows, ["model", "method", "draft_len", "step_ms", "loop_ms", "tokens_per_forward",
                              "tokens_per_s", "speedup_vs_ar", "loop_ms_ratio_vs_ar", "limit_ms", "of_limit"])
    print()
    common.print_table(spec, ["model", "batch", "method", "block_len", "spec_lora", "forwards", "tokens_per_forward",
                              "tokens_per_s"])
    print(f"wrote {path}, {out_dir / 'decode_tuning.csv'}, {out_dir / 'decode_self_spec.csv'}, "
          f"{out_dir / 'decode.png'}")
    print(f"reproduce: {meta['command']}")
    return path


if __name__ == "__main__":
    main()
