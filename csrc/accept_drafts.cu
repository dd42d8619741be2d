// Greedy accept-and-commit of a TiDAR decode step (docs/semantics.md#acceptance), on the device.
//
// Same math as tidar_kernels/kernels/backends/reference.py::accept_drafts:
//   mixed[b, r, :] = beta * draft_logits[b, r, :] + (1 - beta) * block_logits[b, r, :]   (fp32)
//   targets[b, r]  = argmax(mixed[b, r, :])   (ties -> lowest index, NaN wins, like torch.argmax)
//   accepted[b]    = 1 + number of leading j = 1..k-1 with drafts[b, j] == targets[b, j-1],
//                    0 for inactive sequences;  cache_seqlens[b] += accepted[b].
//
// Two launches, no host synchronisation, fixed grid from static sizes (CUDA-graph safe):
//   1. argmax_chunk_kernel: grid (num_chunks, batch * k); each CTA reduces one chunk
//      of one row's vocabulary to a (value, index) pair. Splitting rows into chunks
//      fills the GPU even at batch 1 (the pass is HBM-bound: 2 * batch * k * V elements).
//   2. accept_kernel: one CTA per sequence; its warps merge the chunk pairs of the
//      k rows into targets, then one thread walks the drafts and commits.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "kernels.h"
#include "ptx.cuh"

namespace tidar {
namespace accept {

constexpr int kThreads = 256;
constexpr int kMinChunk = 4096;  // below this a CTA is mostly launch overhead

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(float x) { return x; }

// Is (v, i) ahead of (best_v, best_i) in torch.argmax order? NaN beats any number,
// then larger values, then lower indices.
__device__ __forceinline__ bool ahead(float v, int i, float best_v, int best_i) {
  const bool v_nan = isnan(v), best_nan = isnan(best_v);
  if (v_nan || best_nan) return v_nan && (!best_nan || i < best_i);
  return v > best_v || (v == best_v && i < best_i);
}

// The mix exactly as PyTorch rounds it: two fp32 products, then an fp32 sum (no FMA).
__device__ __forceinline__ float mix(float a, float b, float beta, float one_minus_beta) {
  return __fadd_rn(__fmul_rn(beta, a), __fmul_rn(one_minus_beta, b));
}

// Warp then block reduction of (value, index); the result is valid in thread 0.
__device__ __forceinline__ void block_argmax(float& v, int& i) {
  __shared__ float warp_v[kThreads / 32];
  __shared__ int warp_i[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, offset);
    const int oi = __shfl_xor_sync(0xffffffffu, i, offset);
    if (ahead(ov, oi, v, i)) v = ov, i = oi;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_v[warp] = v, warp_i[warp] = i;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_v[lane] : -__builtin_huge_valf();
    i = lane < kThreads / 32 ? warp_i[lane] : INT_MAX;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      const float ov = __shfl_xor_sync(0xffffffffu, v, offset);
      const int oi = __shfl_xor_sync(0xffffffffu, i, offset);
      if (ahead(ov, oi, v, i)) v = ov, i = oi;
    }
  }
}

// kVec: rows and chunks are 16-byte aligned, so each thread streams 16-byte vectors
// (kUnroll in flight per tensor) through its strided share of the chunk.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) argmax_chunk_kernel(const AcceptParams p) {
  constexpr int kPerVec = kVec ? 16 / sizeof(T) : 1;
  constexpr int kUnroll = 4;
  const int row = blockIdx.y;  // b * k + r
  const int b = row / p.draft_len, r = row % p.draft_len;
  const T* a = static_cast<const T*>(p.draft_logits) + b * p.draft_stride[0] + r * p.draft_stride[1];
  const T* bl = static_cast<const T*>(p.block_logits) + b * p.block_stride[0] + r * p.block_stride[1];
  const int lo = blockIdx.x * p.chunk;
  const int hi = min(lo + p.chunk, p.vocab);

  float best_v = -__builtin_huge_valf();
  int best_i = INT_MAX;
  // Main part: whole vectors, kUnroll loads per tensor issued before any use.
  const int vec_hi = lo + (hi - lo) / (kPerVec * kThreads * kUnroll) * (kPerVec * kThreads * kUnroll);
  for (int base = lo + threadIdx.x * kPerVec; base < vec_hi; base += kPerVec * kThreads * kUnroll) {
    alignas(16) T va[kUnroll][kPerVec];
    alignas(16) T vb[kUnroll][kPerVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int at = base + u * kPerVec * kThreads;
      if constexpr (kVec) {
        *reinterpret_cast<uint4*>(va[u]) = *reinterpret_cast<const uint4*>(a + at);
        *reinterpret_cast<uint4*>(vb[u]) = *reinterpret_cast<const uint4*>(bl + at);
      } else {
        va[u][0] = a[at];
        vb[u][0] = bl[at];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int e = 0; e < kPerVec; ++e) {
        const int at = base + u * kPerVec * kThreads + e;
        const float v = mix(to_float(va[u][e]), to_float(vb[u][e]), p.beta, p.one_minus_beta);
        if (ahead(v, at, best_v, best_i)) best_v = v, best_i = at;
      }
    }
  }
  // Rest: single vectors, then single elements.
  const int elem_lo = lo + (hi - lo) / kPerVec * kPerVec;
  for (int at = vec_hi + threadIdx.x * kPerVec; at < elem_lo; at += kPerVec * kThreads) {
    alignas(16) T va[kPerVec];
    alignas(16) T vb[kPerVec];
    if constexpr (kVec) {
      *reinterpret_cast<uint4*>(va) = *reinterpret_cast<const uint4*>(a + at);
      *reinterpret_cast<uint4*>(vb) = *reinterpret_cast<const uint4*>(bl + at);
    } else {
      va[0] = a[at];
      vb[0] = bl[at];
    }
#pragma unroll
    for (int e = 0; e < kPerVec; ++e) {
      const float v = mix(to_float(va[e]), to_float(vb[e]), p.beta, p.one_minus_beta);
      if (ahead(v, at + e, best_v, best_i)) best_v = v, best_i = at + e;
    }
  }
  for (int at = elem_lo + threadIdx.x; at < hi; at += kThreads) {
    const float v = mix(to_float(a[at]), to_float(bl[at]), p.beta, p.one_minus_beta);
    if (ahead(v, at, best_v, best_i)) best_v = v, best_i = at;
  }
  block_argmax(best_v, best_i);
  if (threadIdx.x == 0) {
    p.partial_value[static_cast<int64_t>(row) * p.num_chunks + blockIdx.x] = best_v;
    p.partial_index[static_cast<int64_t>(row) * p.num_chunks + blockIdx.x] = best_i;
  }
}

__global__ void __launch_bounds__(kThreads) accept_kernel(const AcceptParams p) {
  TIDAR_DYNAMIC_SHARED(int64_t, row_target, 8);  // [k]
  const int b = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < p.draft_len; r += kThreads / 32) {
    const int64_t row = static_cast<int64_t>(b) * p.draft_len + r;
    float v = -__builtin_huge_valf();
    int i = INT_MAX;
    for (int c = lane; c < p.num_chunks; c += 32) {
      const float cv = p.partial_value[row * p.num_chunks + c];
      const int ci = p.partial_index[row * p.num_chunks + c];
      if (ahead(cv, ci, v, i)) v = cv, i = ci;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      const float ov = __shfl_xor_sync(0xffffffffu, v, offset);
      const int oi = __shfl_xor_sync(0xffffffffu, i, offset);
      if (ahead(ov, oi, v, i)) v = ov, i = oi;
    }
    if (lane == 0) {
      row_target[r] = i;
      p.targets[row] = i;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    // d_0 is always accepted; d_j while it equals v_j = targets[j - 1].
    const int64_t* d = p.drafts + static_cast<int64_t>(b) * p.draft_len;
    int accepted = 1;
    while (accepted < p.draft_len && d[accepted] == row_target[accepted - 1]) ++accepted;
    if (p.active != nullptr && !p.active[b]) accepted = 0;
    p.accepted[b] = accepted;
    p.cache_seqlens[b] += accepted;
  }
}

template <typename T>
void launch(const AcceptParams& p, cudaStream_t stream) {
  const dim3 grid(p.num_chunks, p.batch * p.draft_len);
  // Vectors need 16-byte aligned rows and chunk starts (the planner makes chunks a
  // multiple of 16 bytes when it can).
  auto aligned = [](const void* ptr, int64_t stride) {
    return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (stride * sizeof(T)) % 16 == 0;
  };
  const bool vec = aligned(p.draft_logits, p.draft_stride[0]) && aligned(p.draft_logits, p.draft_stride[1]) &&
                   aligned(p.block_logits, p.block_stride[0]) && aligned(p.block_logits, p.block_stride[1]) &&
                   (p.chunk * sizeof(T)) % 16 == 0;
  if (vec)
    launch_kernel(argmax_chunk_kernel<T, true>, grid, dim3(kThreads), 0, stream, p);
  else
    launch_kernel(argmax_chunk_kernel<T, false>, grid, dim3(kThreads), 0, stream, p);
  launch_kernel(accept_kernel, dim3(p.batch), dim3(kThreads), p.draft_len * sizeof(int64_t), stream, p);
}

}  // namespace accept

void accept_drafts_plan(AcceptParams& p, int num_sms) {
  // About two CTAs per SM in total, chunks of at least kMinChunk elements, and
  // chunk lengths a multiple of 8 elements so 16-byte vectors stay aligned.
  const int rows = p.batch * p.draft_len;
  const int by_occupancy = (2 * num_sms + rows - 1) / rows;
  const int by_size = (p.vocab + accept::kMinChunk - 1) / accept::kMinChunk;
  int chunks = by_occupancy < by_size ? by_occupancy : by_size;
  chunks = chunks < 1 ? 1 : chunks;
  int chunk = (p.vocab + chunks - 1) / chunks;
  chunk = (chunk + 7) / 8 * 8;
  p.chunk = chunk;
  p.num_chunks = (p.vocab + chunk - 1) / chunk;
}

void run_accept_drafts(const AcceptParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case LogitsType::kFloat16: accept::launch<__half>(p, stream); break;
    case LogitsType::kBFloat16: accept::launch<__nv_bfloat16>(p, stream); break;
    case LogitsType::kFloat32: accept::launch<float>(p, stream); break;
  }
}

#define TIDAR_STR2(...) #__VA_ARGS__
#define TIDAR_STR(...) TIDAR_STR2(__VA_ARGS__)
const char* compiled_archs() {
#ifdef __CUDA_ARCH_LIST__
  return TIDAR_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

}  // namespace tidar
