// Host test of csrc/tidar_mask.h: every case exported from tidar_kernels/kernels/mask.py
// (python_tests/helpers/mask_cases.py -> csrc/tests/mask_cases.txt) must be reproduced
// exactly, so the CUDA kernels' mask logic is checked without a GPU.
#include <sstream>
#include <string>

#include "case_file.h"
#include "tidar_mask.h"

int main(int argc, char** argv) {
  using tidar_tests::CaseResult;
  return tidar_tests::run_case_file(argc, argv, "test_mask", [](std::istringstream& fields) {
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
      return CaseResult::kMalformed;
    }
    if (fields.fail()) return CaseResult::kMalformed;
    return ok ? CaseResult::kMatch : CaseResult::kMismatch;
  });
}
