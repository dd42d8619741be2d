"""Free token slots (TiDAR paper, Figure 1): forward latency against tokens per forward.

For a model with random weights (bf16, CUDA graphs) and a KV cache holding
``cache_len`` committed tokens, times one forward over ``N`` new tokens for
``N`` = 1, 2, 4, ..., 512 and the TiDAR step sizes ``k + k*k`` (k = 2..16), at
batch 1, 4, 16 and cache 1k, 4k, 16k. Every forward is an AR append step
(``append_attention``: each new token attends causally to the cache and the
earlier new tokens, its K/V written to the cache) followed by the LM head on
all ``N`` rows; the TiDAR step itself is timed by ``bench/decode.py``.

Split, each timed on its own at the model's shapes (graph-captured, median):

* ``attn_ms``: the attention module of one layer (q/k/v/o projections, RoPE,
  qk-norm, the attention op) x layers; ``attn_op_ms``: the op alone x layers;
* ``mlp_ms``: the SwiGLU MLP of one layer x layers;
* ``total_ms``: the whole forward, embedding to logits.

Models: ``qwen2.5-1.5b``, ``qwen3-8b``, ``qwen3-32b`` shapes. ``--layers`` runs
fewer layers (default for 32B: 16 of 64, so weights and a batch-16 16k cache fit
80 GB); the full-depth figures are then scaled and stated: per-layer figures x
the full layer count, and ``total_ms = measured total + (full - run layers) x
one decoder layer's time`` (``layers_run`` / ``layers_full`` columns).

Roofline (H100 SXM and H200 only): ``limit_ms`` is the least time the full-depth forward can
take (:func:`tidar_kernels.kernels.roofline.model_forward`: weights and cache read once, the
projection, MLP, attention and LM-head FLOPs), ``of_limit = limit_ms / total_ms``.

Flat region: ``N`` lies in it while ``total_ms(N) <= 1.1 x total_ms(1)`` (same
model, batch and cache), up to the first ``N`` that exceeds it. ``flat_end`` is
the largest such ``N``; ``max_flat_k`` the largest ``k`` whose step size
``k + k*k`` lies in the flat region. Both are printed, written to
``token_slots_summary.csv`` and marked on the plot.

Reproduce (GPU): ``python bench/token_slots.py --models qwen2.5-1.5b,qwen3-8b``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common
from tidar_kernels.kernels import ops, roofline
from tidar_kernels.model.kv_cache import KVCache
from tidar_kernels.kernels.mask import Layout
from tidar_kernels.model.transformer import CONFIGS, AttentionContext, TransformerConfig, rotary_tables

FLAT_TOLERANCE = 1.1  # latency within 10% of the single-token forward counts as flat
DEFAULT_LAYERS = {"qwen3-32b": 16}  # fewer layers, scaled to the full depth (module docstring)


def tidar_step_sizes(max_draft: int = 16) -> dict[int, int]:
    """``{k + k*k: k}`` for ``k = 2..max_draft``: the query count of a TiDAR decode step."""
    return {k + k * k: k for k in range(2, max_draft + 1)}


def token_counts(max_tokens: int, max_draft: int) -> list[int]:
    """Powers of two up to ``max_tokens`` and the TiDAR step sizes, sorted."""
    powers = [2 ** i for i in range(int(math.log2(max_tokens)) + 1)]
    return sorted(set(powers) | {n for n in tidar_step_sizes(max_draft) if n <= max_tokens})


def flat_region(latency: dict[int, float], step_sizes: dict[int, int]) -> tuple[int, Optional[int]]:
    """``(flat_end, max_flat_k)`` of a latency curve ``{N: ms}`` (module docstring)."""
    if 1 not in latency:
        raise ValueError(f"latency must include N=1 (the reference point), got N={sorted(latency)}")
    limit = FLAT_TOLERANCE * latency[1]
    flat_end = 1
    for n in sorted(latency):
        if latency[n] > limit:
            break
        flat_end = n
    ks = [k for n, k in step_sizes.items() if n <= flat_end and n in latency]
    return flat_end, max(ks) if ks else None


class Forward:
    """The timed pieces of one (batch, cache, N) point, over static tensors (graph-capturable)."""

    def __init__(self, model, cache: KVCache, batch: int, cache_len: int, tokens: int):
        config: TransformerConfig = model.config
        device = model.device
        self.model, self.cache = model, cache
        gen = torch.Generator(device=device).manual_seed(tokens)
        self.ids = torch.randint(0, config.vocab_size, (batch, tokens), device=device, generator=gen)
        self.positions = (cache_len + torch.arange(tokens, device=device)).expand(batch, tokens).contiguous()
        self.context = AttentionContext(Layout.CAUSAL, cache=cache)
        # The layer-level pieces take the RoPE tables the model builds once per forward.
        self.rope = rotary_tables(config, self.positions, model.dtype)
        self.hidden = torch.randn(batch, tokens, config.dim, device=device, dtype=model.dtype, generator=gen)
        self.q = torch.randn(batch, tokens, config.n_heads, config.head_dim, device=device, dtype=model.dtype,
                             generator=gen)
        self.kv = torch.randn(batch, tokens, config.n_kv_heads, config.head_dim, device=device, dtype=model.dtype,
                              generator=gen)

    def total(self):
        return self.model.lm_head(self.model(self.ids, self.positions, self.context))

    def layer(self):
        return self.model.layers[0](self.hidden, self.rope, self.context)

    def attention(self):
        return self.model.layers[0].attention(self.hidden, self.rope, self.context)

    def attention_op(self):
        return ops.append_attention(self.q, self.kv, self.kv, self.cache.k[0], self.cache.v[0], self.cache.seqlens,
                                    check_lengths=False)

    def mlp(self):
        return self.model.layers[0].feed_forward(self.hidden)


def measure_model(name: str, args, device: torch.device, dtype: torch.dtype, deadline: float,
                  figures=None) -> list[dict]:
    """All points of one model; stops early (returns what it has) past ``deadline``. With the
    GPU's datasheet ``figures`` each point carries the forward's roofline limit (full depth, LM
    head on all ``N`` rows) and the fraction of it ``total_ms`` reached."""
    full_config = TransformerConfig.from_name(name)
    full_layers = full_config.n_layers
    layers = args.layers or DEFAULT_LAYERS.get(name, full_layers)
    model = common.random_model(name, device, dtype, n_layers=min(layers, full_layers))
    run_layers = model.config.n_layers
    counts = token_counts(args.max_tokens, args.max_draft)
    steps = tidar_step_sizes(args.max_draft)
    rows = []
    for batch in args.batches:
        cache = KVCache.for_model(model, batch, max(args.cache_lens) + max(counts))
        for cache_len in args.cache_lens:
            cache.reset(torch.full((batch,), cache_len, dtype=torch.int32, device=device))
            for tokens in counts:
                if rows and time.monotonic() > deadline:
                    return rows
                fwd = Forward(model, cache, batch, cache_len, tokens)
                with torch.inference_mode():
                    ms = {part: common.time_ms(getattr(fwd, part), device, graph=device.type == "cuda")
                          for part in ("total", "layer", "attention", "attention_op", "mlp")}
                total_ms = ms["total"] + (full_layers - run_layers) * ms["layer"]
                work, traffic = roofline.model_forward(full_config, batch, tokens, cache_len, tokens)
                rows.append({
                    "model": name, "layers_run": run_layers, "layers_full": full_layers, "batch": batch,
                    "cache_len": cache_len, "tokens": tokens, "tidar_k": steps.get(tokens, ""),
                    "total_ms": total_ms,
                    "attn_ms": ms["attention"] * full_layers, "attn_op_ms": ms["attention_op"] * full_layers,
                    "mlp_ms": ms["mlp"] * full_layers, "layer_ms": ms["layer"], "measured_total_ms": ms["total"],
                } | common.roofline_columns(work, traffic, total_ms, figures))
                del fwd
        del cache
    return rows


def summarize(rows: list[dict], max_draft: int) -> list[dict]:
    """Flat-region end and largest flat ``k`` per (model, batch, cache) curve."""
    summary = []
    for model, batch, cache_len in common.unique((r["model"], r["batch"], r["cache_len"]) for r in rows):
        curve = {r["tokens"]: r["total_ms"] for r in rows
                 if (r["model"], r["batch"], r["cache_len"]) == (model, batch, cache_len)}
        if 1 not in curve:
            continue
        flat_end, max_k = flat_region(curve, tidar_step_sizes(max_draft))
        summary.append({"model": model, "batch": batch, "cache_len": cache_len, "ms_at_1": curve[1],
                        "flat_tolerance": FLAT_TOLERANCE, "flat_end": flat_end,
                        "first_above": min((n for n in curve if n > flat_end), default=""),
                        "max_flat_k": max_k if max_k is not None else "", "max_tokens_measured": max(curve)})
    return summary


def plot(rows: list[dict], summary: list[dict], path: Path, meta: dict) -> Path:
    """One row of panels per model, one panel per batch: total / attention / MLP vs N, per cache length."""
    plt = common.pyplot()
    models = common.unique(r["model"] for r in rows)
    batches = common.unique(r["batch"] for r in rows)
    fig, axes = plt.subplots(len(models), len(batches), squeeze=False,
                             figsize=(5.5 * len(batches), 4.2 * len(models)))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, model in enumerate(models):
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            caches = common.unique(r["cache_len"] for r in rows if (r["model"], r["batch"]) == (model, batch))
            for c, cache_len in enumerate(caches):
                pts = [r for r in rows if (r["model"], r["batch"], r["cache_len"]) == (model, batch, cache_len)]
                color = colors[c % len(colors)]
                xs = [r["tokens"] for r in pts]
                ax.plot(xs, [r["total_ms"] for r in pts], color=color, marker=".", label=f"total, cache {cache_len}")
                ax.plot(xs, [r["attn_ms"] for r in pts], color=color, linestyle="--", label=f"attention, {cache_len}")
                ax.plot(xs, [r["mlp_ms"] for r in pts], color=color, linestyle=":", label=f"MLP, {cache_len}")
                steps = [r for r in pts if r["tidar_k"] != ""]
                ax.scatter([r["tokens"] for r in steps], [r["total_ms"] for r in steps], color=color, marker="x")
                for s in summary:
                    if (s["model"], s["batch"], s["cache_len"]) == (model, batch, cache_len):
                        ax.axvline(s["flat_end"], color=color, alpha=0.5, linewidth=1)
                        ax.annotate(f"flat to N={s['flat_end']} (k<={s['max_flat_k'] or '-'})",
                                    (s["flat_end"], 0.03 + 0.3 * c), xycoords=("data", "axes fraction"),
                                    fontsize=7, color=color, rotation=90, va="bottom", ha="right")
            layers = next(r for r in rows if r["model"] == model)
            scaled = "" if layers["layers_run"] == layers["layers_full"] else (
                f" ({layers['layers_run']}/{layers['layers_full']} layers run, scaled)")
            ax.set_title(f"{model} batch {batch}{scaled}", fontsize=9)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens per forward (x: TiDAR step k+k*k)")
            ax.set_ylabel("latency, ms (median)")
            ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"Forward latency vs tokens per forward; flat = within {FLAT_TOLERANCE}x of N=1", fontsize=10)
    fig.tight_layout()
    return common.save_figure(fig, path, meta)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--models", type=lambda s: s.split(","), default=["qwen2.5-1.5b", "qwen3-8b", "qwen3-32b"])
    parser.add_argument("--layers", type=int, default=None,
                        help="run this many decoder layers and scale to the full depth "
                             f"(default: all, except {DEFAULT_LAYERS})")
    parser.add_argument("--batches", type=common.parse_int_list, default=[1, 4, 16])
    parser.add_argument("--cache-lens", type=common.parse_int_list, default=[1024, 4096, 16384])
    parser.add_argument("--max-tokens", type=int, default=512, help="largest power of two N")
    parser.add_argument("--max-draft", type=int, default=16, help="TiDAR step sizes k+k*k for k=2..this")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="per model: stop starting new points after this wall time, the first point always "
                             "runs (the CSV says it was cut)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.layers, args.batches = ["tiny"], 2, [1, 2]
        args.cache_lens, args.max_tokens, args.max_draft = [8, 32], 16, 3
    unknown = [name for name in args.models if name not in CONFIGS]
    if unknown:
        parser.error(f"--models must be from {sorted(CONFIGS)}, got {unknown}")
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers must be >= 1, got {args.layers}")
    if args.max_tokens < 1 or args.max_draft < 2:
        parser.error(f"--max-tokens must be >= 1 and --max-draft >= 2, got {args.max_tokens}, {args.max_draft}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Run the sweep; returns the CSV path."""
    args, argv, device, dtype, out_dir, meta = common.start_run(argv, parse_args, __file__)
    common.print_header(meta)
    budget = args.max_seconds if args.max_seconds is not None else math.inf

    rows = []
    figures = common.roofline_device(args.smoke)
    for name in args.models:
        new = measure_model(name, args, device, dtype, time.monotonic() + budget, figures)
        common.print_table(new, ["model", "batch", "cache_len", "tokens", "tidar_k", "total_ms", "attn_ms",
                                 "attn_op_ms", "mlp_ms", "limit_ms", "of_limit"])
        rows += new
        if device.type == "cuda":
            torch.cuda.empty_cache()
    planned = len(args.models) * len(args.batches) * len(args.cache_lens) * len(token_counts(args.max_tokens,
                                                                                           args.max_draft))
    meta["truncated"] = "no" if len(rows) == planned else f"yes, {len(rows)} of {planned} points (--max-seconds)"
    meta["dtype"], meta["flat_region"] = str(dtype), f"total_ms(N) <= {FLAT_TOLERANCE} x total_ms(1)"
    summary = summarize(rows, args.max_draft)
    path = common.write_csv(out_dir / "token_slots.csv", rows, meta)
    common.write_csv(out_dir / "token_slots_summary.csv", summary, meta)
    plot(rows, summary, out_dir / "token_slots.png", meta)
    print("\nflat region (total within", FLAT_TOLERANCE, "x of N=1):")
    common.print_table(summary, ["model", "batch", "cache_len", "ms_at_1", "flat_end", "first_above", "max_flat_k"])
    print(f"wrote {path}, {out_dir / 'token_slots_summary.csv'}, {out_dir / 'token_slots.png'}")
    print(f"reproduce: {meta['command']}")
    return path


if __name__ == "__main__":
    main()
