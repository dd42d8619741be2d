// Host planner of the decode-attention grid (plain C++: no torch, no CUDA code).
#include "kernels.h"

namespace tidar {

int decode_num_splits(int batch, int steps, int q_heads, int kv_heads, int max_len, int num_sms) {
  // CTAs one cache split needs: row tiles x (batch, KV head) pairs.
  const int rows = steps * (q_heads / kv_heads);
  const int row_tiles = (rows + kDecodeBlockM - 1) / kDecodeBlockM;
  const long long ctas = static_cast<long long>(row_tiles) * batch * kv_heads;
  // Aim at two resident CTAs per SM, but give every split at least 4 key tiles of
  // the longest possible cache, and cap the fp32 partials' traffic (each split
  // writes and the merge reads a [batch, steps, q_heads, head_dim] fp32 tensor).
  constexpr int kMaxSplits = 32;
  const long long wanted = (2LL * num_sms + ctas - 1) / ctas;
  const long long by_length = (max_len + 4LL * kDecodeBlockN - 1) / (4LL * kDecodeBlockN);
  long long splits = wanted < by_length ? wanted : by_length;
  splits = splits < kMaxSplits ? splits : kMaxSplits;
  return splits < 1 ? 1 : static_cast<int>(splits);
}

}  // namespace tidar
