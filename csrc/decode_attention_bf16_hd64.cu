// Decode-step attention, bf16, head_dim 64: one instantiation per file so builds parallelise.
#include "decode_attention.cuh"

namespace tidar {
TIDAR_INSTANTIATE_DECODE_ATTENTION(true, 64)
}  // namespace tidar
