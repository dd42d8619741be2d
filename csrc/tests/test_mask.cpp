// Host test of csrc/tidar_mask.h: every case exported from tidar_kernels/mask.py
// (python_tests/mask_cases.py -> csrc/tests/mask_cases.txt) must be reproduced
// exactly, so the CUDA kernels' mask logic is checked without a GPU.
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "tidar_mask.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s mask_cases.txt\n", argv[0]);
    return 2;
  }
  std::ifstream in(argv[1]);
  if (!in) {
    std::fprintf(stderr, "cannot open %s\n", argv[1]);
    return 2;
  }
  int checked = 0, failed = 0;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string kind;
    int layout, clean_rows, block_size, context_len;
    fields >> kind >> layout >> clean_rows >> block_size >> context_len;
    const tidar::LayoutParams params{static_cast<tidar::Layout>(layout), clean_rows, block_size, context_len};
    bool ok = true;
    if (kind == "ranges") {
      int row, clean_end, block_start, block_end;
      fields >> row >> clean_end >> block_start >> block_end;
      const tidar::KeyRanges r = tidar::key_ranges(params, row);
      ok = r.clean_end == clean_end && r.block_start == block_start && r.block_end == block_end;
      // row_sees must agree with the ranges column by column.
      for (int col = 0; ok && col < block_end + 2; ++col) {
        const bool expected = col < clean_end || (col >= block_start && col < block_end);
        ok = tidar::row_sees(r, col) == expected;
      }
    } else if (kind == "tile") {
      int r0, r1, c0, c1, expected;
      fields >> r0 >> r1 >> c0 >> c1 >> expected;
      ok = static_cast<int>(tidar::classify_tile(params, r0, r1, c0, c1)) == expected;
    } else {
      std::fprintf(stderr, "bad line: %s\n", line.c_str());
      return 2;
    }
    ++checked;
    if (!ok) {
      ++failed;
      if (failed <= 20) std::fprintf(stderr, "MISMATCH: %s\n", line.c_str());
    }
  }
  if (checked == 0) {
    std::fprintf(stderr, "no cases read from %s\n", argv[1]);
    return 2;
  }
  std::printf("test_mask: %d cases, %d mismatches\n", checked, failed);
  return failed == 0 ? 0 : 1;
}
