"""The fault-injection points of scripts/emulator_mutations.sh (csrc/mutation.h), without building.

The macro expands to the normal tokens unless ``-DTIDAR_MUTATE_<name>`` is given, and the
script refuses to run when a fault it names has no point in the sources or a point has no fault.
The mutated builds themselves run in scripts/test.sh (emulator_mutations.sh).
"""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CXX = shutil.which("g++")


@pytest.mark.skipif(CXX is None, reason="needs g++ for its preprocessor")
@pytest.mark.parametrize("defines, expected", [
    ([], "a: x + y; b: f(a, b); c: __syncthreads();"),
    (["-DTIDAR_MUTATE_one"], "a: x - y; b: f(a, b); c: __syncthreads();"),
    (["-DTIDAR_MUTATE_one", "-DTIDAR_MUTATE_two"], "a: x - y; b: f(b, a); c: ;"),
    (["-DTIDAR_MUTATE_one=0"], "a: x + y; b: f(a, b); c: __syncthreads();"),
], ids=["normal", "one", "both", "zero"])
def test_mutation_macro_picks_the_normal_tokens_unless_defined(tmp_path, defines, expected):
    source = tmp_path / "m.cpp"
    source.write_text(f'#include "{ROOT / "csrc" / "mutation.h"}"\n'
                      "a: TIDAR_MUTATION(one, x + y, x - y);\n"
                      "b: TIDAR_MUTATION(two, f(a, b), f(b, a));\n"
                      "c: TIDAR_MUTATION(two, __syncthreads(), );\n")
    out = subprocess.run([CXX, "-E", "-P", *defines, str(source)], check=True, capture_output=True, text=True).stdout
    assert " ".join(out.split()) == expected


def copy_tree(tmp_path: Path) -> Path:
    """The script and the sources it reads, in a scratch checkout."""
    for name in ("scripts", "csrc"):
        shutil.copytree(ROOT / name, tmp_path / name)
    return tmp_path


def run_mutations(tree: Path, *faults: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(tree / "scripts" / "emulator_mutations.sh"), *faults],
                          env={"PATH": "/usr/bin:/bin", "CHECK_CLEAN": "0"}, capture_output=True, text=True,
                          timeout=60)


def test_mutation_script_fails_when_a_named_point_is_missing(tmp_path):
    tree = copy_tree(tmp_path)
    kernel = tree / "csrc" / "decode_attention.cuh"
    text = kernel.read_text()
    assert text.count("TIDAR_MUTATION(wait_pending, 1, 2)") == 1
    kernel.write_text(text.replace("TIDAR_MUTATION(wait_pending, 1, 2)", "1"))
    result = run_mutations(tree, "wait_pending")
    assert result.returncode == 1 and "MISSING wait_pending" in result.stderr, result.stderr
    assert "caught" not in result.stdout  # refused before building anything


def test_mutation_script_fails_on_a_point_it_does_not_test(tmp_path):
    tree = copy_tree(tmp_path)
    with open(tree / "csrc" / "ptx.cuh", "a") as f:
        f.write("// TIDAR_MUTATION(untested_fault, a, b)\n")
    result = run_mutations(tree, "wait_pending")
    assert result.returncode == 1 and "MISSING untested_fault" in result.stderr, result.stderr


def test_mutation_script_rejects_unknown_fault_names(tmp_path):
    result = run_mutations(ROOT, "no_such_fault")
    assert result.returncode == 2 and "unknown fault 'no_such_fault'" in result.stderr, result.stderr
