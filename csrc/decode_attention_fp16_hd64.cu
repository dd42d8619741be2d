// Decode-step attention, fp16, head_dim 64: one instantiation per file so builds parallelise.
#include "decode_attention.cuh"

namespace tidar {
TIDAR_INSTANTIATE_DECODE_ATTENTION(false, 64)
}  // namespace tidar
