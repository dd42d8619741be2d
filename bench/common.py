"""Shared plumbing of the benchmark scripts: timing, result files, metadata, plots.

Every script in ``bench/`` follows the same conventions:

* **Timing.** :func:`time_ms` is :func:`tidar_kernels.model.tuning.median_ms`, the one
  timing routine of the package and the benchmarks: on CUDA
  ``triton.testing.do_bench`` (warm-up, then the median over repetitions; the L2
  cache is flushed before every repetition by zeroing a 256 MB buffer); with
  ``graph=True`` the callable is captured in a CUDA graph and the replay is
  timed, so launch overhead is that of a served step. On the CPU (``--smoke``) a
  plain ``perf_counter`` median; such numbers only prove the script runs and are
  labelled so.
* **Results.** ``bench/results/<device>/<name>.csv`` where ``<device>`` is the
  sanitised GPU name. Comment lines (``# key: value``) in front of the CSV header
  record GPU, driver, CUDA, torch, triton, git commit, date and the exact command.
  Smoke runs never write there: they go to ``--out`` (default: a temporary
  directory) under ``cpu-smoke/``.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

from tidar_kernels.kernels import roofline
from tidar_kernels.model.tuning import median_ms as time_ms  # noqa: F401  (the one timing routine, re-exported)

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_ROOT = REPO_ROOT / "bench" / "results"
SMOKE_DEVICE = "cpu-smoke"
SMOKE_BANNER = "SMOKE RUN on CPU: tiny shapes, timings are a functionality check, NOT results"

# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def argument_parser(script_doc: str) -> argparse.ArgumentParser:
    """A script's parser: the first paragraph of its docstring as the description, ``--smoke`` and
    ``--out`` (shared by every script)."""
    parser = argparse.ArgumentParser(description=script_doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU in seconds (CI check); timings are not results")
    parser.add_argument("--out", type=Path, default=None,
                        help="output root (default: bench/results, or a temporary directory with --smoke); "
                             "files go to <out>/<device>/")
    return parser


def bench_device(smoke: bool) -> torch.device:
    """CUDA for real runs (required), CPU for smoke runs.

    Smoke runs use one CPU thread: on small shared CI machines several threads
    spin against each other and a tiny step takes a hundred times longer.
    """
    if smoke:
        torch.set_num_threads(1)
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("this benchmark needs a CUDA device; use --smoke for the CPU functionality check")
    return torch.device("cuda")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_label(smoke: bool, cpu: bool = False) -> str:
    """Folder name of the results: the sanitised GPU name (``cpu``: CPU model name), or ``cpu-smoke``."""
    if smoke:
        return SMOKE_DEVICE
    name = cpu_name() if cpu else torch.cuda.get_device_name()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def roofline_device(smoke: bool) -> Optional[roofline.Device]:
    """Datasheet figures of the bench GPU for the roofline columns (H100 SXM and H200 known,
    :func:`tidar_kernels.kernels.roofline.device_from_name`); None, with a note, anywhere else."""
    name = "the CPU (smoke run)" if smoke else torch.cuda.get_device_name()
    figures = None if smoke else roofline.device_from_name(name)
    if figures is None:
        print(f"# roofline columns skipped: no datasheet figures for {name} (known: H100 SXM, H200)")
    return figures


def roofline_columns(flops: float, hbm_bytes: float, ms: Optional[float],
                     figures: Optional[roofline.Device]) -> dict:
    """``limit_ms``: the least time ``flops`` and ``hbm_bytes`` can take on the GPU (the roofline,
    :func:`tidar_kernels.kernels.roofline.limit_seconds`); ``of_limit``: limit / measured (1 = at the
    roofline). Empty without figures or a measured time."""
    if figures is None or ms is None:
        return {}
    limit_ms = roofline.limit_seconds(flops, hbm_bytes, figures) * 1e3
    return {"limit_ms": limit_ms, "of_limit": limit_ms / ms}


def output_dir(out: Optional[Path], smoke: bool, cpu: bool = False) -> Path:
    """``<out>/<device>/``; smoke runs default to a temporary directory, never to bench/results.
    ``cpu``: a benchmark of the CPU itself (the folder is named after the CPU)."""
    if out is None:
        out = Path(tempfile.gettempdir()) / "tidar-bench" if smoke else RESULTS_ROOT
    resolved, results = Path(out).resolve(), RESULTS_ROOT.resolve()
    if smoke and (resolved == results or results in resolved.parents):
        raise ValueError(f"--out must lie outside {RESULTS_ROOT} for a --smoke run (smoke timings are not "
                         f"results), got {out}")
    path = Path(out) / device_label(smoke, cpu)
    path.mkdir(parents=True, exist_ok=True)
    return path


def start_run(argv: Optional[Sequence[str]], parse_args: Callable[[list], argparse.Namespace], script: str,
              smoke_dtype: torch.dtype = torch.float32) -> tuple[argparse.Namespace, list, torch.device, torch.dtype,
                                                                 Path, dict[str, str]]:
    """The common start of every script's ``main``: arguments, device, dtype, output folder, metadata.

    ``argv`` defaults to ``sys.argv[1:]``; ``script`` is the script's ``__file__``
    (for the reproduce command). The dtype is bf16 on CUDA and ``smoke_dtype``
    in smoke runs. Returns ``(args, argv, device, dtype, out_dir, meta)``; the
    caller adds its own metadata and prints it (:func:`print_header`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = bench_device(args.smoke)
    dtype = smoke_dtype if args.smoke else torch.bfloat16
    out_dir = output_dir(args.out, args.smoke)
    meta = metadata(args.smoke, script, argv)
    return args, argv, device, dtype, out_dir, meta


def parse_int_list(text: str) -> list[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]`` (argparse type)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


# ----------------------------------------------------------------------------
# Metadata and CSV
# ----------------------------------------------------------------------------


def _git_commit() -> str:
    """HEAD, ``-dirty`` when files other than results differ; else ``$TIDAR_BENCH_COMMIT`` (a copy
    of the tree without ``.git``, e.g. a copy on a GPU machine); else ``unknown``."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", ":(exclude)bench/results"],
                               cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("TIDAR_BENCH_COMMIT", "unknown")
    return commit + ("-dirty" if dirty else "")


def _driver_version() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


def metadata(smoke: bool, script: str, argv: Sequence[str], cpu: bool = False) -> dict[str, str]:
    """Where and how a result was measured: device, versions, commit, date, reproduce command.

    ``script`` is the script's ``__file__`` and ``argv`` its arguments, so the
    command is the same whether the script ran from the shell or from a test.
    ``cpu``: a benchmark of the CPU itself; its model name and torch's thread count are recorded.
    """
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if smoke:
        gpu, driver, cuda = "none (CPU smoke run)", "n/a", "n/a"
    elif cpu:
        gpu, driver, cuda = "none (CPU run)", "n/a", "n/a"
    else:
        gpu, driver, cuda = torch.cuda.get_device_name(), _driver_version(), str(torch.version.cuda)
    script_path = Path(script).resolve()
    if script_path.is_relative_to(REPO_ROOT):
        script_path = script_path.relative_to(REPO_ROOT)
    return {
        "device": device_label(smoke, cpu),
        "gpu": gpu,
        "cpu": cpu_name(),
        "threads": str(torch.get_num_threads()),
        "driver": driver,
        "cuda": cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", str(script_path)] + list(argv)),
        "note": SMOKE_BANNER if smoke else "measured result",
    }


def write_csv(path: Path, rows: Sequence[dict], meta: dict[str, str]) -> Path:
    """Write ``rows`` as CSV behind ``# key: value`` metadata lines; returns ``path``."""
    if not rows:
        raise ValueError(f"rows must not be empty when writing {path}")
    fields: list[str] = []
    for row in rows:
        fields.extend(key for key in row if key not in fields)
    with open(path, "w", newline="") as handle:
        for key, value in meta.items():
            handle.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows([{key: _fmt(row.get(key)) for key in fields} for row in rows])
    return path


def read_csv(path: Path) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Inverse of :func:`write_csv`: ``(metadata, rows)``."""
    meta, lines = {}, []
    with open(path) as handle:
        for line in handle:
            if line.startswith("# ") and not lines:
                key, _, value = line[2:].rstrip("\n").partition(": ")
                meta[key] = value
            else:
                lines.append(line)
    return meta, list(csv.DictReader(lines))


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def print_header(meta: dict[str, str]) -> None:
    """Print the metadata and, for smoke runs, the not-a-result banner."""
    if meta["device"] == SMOKE_DEVICE:
        print("=" * len(SMOKE_BANNER) + "\n" + SMOKE_BANNER + "\n" + "=" * len(SMOKE_BANNER))
    for key in ("gpu", "driver", "cuda", "cpu", "threads", "torch", "triton", "commit", "date", "command"):
        print(f"# {key}: {meta[key]}")


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Fixed-width table of ``columns`` (missing values blank)."""
    cells = [[_fmt(row.get(col)) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(cell[i]) for cell in cells]) for i, col in enumerate(columns)]
    print("  ".join(col.rjust(w) for col, w in zip(columns, widths)))
    for cell in cells:
        print("  ".join(value.rjust(w) for value, w in zip(cell, widths)))


# ----------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------


def pyplot():
    """matplotlib's pyplot with the file-only Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path, meta: dict[str, str]) -> Path:
    """Save ``fig`` with a footer naming device, versions and commit (and the smoke banner)."""
    footer = f"{meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | {meta['commit'][:12]}"
    if meta["device"] == SMOKE_DEVICE:
        footer = "SMOKE (CPU, not a result) | " + footer
    fig.text(0.01, -0.01, footer, fontsize=7, color="gray", va="top")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    return path


def unique(values: Iterable) -> list:
    """Distinct values in first-seen order."""
    return list(dict.fromkeys(values))


# ----------------------------------------------------------------------------
# Models with random weights
# ----------------------------------------------------------------------------


def random_model(name: str, device: torch.device, dtype: torch.dtype, **overrides):
    """``Transformer(TransformerConfig.from_name(name, **overrides))`` with random weights.

    Built on the meta device and materialised on ``device`` (no slow CPU init of
    billions of parameters): weights ~ N(0, 0.02), norm weights 1, biases 0.
    Timings do not depend on the values; these keep activations finite.
    """
    from tidar_kernels.model.transformer import RMSNorm, Transformer, TransformerConfig

    config = TransformerConfig.from_name(name, **overrides)
    with torch.device("meta"):
        model = Transformer(config).to(dtype)  # no memory yet: materialised once, in dtype
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, 0.02, generator=gen)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
    return model.eval()
