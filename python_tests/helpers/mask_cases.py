"""Cases of the compact mask rule shared by the Python and C++ tests.

``python python_tests/helpers/mask_cases.py`` rewrites ``csrc/tests/mask_cases.txt``;
``test_mask.py`` checks the committed file is current, and the CTest binary
checks ``csrc/tidar_mask.h`` reproduces every line. Lines:

    ranges LAYOUT CLEAN_ROWS BLOCK_SIZE CONTEXT_LEN ROW CLEAN_END BLOCK_START BLOCK_END
    tile   LAYOUT CLEAN_ROWS BLOCK_SIZE CONTEXT_LEN ROW0 ROW1 COL0 COL1 KIND
"""
from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tidar_kernels.kernels.mask import Layout, classify_tile, key_ranges  # noqa: E402

CASES_FILE = ROOT / "csrc" / "tests" / "mask_cases.txt"


def layouts():
    """(layout, num_rows, clean_rows, block_size, context_len) covering every layout's corners."""
    for seq_len, block in [(1, 1), (3, 1), (3, 3), (6, 2), (6, 3), (8, 4), (9, 3), (12, 4)]:
        yield Layout.TRAINING, 2 * seq_len, seq_len, block, 0
    for k in (1, 2, 3, 5):
        yield Layout.DECODE, k + k * k, k, k, 0
    for padded, prompt, k in [(1, 1, 1), (5, 5, 3), (7, 4, 2), (9, 1, 4)]:
        yield Layout.PREFILL, padded + k, padded, k, prompt
    for rows in (1, 7):
        yield Layout.CAUSAL, rows, rows, 1, 0


def lines():
    for layout, num_rows, clean_rows, block, context in layouts():
        head = f"{int(layout)} {clean_rows} {block} {context}"
        for row in range(num_rows):
            clean_end, block_start, block_end = key_ranges(layout, row, clean_rows, block, context)
            yield f"ranges {head} {row} {clean_end} {block_start} {block_end}"
        for tile in (1, 2, 3, 4):
            for r0 in range(0, num_rows, tile):
                for c0 in range(0, num_rows, tile):
                    r1, c1 = min(r0 + tile, num_rows), min(c0 + tile, num_rows)
                    kind = classify_tile(layout, r0, r1, c0, c1, clean_rows, block, context)
                    yield f"tile {head} {r0} {r1} {c0} {c1} {int(kind)}"


def render() -> str:
    return "\n".join(lines()) + "\n"


if __name__ == "__main__":
    CASES_FILE.write_text(render())
    print(f"wrote {CASES_FILE}")
