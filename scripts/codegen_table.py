"""Markdown table of registers and spills per Triton version from codegen report JSON lines.

    python scripts/codegen_table.py build/triton_codegen_report*.jsonl

One line per headline kernel (Qwen3-8B 32/8 heads, batch 1: decode k = 4, 8, 16, the AR
step; training S = 2048 forward and backward), one column per Triton version and arch:
``registers / spill bytes`` and the tile (``BLOCK_M x BLOCK_N``, warps, stages). The last
line is the largest spill of any row of each report (every shape, the opt-in rows left out).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HEADLINE = [("decode-qwen3-8b-k4-n4096-b1", "cached_attention"), ("decode-qwen3-8b-k8-n4096-b1", "cached_attention"),
            ("decode-qwen3-8b-k16-n4096-b1", "cached_attention"), ("ar-qwen3-8b-n4096-b1", "cached_attention"),
            ("train-s2048-b16", "attention_fwd"), ("train-s2048-b16", "attention_bwd_dq"),
            ("train-s2048-b16", "attention_bwd_dkdv")]
ARCHS = ("sm_90a", "sm_80")


def _version_key(version: str):
    return tuple(int(part) if part.isdigit() else 0 for part in version.split("+")[0].split("."))


def main(paths: list[str]) -> None:
    rows = [json.loads(line) for path in paths for line in Path(path).read_text().splitlines() if line]
    rows = [row for row in rows if not row["experimental"]]
    versions = sorted({row["triton"] for row in rows}, key=_version_key)
    by_key = {(row["triton"], row["arch"], row["shape"], row["kernel"]): row for row in rows}
    columns = [(version, arch) for version in versions for arch in ARCHS]
    print("| shape | kernel | " + " | ".join(f"Triton {v} {a}" for v, a in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for shape, kernel in HEADLINE:
        cells = []
        for version, arch in columns:
            row = by_key.get((version, arch, shape, kernel))
            cells.append("" if row is None else f"{row['regs']} / {row['spills']} ({row['block_m']}x{row['block_n']}, "
                                                f"{row['warps']}w {row['stages']}s)")
        print(f"| {shape} | {kernel.removesuffix('_attention') if kernel == 'cached_attention' else kernel} | "
              + " | ".join(cells) + " |")
    worst = []
    for version, arch in columns:
        spills = [row["spills"] for row in rows if row["triton"] == version and row["arch"] == arch]
        worst.append(f"{max(spills)} B of {len(spills)} rows" if spills else "")
    print("| every shape | largest spill | " + " | ".join(worst) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
