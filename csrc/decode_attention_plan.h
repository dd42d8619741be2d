// Host planner of the decode-attention grid and the tiling it plans for (plain C++:
// no torch, no CUDA; included by kernels.h and by the planner's host test).
#pragma once

#include "roofline.h"

namespace tidar {

// Tiling shared by the kernels and the host planner.
constexpr int kDecodeBlockM = 64;   // query rows per CTA (4 warps x 16 rows)
constexpr int kDecodeBlockN = 64;   // keys per pipeline stage
constexpr int kDecodeThreads = 128;
// Bytes per element of the inputs and of the split partial outputs (fp16/bf16); LSEs are fp32.
constexpr int kDecodeElemBytes = 2;

// Dynamic shared memory of the decode kernel (decode::Smem<kHeadDim>::kBytes): Q plus two
// stages of K and V tiles, rows padded by 8 elements, 16-bit elements.
constexpr int decode_smem_bytes(int head_dim) { return (kDecodeBlockM + 4 * kDecodeBlockN) * (head_dim + 8) * 2; }

// Cache splits of a decode step from static sizes only (CUDA-graph safe): the count of
// least modelled time under the roofline model (roofline.h), with the CTAs per SM the
// kernel's shared memory allows on `device` (sm_80 hd128: one; sm_90: two), except that a
// compute-bound step takes the fastest count whose partials stay within the step's ideal
// bytes when that is within roofline::kPartialSlack of the least (the Triton planner's rule).
int decode_num_splits(int batch, int steps, int draft_len, int q_heads, int kv_heads, int head_dim, int max_len,
                      const roofline::Device& device);

}  // namespace tidar
