"""Codegen report of the Triton kernels, compiled ahead of time without a GPU (CI runs it).

For each headline shape (decode k = 4, 8, 16 with Qwen2.5-1.5B 12/2 and Qwen3-8B 32/8
heads, head dim 128, cache 4096, batch 1 and 8; the AR step; training S = 2048, block
16, forward and backward; bf16) the backend's own op functions in
``tidar_kernels/kernels/backends/triton_ops.py`` run on ``meta`` tensors with their kernel
launchers replaced by a recorder and the planner's device figures set to the target
GPU (``sm_90a``: H100, ``sm_80``: A100). So every launch configuration (tiles, warps,
stages, splits, grid) is exactly what the backend picks, from the same planning
functions. Each recorded launch is then specialised the way a real launch is (Triton's
own binder: ints equal to 1 become constants, 16-divisible ints and 16-byte aligned
pointers get divisibility hints; strides come from real 4-D meta tensors, not from
Triton's ``MockTensor`` whose 4-D strides are wrong) and compiled with
``triton.compile`` for ``GPUTarget("cuda", 90 | 80, 32)``: no driver is needed.

Per kernel and shape it prints ``wgmma`` / ``mma_sync`` (matmul instructions in the
PTX), ``tma`` (bulk tensor copies in the PTX), registers and spill bytes (ptxas),
shared memory (Triton), grid and, for the cached kernel, ``splits``, ``partial_bytes``
(split partials written and read: outputs in the input dtype, fp32 log-sum-exps) and
``ideal_bytes`` (what the step must move), with the roofline model's estimate
(``tidar_kernels/kernels/roofline.py``).

Every row carries the Triton version that compiled it (``triton``): the planners pick
per Triton version where an older compiler spills (``triton_ops.TRITON_VERSION``), and CI
runs this report under the newest Triton and under the oldest ones the supported torch
range pins (``scripts/codegen_all_tritons.sh``).

Triton APIs: ``triton.compile``, ``triton.compiler.ASTSource`` / ``make_backend``,
``triton.backends.compiler.GPUTarget`` and ``triton.knobs`` are public. Specialising a
launch the way ``JITFunction.run`` does has no public API without a GPU driver, so
:func:`specialise` uses the private names in :data:`PRIVATE_APIS` (the same ones Triton's
own ``triton._filecheck`` uses); ``python_tests/test_triton_codegen_report.py`` fails,
naming the missing one, when a Triton release drops any of them.

Exits 1 on any spill, on any matmul of a compute-bound path (decode k >= 8, training)
that is not ``wgmma`` on sm_90a, and when a compute-bound cached launch's
``partial_bytes`` exceed its ``ideal_bytes``. ``--json PATH`` writes one JSON line per
kernel, shape and arch.

Shapes ending in ``-tma`` run the opt-in TMA cache loop (``TIDAR_TRITON_TMA=1``; on sm_80
the backend falls back to the pointer loop). Their rows carry ``experimental: true``: the
same checks, and whether TMA took effect, are printed for them but never fail the report
(the switch is off by default).

    python scripts/triton_codegen_report.py [--json report.jsonl] [--arch sm_90a] [--only REGEX] [--jobs 2]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.pop("TRITON_INTERPRET", None)  # the compiler, not the interpreter
# Triton 3.9's default made explicit (a real launch with the variable unset fuses too); silences its warning.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime import jit as _triton_jit  # noqa: E402

from tidar_kernels.kernels import roofline  # noqa: E402
from tidar_kernels.kernels.backends import triton_ops  # noqa: E402
from tidar_kernels.kernels.mask import Layout, rows_written_to_cache  # noqa: E402

ARCHS = {"sm_90a": (90, roofline.H100), "sm_80": (80, roofline.A100)}
MODELS = {"qwen2.5-1.5b": (12, 2), "qwen3-8b": (32, 8)}
HEAD_DIM, CACHE_LEN, DTYPE = 128, 4096, torch.bfloat16
# The private Triton names :func:`specialise` needs: no public API binds a launch's
# arguments to its specialisation without a driver. See :func:`missing_private_apis`.
PRIVATE_APIS = ("triton.runtime.jit.create_function_from_signature", "triton.runtime.jit.JITFunction._pack_args",
                "triton.runtime.jit.JITFunction.signature", "triton.runtime.jit.JITFunction.params")
LAUNCHERS = ("_LAUNCH_FWD", "_LAUNCH_BWD_PRE", "_LAUNCH_BWD_DQ", "_LAUNCH_BWD_DKDV", "_LAUNCH_CACHED",
             "_LAUNCH_MERGE")


@dataclass
class Shape:
    """One headline case: ``run`` calls the backend's op functions on meta tensors."""

    name: str
    compute_bound: bool  # the compute-bound paths: decode k >= 8 and training
    run: Callable[[], None]
    step: Optional[roofline.CachedStep] = None
    # Opt-in variants (TIDAR_TRITON_TMA): reported, but kept out of the failing checks.
    tma: bool = False


@dataclass
class Launch:
    kernel: object  # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict
    plan: Optional[triton_ops.CachedPlan] = None


@dataclass
class Compiled:
    wgmma: int
    mma_sync: int
    tma: int
    regs: int
    spills: int
    smem_bytes: int
    warps: int
    stages: int
    seconds: float


def _meta(*shape, dtype=DTYPE):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _cached_shape(name: str, batch: int, num_rows: int, heads: tuple[int, int], layout: Layout, block: int,
                  compute_bound: bool, tma: bool = False) -> Shape:
    q_heads, kv_heads = heads
    written = rows_written_to_cache(layout, num_rows, block)

    def run():
        q = _meta(batch, num_rows, q_heads, HEAD_DIM)
        k_new, v_new = (_meta(batch, num_rows, kv_heads, HEAD_DIM) for _ in range(2))
        k_cache, v_cache = (_meta(batch, CACHE_LEN, kv_heads, HEAD_DIM) for _ in range(2))
        seqlens = _meta(batch, dtype=torch.int32)
        triton_ops.cached_attention._init_fn(q, k_new, v_new, k_cache, v_cache, seqlens, None, int(layout), block,
                                             HEAD_DIM ** -0.5)

    step = roofline.CachedStep(batch, num_rows, q_heads, kv_heads, HEAD_DIM, CACHE_LEN, written, 2)
    return Shape(name, compute_bound, run, step, tma)


def _training_shape(seq_len: int, block: int, heads: tuple[int, int]) -> Shape:
    q_heads, kv_heads = heads
    rows = 2 * seq_len  # [S clean | S mask]

    def run():
        q, dout, out = (_meta(1, rows, q_heads, HEAD_DIM) for _ in range(3))
        k, v = (_meta(1, rows, kv_heads, HEAD_DIM) for _ in range(2))
        triton_ops.attention_fwd._init_fn(q, k, v, int(Layout.TRAINING), block, HEAD_DIM ** -0.5)
        lse = _meta(1, q_heads, rows, dtype=torch.float32)
        triton_ops.attention_bwd._init_fn(dout, q, k, v, out, lse, int(Layout.TRAINING), block, HEAD_DIM ** -0.5)

    return Shape(f"train-s{seq_len}-b{block}", True, run)


def headline_shapes() -> list[Shape]:
    shapes = []
    for model, heads in MODELS.items():
        for batch in (1, 8):
            for k in (4, 8, 16):
                shapes.append(_cached_shape(f"decode-{model}-k{k}-n{CACHE_LEN}-b{batch}", batch, k + k * k, heads,
                                            Layout.DECODE, k, compute_bound=k >= 8))
            shapes.append(_cached_shape(f"ar-{model}-n{CACHE_LEN}-b{batch}", batch, 1, heads, Layout.CAUSAL, 1,
                                        compute_bound=False))
    shapes.append(_training_shape(2048, 16, MODELS["qwen2.5-1.5b"]))
    # The opt-in TMA cache loop (TIDAR_TRITON_TMA) at the compute-bound decode shapes; on sm_80
    # the backend falls back to the pointer loop (tma = 0).
    for model, heads in MODELS.items():
        shapes.append(_cached_shape(f"decode-{model}-k16-n{CACHE_LEN}-b1-tma", 1, 16 + 16 * 16, heads,
                                    Layout.DECODE, 16, compute_bound=True, tma=True))
    return shapes


@contextlib.contextmanager
def tma_switch(shape: Shape):
    """Inside: the backend's TMA switch as ``shape`` asks (what ``TIDAR_TRITON_TMA=1`` sets)."""
    saved = triton_ops.TMA_REQUESTED
    triton_ops.TMA_REQUESTED = shape.tma
    try:
        yield
    finally:
        triton_ops.TMA_REQUESTED = saved


@contextlib.contextmanager
def recording(device: roofline.Device, launches: list[Launch]):
    """Inside: the ops' launchers record instead of launching, and the planner plans for ``device``."""
    saved = {name: getattr(triton_ops, name) for name in LAUNCHERS}
    saved_figures, saved_plan = triton_ops.device_figures, triton_ops.plan_cached
    plans = []

    def plan_and_keep(*args, **kwargs):
        plans.append(saved_plan(*args, **kwargs))
        return plans[-1]

    class Recorder:
        def __init__(self, launcher):
            self.kernel = getattr(launcher, "kernel", launcher)  # wrap_triton keeps the JITFunction

        def __getitem__(self, grid):
            def record(*args, **kwargs):
                plan = plans[-1] if self.kernel is triton_ops.kernels.cached_attention_kernel else None
                launches.append(Launch(self.kernel, tuple(grid), args, kwargs, plan))
            return record

    try:
        for name in LAUNCHERS:
            setattr(triton_ops, name, Recorder(saved[name]))
        triton_ops.device_figures = lambda _device: device
        triton_ops.plan_cached = plan_and_keep
        yield
    finally:
        for name, launcher in saved.items():
            setattr(triton_ops, name, launcher)
        triton_ops.device_figures, triton_ops.plan_cached = saved_figures, saved_plan


def missing_private_apis(kernel=None) -> list[str]:
    """The names of :data:`PRIVATE_APIS` this Triton lacks (``signature`` and ``params`` are
    attributes of a ``JITFunction`` instance: checked on ``kernel``, by default one of ours)."""
    kernel = kernel if kernel is not None else triton_ops.kernels.attention_fwd_kernel
    present = {
        "triton.runtime.jit.create_function_from_signature": callable(
            getattr(_triton_jit, "create_function_from_signature", None)),
        "triton.runtime.jit.JITFunction._pack_args": callable(getattr(_triton_jit.JITFunction, "_pack_args", None)),
        "triton.runtime.jit.JITFunction.signature": isinstance(kernel, _triton_jit.JITFunction)
        and hasattr(kernel, "signature"),
        "triton.runtime.jit.JITFunction.params": isinstance(kernel, _triton_jit.JITFunction)
        and hasattr(kernel, "params"),
    }
    return [name for name in PRIVATE_APIS if not present[name]]


def check_private_apis() -> list[str]:
    """Problems with :data:`PRIVATE_APIS` in this Triton, each naming the private API: missing
    names, and whether :func:`specialise` still works through them on one recorded decode step
    (nothing is compiled). Empty when the report can run."""
    missing = missing_private_apis()
    if missing:
        return [f"Triton {triton.__version__} no longer has the private API {name}" for name in missing]
    launches: list[Launch] = []
    with recording(roofline.H100, launches):
        headline_shapes()[0].run()
    problems = []
    for launch in launches:
        try:
            specialise(launch, 90)
        except Exception as error:  # noqa: BLE001 - any failure of the private calls is reported
            problems.append(f"Triton {triton.__version__}: specialising {launch.kernel.__name__} through the private "
                            f"APIs {', '.join(PRIVATE_APIS)} failed: {error!r}")
    return problems


def specialise(launch: Launch, capability: int):
    """What ``JITFunction.run`` compiles for these arguments: ``(signature, constexprs, attrs, options)``.

    Triton's own binder and argument packing (private: :data:`PRIVATE_APIS`), so the
    specialisation (constants, divisibility hints) is the one a real launch gets."""
    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = _triton_jit.create_function_from_signature(launch.kernel.signature, launch.kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = launch.kernel._pack_args(backend, launch.kwargs, bound, specialization,
                                                                     options)
    return signature, constexprs, attrs, options


def ptx_count(ptx: str, opcode: str) -> int:
    """Instructions of ``ptx`` whose opcode starts with the regex ``opcode``, predicated ones
    included (TMA copies are: ``@%p15 cp.async.bulk.tensor...``); comments are not counted."""
    return len(re.findall(r"^\s*(?:@!?%p\d+\s+)?" + opcode, ptx, re.M))


_JOBS: list = []  # (kernel, signature, constexprs, attrs, options, capability), shared with forked workers


def _compile(index: int) -> Compiled:
    kernel, signature, constexprs, attrs, options, capability = _JOBS[index]
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):  # ptxas -v output (knobs.nvidia.dump_ptxas_log)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", capability, 32), options=options.__dict__)
    seconds = time.perf_counter() - start
    ptx, text = compiled.asm["ptx"], log.getvalue()
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not regs or not spills:
        raise RuntimeError(f"{kernel.__name__}: no ptxas register report in the compile log:\n{text}")
    return Compiled(
        wgmma=ptx_count(ptx, r"wgmma\.mma_async"),
        mma_sync=ptx_count(ptx, r"mma\.sync"),
        tma=ptx_count(ptx, r"cp\.async\.bulk\.tensor"),
        regs=int(regs[-1]), spills=sum(int(a) + int(b) for a, b in spills),
        smem_bytes=compiled.metadata.shared, warps=options.num_warps, stages=options.num_stages,
        seconds=seconds)


def _key(spec, capability, kernel) -> str:
    signature, constexprs, attrs, options = spec
    return repr((kernel.__name__, capability, sorted(signature.items()), sorted(constexprs.items()),
                 sorted(attrs.items()), sorted(options.__dict__.items())))


def run(archs: list[str], jobs: int, only: str) -> list[dict]:
    shapes = [shape for shape in headline_shapes() if re.search(only, shape.name)]
    recorded = []  # (arch, shape, launch, job index)
    index_of: dict[str, int] = {}
    for arch in archs:
        capability, device = ARCHS[arch]
        for shape in shapes:
            launches: list[Launch] = []
            with recording(device, launches), tma_switch(shape):
                shape.run()
            for launch in launches:
                spec = specialise(launch, capability)
                key = _key(spec, capability, launch.kernel)
                if key not in index_of:
                    index_of[key] = len(_JOBS)
                    _JOBS.append((launch.kernel, *spec, capability))
                recorded.append((arch, shape, launch, index_of[key]))

    start = time.perf_counter()
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.map(_compile, range(len(_JOBS)), chunksize=1)
    else:
        results = [_compile(i) for i in range(len(_JOBS))]
    print(f"compiled {len(_JOBS)} distinct kernel specialisations in {time.perf_counter() - start:.0f} s "
          f"({jobs} processes)")

    rows = []
    for arch, shape, launch, index in recorded:
        result = results[index]
        row = {"triton": triton.__version__, "kernel": launch.kernel.__name__.removesuffix("_kernel"),
               "shape": shape.name, "arch": arch, "compute_bound": shape.compute_bound, "wgmma": result.wgmma,
               "mma_sync": result.mma_sync, "tma": result.tma, "experimental": shape.tma, "regs": result.regs,
               "spills": result.spills, "smem_bytes": result.smem_bytes,
               "warps": result.warps, "stages": result.stages, "grid": list(launch.grid),
               "block_m": launch.kwargs.get("BLOCK_M"), "block_n": launch.kwargs.get("BLOCK_N"),
               "compile_s": round(result.seconds, 1)}
        if launch.plan is not None:
            device = ARCHS[arch][1]
            row |= {"splits": launch.plan.splits, "partial_bytes": launch.plan.estimate.partial_bytes,
                    "ideal_bytes": shape.step.ideal_bytes(), "model_us": launch.plan.estimate.seconds * 1e6,
                    "limit_us": roofline.limit_seconds(shape.step.flops(), shape.step.ideal_bytes(), device) * 1e6,
                    "roofline_compute_bound": roofline.compute_bound(shape.step, device)}
        rows.append(row)
    return rows


def failures(rows: list[dict]) -> list[str]:
    """Spills anywhere; matmuls not on wgmma in a compute-bound path on sm_90a; split
    partials moving more than the step's ideal bytes in a compute-bound path. Opt-in
    (experimental) rows are checked by :func:`experimental_notes` instead: they never
    fail the report."""
    found = []
    for row in rows:
        if row["experimental"]:
            continue
        where = f"{row['kernel']} {row['shape']} {row['arch']}"
        if row["spills"]:
            found.append(f"{where}: {row['spills']} bytes of register spills")
        if row["arch"] == "sm_90a" and row["compute_bound"] and row["mma_sync"]:
            found.append(f"{where}: {row['mma_sync']} matmuls on mma.sync, not wgmma (compute-bound path)")
        if row["compute_bound"] and row.get("partial_bytes", 0) > row.get("ideal_bytes", float("inf")):
            found.append(f"{where}: split partials move {row['partial_bytes'] / 1e6:.1f} MB, more than the step's "
                         f"ideal {row['ideal_bytes'] / 1e6:.1f} MB ({row['splits']} splits, compute-bound path)")
    return found


def experimental_notes(rows: list[dict]) -> list[str]:
    """What :func:`failures` would say of the opt-in rows, plus whether TMA took effect."""
    notes = failures([row | {"experimental": False} for row in rows if row["experimental"]])
    for row in rows:
        if row["experimental"] and row["kernel"] == "cached_attention" and row["arch"] == "sm_90a":
            notes.append(f"cached_attention {row['shape']} sm_90a: {row['tma']} TMA copies")
    return notes


def print_table(rows: list[dict]) -> None:
    columns = ["arch", "shape", "kernel", "wgmma", "mma_sync", "tma", "regs", "spills", "smem_bytes", "warps",
               "stages", "block_m", "grid", "splits", "partial_bytes", "ideal_bytes", "model_us", "limit_us"]

    def cell(row, column):
        value = row.get(column, "")
        if column in ("partial_bytes", "ideal_bytes") and value != "":
            return f"{value / 1e6:.1f}M"
        if column in ("model_us", "limit_us") and value != "":
            return f"{value:.1f}"
        if column == "grid":
            return "x".join(str(g) for g in value)
        return str(value)

    cells = [[cell(row, c) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write one JSON line per kernel, shape and arch")
    parser.add_argument("--arch", choices=sorted(ARCHS), action="append", help="default: all")
    parser.add_argument("--only", default="", help="regex: only the shapes whose name matches")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--check-private-apis", action="store_true",
                        help="only check the private Triton APIs the report needs (no compile); exit 1 naming a lost one")
    args = parser.parse_args(argv)
    problems = check_private_apis()
    for line in problems:
        print(f"FAIL {line}", file=sys.stderr)
    if problems or args.check_private_apis:
        print(f"private Triton APIs ({', '.join(PRIVATE_APIS)}): " + ("missing or changed" if problems else "present"))
        return 1 if problems else 0
    knobs.nvidia.dump_ptxas_log = True
    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: every kernel really compiles (ptxas log)
        knobs.cache.dir = cache
        rows = run(args.arch or list(ARCHS), args.jobs, args.only)
    print(f"Triton {triton.__version__}, torch {torch.__version__}")
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {args.json}")
    for line in experimental_notes(rows):
        print(f"opt-in (not checked): {line}")
    found = failures(rows)
    for line in found:
        print(f"FAIL {line}", file=sys.stderr)
    print(f"codegen report (Triton {triton.__version__}): " + (f"{len(found)} failures" if found else
                                "no spills; compute-bound matmuls on wgmma and partials within the ideal bytes"))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
