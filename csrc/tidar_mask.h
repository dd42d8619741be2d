// TiDAR's compact attention rule for CUDA kernels and host code.
//
// A line-for-line mirror of tidar_kernels/kernels/mask.py (key_ranges, classify_tile,
// Layout, TileKind). That module is the one definition; this header exists so
// device code can use the same arithmetic, and CTest (csrc/tests/test_mask.cpp)
// checks it on the host against cases exported from Python. No torch, no CUDA
// runtime: it compiles with a plain C++17 compiler too.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TIDAR_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TIDAR_HOST_DEVICE inline
#endif

namespace tidar {

enum class Layout : int { kCausal = 0, kTraining = 1, kPrefill = 2, kDecode = 3 };

enum class TileKind : int { kEmpty = 0, kPartial = 1, kFull = 2 };

// Visible local key ranges of one query row: [0, clean_end) and
// [block_start, block_end). The committed cache lies in front of them and is
// visible to every row.
struct KeyRanges {
  int clean_end;
  int block_start;
  int block_end;
};

// Parameters of the local layout of one sequence.
//   clean_rows:  index where mask rows begin (training S, prefill padded prompt
//                length, decode k, causal = number of rows)
//   block_size:  B (training) or k (prefill, decode)
//   context_len: real prompt length (prefill only)
struct LayoutParams {
  Layout layout;
  int clean_rows;
  int block_size;
  int context_len;
};

TIDAR_HOST_DEVICE KeyRanges key_ranges(const LayoutParams& p, int row) {
  const bool is_mask_row = row >= p.clean_rows;
  const int mask_index = row - p.clean_rows > 0 ? row - p.clean_rows : 0;
  const int block = mask_index / p.block_size;
  int mask_clean_end;
  switch (p.layout) {
    case Layout::kTraining: mask_clean_end = block * p.block_size; break;  // clean tokens before the block
    case Layout::kDecode: mask_clean_end = block + 1; break;               // block j = block+1 sees d_0..d_{j-1}
    case Layout::kPrefill: mask_clean_end = p.context_len; break;          // the real prompt
    default: mask_clean_end = row + 1; break;                              // causal: no mask rows
  }
  const int block_start = p.clean_rows + block * p.block_size;
  KeyRanges r;
  r.clean_end = is_mask_row ? mask_clean_end : row + 1;
  r.block_start = is_mask_row ? block_start : 0;
  r.block_end = is_mask_row ? block_start + p.block_size : 0;
  return r;
}

TIDAR_HOST_DEVICE bool row_sees(const KeyRanges& r, int col) {
  return col < r.clean_end || (col >= r.block_start && col < r.block_end);
}

// Number of columns of [col_start, col_end) that a row with ranges r sees.
TIDAR_HOST_DEVICE int visible_count(const KeyRanges& r, int col_start, int col_end) {
  const int clean_hi = r.clean_end < col_end ? r.clean_end : col_end;
  const int clean = clean_hi - col_start > 0 ? clean_hi - col_start : 0;
  const int block_lo = r.block_start > col_start ? r.block_start : col_start;
  const int block_hi = r.block_end < col_end ? r.block_end : col_end;
  const int block = block_hi - block_lo > 0 ? block_hi - block_lo : 0;
  return clean + block;  // the two ranges never overlap: block_start >= clean_end
}

// Exact classification of local rows [row_start, row_end) x cols [col_start, col_end).
TIDAR_HOST_DEVICE TileKind classify_tile(const LayoutParams& p, int row_start, int row_end, int col_start,
                                         int col_end) {
  bool any_visible = false;
  bool all_visible = true;
  for (int row = row_start; row < row_end; ++row) {
    const int n = visible_count(key_ranges(p, row), col_start, col_end);
    any_visible = any_visible || n > 0;
    all_visible = all_visible && n == col_end - col_start;
  }
  if (!any_visible) return TileKind::kEmpty;
  return all_visible ? TileKind::kFull : TileKind::kPartial;
}

}  // namespace tidar
