"""The codegen report's dependence on Triton internals (CI runs the report itself).

``scripts/triton_codegen_report.py`` specialises each launch with Triton's own binder,
which only private names provide (``PRIVATE_APIS`` there). The first test fails, naming the
private API, when the installed Triton no longer has one or its call changed. It runs the
report's ``--check-private-apis`` in a subprocess: the binder needs Triton imported without
the interpreter, which this session may use. CPU only: nothing is compiled.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent


def test_private_triton_apis_of_the_report_exist():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "triton_codegen_report.py"), "--check-private-apis"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (f"scripts/triton_codegen_report.py needs private Triton APIs that this Triton "
                                  f"lacks or changed:\n{done.stderr[-3000:]}\n{done.stdout[-1000:]}")
    assert "private Triton APIs" in done.stdout and "present" in done.stdout


def test_planner_reads_the_triton_version():
    triton_ops = pytest.importorskip("tidar_kernels.kernels.backends.triton_ops")
    import triton
    assert triton_ops.TRITON_VERSION == triton_ops._triton_version(triton.__version__)
    assert triton_ops._triton_version("3.9.0+git1a2b3c") == (3, 9)
    bf16 = torch.bfloat16
    # 32-key tiles on sm_90 where Triton 3.8 spills at 128 x 64, the full tile from 3.9 on.
    assert triton_ops._fwd_dq_blocks(bf16, 90, (3, 8)) == (128, 32)
    assert triton_ops._fwd_dq_blocks(bf16, 90, (3, 9)) == (128, 64)
    assert triton_ops._fwd_dq_blocks(bf16, 80, (3, 8)) == (64, 64)
    # At most 32-row tiles of the cached kernel at hd 128 before sm_90 where Triton 3.6 spills at 64.
    assert triton_ops._cached_block_m_options(bf16, 272, 80, 128, (3, 6)) == (32,)
    assert triton_ops._cached_block_m_options(bf16, 20, 80, 128, (3, 6)) == (32,)
    assert triton_ops._cached_block_m_options(bf16, 272, 80, 128, (3, 8)) == (64, 128)
    assert triton_ops._cached_block_m_options(bf16, 272, 90, 128, (3, 6)) == (64, 128)
    assert triton_ops._cached_block_m_options(bf16, 272, 80, 64, (3, 6)) == (64, 128)
