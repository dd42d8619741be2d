// Host planner of the decode-attention grid (plain C++: no torch, no CUDA code).
#include "decode_attention_plan.h"

namespace tidar {

int decode_num_splits(int batch, int steps, int draft_len, int q_heads, int kv_heads, int head_dim, int max_len,
                      const roofline::Device& device) {
  // Every split gets at least 4 key tiles of the longest possible cache; at most 32 splits.
  constexpr int kMaxSplits = 32;
  constexpr int kMinKeysPerSplit = 4 * kDecodeBlockN;
  const roofline::CachedStep step{batch, steps, q_heads, kv_heads, head_dim, max_len, draft_len, kDecodeElemBytes};
  const roofline::CachedKernel kernel{kDecodeBlockM, kDecodeThreads / 32, decode_smem_bytes(head_dim), true,
                                      kDecodeElemBytes};
  return roofline::plan_splits(step, kernel, device, kMaxSplits, kMinKeysPerSplit, roofline::kPartialSlack);
}

}  // namespace tidar
