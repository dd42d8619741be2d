// Fused TiDAR decode-step attention (Layout::kDecode), flash-decoding style.
//
// One step of sequence b feeds T = k + k*k query tokens
// [d_0..d_{k-1} | block 1 | ... | block k] (docs/semantics.md#decode-step). Every row sees
// the whole committed cache [0, n_b) plus at most two ranges of the step's own
// keys, given by tidar::key_ranges (csrc/tidar_mask.h, the mirror of mask.py).
//
// Work split
//   * GQA packing: the G = q_heads / kv_heads query heads that share a KV head
//     are packed into the rows of one tile, row r = t * G + g (token t, head
//     kv_head * G + g). A KV head's R = T * G rows are cut into tiles of
//     kDecodeBlockM = 64 rows; every cached K/V byte is read from HBM once per KV
//     head (the row tiles of a KV head run side by side and share it through L2).
//   * Splits: blockIdx.y < num_splits takes one contiguous chunk of the cache
//     [0, n_b), cut on the device from the n_b it reads (the grid is fixed from
//     static maxima, so the launch is CUDA-graph safe); blockIdx.y == num_splits
//     takes the step-local keys (k_new / v_new) with the TiDAR mask and also
//     writes the drafts' K/V into the cache at [n_b, n_b + k). Cache splits only
//     read [0, n_b), so nothing races with that write.
//   * Each CTA writes a normalised partial output in the element type (fp16/bf16,
//     two values per 32-bit store) and its fp32 log2-sum-exp2; combine_kernel
//     merges the num_splits + 1 partials of every row (LSE merge, fp32 sums).
//     Normalised, a partial is a convex combination of V rows: its rounding errs by
//     u |P_s||V| / l_s, one more u |P||V| after the merge (the tolerance rule's
//     "split partials stored in the kernel dtype", tidar_kernels/kernels/tolerance.py), and it
//     cannot overflow; half the bytes of fp32 partials (the planner counts them so).
//   * Paged caches (DecodeParams::block_table, kPaged): the cache splits read row t of
//     sequence b from its page (load_paged_tiles) and the draft commit writes through the
//     table; everything else is the contiguous kernel, which kPaged = false leaves unchanged.
//
// Inside a CTA (4 warps, each owns 16 rows): K/V tiles of 64 keys are streamed
// through a two-stage cp.async pipeline in shared memory; S = Q K^T and O += P V
// use mma.sync.m16n8k16 (fp16/bf16 in, fp32 accumulate) with fragments loaded by
// ldmatrix; softmax is online in fp32 in the exp2 domain. P is re-used straight
// from the S accumulators as the A operand of the P V product (the m16n8 C
// fragment of two adjacent key tiles is the m16k16 A fragment).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels.h"
#include "mutation.h"
#include "ptx.cuh"
#include "tidar_mask.h"

namespace tidar {
namespace decode {

constexpr int kBlockM = kDecodeBlockM;
constexpr int kBlockN = kDecodeBlockN;
constexpr int kThreads = kDecodeThreads;
constexpr int kWarps = kThreads / 32;
static_assert(kBlockM == kWarps * 16, "each warp owns 16 rows");
constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------

template <bool kIsBF16>
struct Element {
  using type = std::conditional_t<kIsBF16, __nv_bfloat16, __half>;
  // Two fp32 values rounded to one 32-bit register (lo in the low half), as mma.sync takes them.
  __device__ static uint32_t pack(float lo, float hi) {
    std::conditional_t<kIsBF16, __nv_bfloat162, __half2> pair;
    if constexpr (kIsBF16) pair = __floats2bfloat162_rn(lo, hi);
    else pair = __floats2half2_rn(lo, hi);
    uint32_t bits;
    memcpy(&bits, &pair, sizeof(bits));
    return bits;
  }
  // The inverse of pack (exact: every fp16/bf16 value is an fp32 value).
  __device__ static float2 unpack(uint32_t bits) {
    std::conditional_t<kIsBF16, __nv_bfloat162, __half2> pair;
    memcpy(&pair, &bits, sizeof(bits));
    if constexpr (kIsBF16) return __bfloat1622float2(pair);
    else return __half22float2(pair);
  }
};

// ---------------------------------------------------------------------------
// PTX (sm_80+: cp.async, ldmatrix, mma.sync, ex2.approx) from csrc/ptx.cuh, which
// also runs them on the CPU (csrc/emulation/) under a host compiler.
// ---------------------------------------------------------------------------

using ptx::cp_async_16;
using ptx::cp_async_commit;
using ptx::cp_async_wait;
using ptx::ex2_approx;
using ptx::ldmatrix_x4;
using ptx::ldmatrix_x4_trans;
using ptx::mma_16816;
using ptx::smem_addr;

// ---------------------------------------------------------------------------
// Shared-memory tiles: rows of kHeadDim elements padded by 16 bytes so the 8
// row addresses of an ldmatrix fall in 8 different 16-byte bank groups.
// ---------------------------------------------------------------------------

template <int kHeadDim>
struct Smem {
  static constexpr int kPitch = kHeadDim + 8;                     // elements per smem row
  static constexpr int kTileElems = kBlockN * kPitch;             // one K or V stage
  static constexpr int kQElems = kBlockM * kPitch;
  static constexpr int kBytes = (kQElems + 4 * kTileElems) * 2;   // Q + 2 stages of K and V
  static constexpr int kChunksPerRow = kHeadDim / 8;              // 16-byte chunks
  static_assert(kBytes == decode_smem_bytes(kHeadDim), "the host planner's shared-memory figure");
};

// Copy a tile of kBlockN rows (row i at base + (first + i) * row_stride) into
// shared memory; rows at or past `end` are zero-filled (V rows must be finite:
// their probability is 0 but 0 * NaN is not).
template <int kHeadDim, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* base, int64_t row_stride, int first, int end) {
  using S = Smem<kHeadDim>;
  constexpr int kChunks = kBlockN * S::kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "whole chunks per thread");
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int chunk = threadIdx.x + i * kThreads;
    const int row = chunk / S::kChunksPerRow;
    const int col = (chunk % S::kChunksPerRow) * 8;
    const bool valid = TIDAR_MUTATION(key_bound_past_end, first + row < end, first + row <= end);
    const T* src = valid ? base + (first + row) * row_stride + col : base;
    cp_async_16(smem_addr(smem + row * S::kPitch + col), src, valid ? 16 : 0);
  }
}

// Paged caches: the page holding row t of a sequence whose block-table row is `pages` (its slot is
// t % page_size); the one statement of the table convention, for the loads and the draft commit.
__device__ __forceinline__ int page_of(const int32_t* pages, const DecodeParams& p, int t) {
  return pages[static_cast<int64_t>(t / p.page_size) * p.block_table_stride[1]];
}

// Paged caches: the K and V rows [first, first + kBlockN) of one sequence (its block-table row
// `pages`) into shared memory, rows at or past `end` zero-filled like load_tile. Row t lives
// in slot t % page_size of page pages[t / page_size]; k_pool / v_pool point at the KV head
// inside page 0.
//
// Cost of the table: a thread copies one 16-byte chunk of each of its rows per tile (8 rows at
// head dim 128, 4 at 64), so it looks the row's page up once per row and uses it for both the
// K and the V copy. The 16 (or 8) lanes that copy the same row read the same table entry, so
// a warp-wide read touches 2 (or 4) entries, which should stay in L1 (not measured yet). When page_size
// is a multiple of kBlockN the tile lies inside one page (cache tiles start at multiples of
// kBlockN), so the page is read and the slot divided once per tile, and the copies are
// addressed like the contiguous ones. Smaller pages pay one division and one table read per
// row; a fast divider or a per-tile row map in shared memory would cut that if the paged
// benchmark (bench/attention.py) shows it matters.
template <int kHeadDim, typename T>
__device__ __forceinline__ void load_paged_tiles(T* k_smem, T* v_smem, const T* k_pool, const T* v_pool,
                                                 const int32_t* pages, const DecodeParams& p, int first, int end) {
  using S = Smem<kHeadDim>;
  constexpr int kChunks = kBlockN * S::kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "whole chunks per thread");
  const bool one_page = p.page_size % kBlockN == 0;  // uniform
  int tile_page = 0, tile_slot = 0;
  if (one_page) {
    tile_page = page_of(pages, p, first);
    tile_slot = first % p.page_size;
  }
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int chunk = threadIdx.x + i * kThreads;
    const int row = chunk / S::kChunksPerRow;
    const int col = (chunk % S::kChunksPerRow) * 8;
    const int t = first + row;
    const bool valid = t < end;
    const T* k_src = k_pool;
    const T* v_src = v_pool;
    if (valid) {
      int page, slot;
      if (one_page) {
        page = tile_page;
        slot = tile_slot + row;
      } else {
        page = page_of(pages, p, TIDAR_MUTATION(paged_wrong_page, t, first));
        slot = t % p.page_size;
      }
      k_src += page * p.kcache_stride[0] + slot * p.kcache_stride[1] + col;
      v_src += page * p.vcache_stride[0] + slot * p.vcache_stride[1] + col;
    }
    cp_async_16(smem_addr(k_smem + row * S::kPitch + col), k_src, valid ? 16 : 0);
    cp_async_16(smem_addr(v_smem + row * S::kPitch + col), v_src, valid ? 16 : 0);
  }
}

// ---------------------------------------------------------------------------
// The attention kernel
// ---------------------------------------------------------------------------

template <bool kIsBF16, int kHeadDim, bool kPaged>
__global__ void __launch_bounds__(kThreads) decode_attention_kernel(const DecodeParams p) {
  using T = typename Element<kIsBF16>::type;
  using S = Smem<kHeadDim>;
  constexpr int kDTiles = kHeadDim / 8;    // n8 tiles of the output
  constexpr int kDChunks = kHeadDim / 16;  // k16 chunks of Q K^T
  constexpr int kNTiles = kBlockN / 8;     // n8 tiles of the scores
  constexpr float kNegInf = -__builtin_huge_valf();

  TIDAR_DYNAMIC_SHARED(unsigned char, smem_raw, 16);
  T* q_smem = reinterpret_cast<T*>(smem_raw);
  T* k_smem = q_smem + S::kQElems;             // [2 stages][kBlockN][kPitch]
  T* v_smem = k_smem + 2 * S::kTileElems;

  const int group = p.q_heads / p.kv_heads;
  const int rows = p.steps * group;            // R: packed rows of this KV head
  const int row0 = blockIdx.x * kBlockM;
  const int split = blockIdx.y;
  const bool local = split == p.num_splits;    // the step-local split
  const int b = blockIdx.z / p.kv_heads;
  const int kv_head = blockIdx.z % p.kv_heads;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int quad_row = lane / 4;               // row inside the m16 fragment (and +8)
  const int quad_col = (lane % 4) * 2;         // column pair inside an n8 fragment

  int n = p.cache_seqlens[b];
  n = n < 0 ? 0 : (n > p.max_len ? p.max_len : n);
  // Paged: this sequence's block-table row (unused by the contiguous kernel).
  const int32_t* pages = kPaged ? p.block_table + b * p.block_table_stride[0] : nullptr;
  // This (sequence, KV head) in the caches; paged: the KV head inside page 0 of the pool.
  T* const k_cache_head =
      static_cast<T*>(p.k_cache) + (kPaged ? 0 : b * p.kcache_stride[0]) + kv_head * p.kcache_stride[2];
  T* const v_cache_head =
      static_cast<T*>(p.v_cache) + (kPaged ? 0 : b * p.vcache_stride[0]) + kv_head * p.vcache_stride[2];

  // Keys of this split: the local split walks the step's own keys [0, T) in
  // tiles of kBlockN, skipping tiles no row of this CTA sees; a cache split
  // walks its chunk of [0, n).
  const LayoutParams layout{Layout::kDecode, p.draft_len, p.draft_len, 0};
  const int tok_lo = row0 / group;
  const int tok_hi = min((min(row0 + kBlockM, rows) - 1) / group + 1, p.steps);
  int key_lo, key_hi;
  if (local) {
    key_lo = 0;
    key_hi = p.steps;
  } else {
    const int per_split = (n + p.num_splits - 1) / p.num_splits;
    const int chunk = (per_split + kBlockN - 1) / kBlockN * kBlockN;
    key_lo = min(split * chunk, n);
    key_hi = min(key_lo + chunk, n);
  }
  // Tiles the local split skips: exact classification from the shared mask rule, done once per
  // CTA up front (one thread per key tile, in parallel) so the key loop reads a byte instead of
  // re-running classify_tile (a loop over the CTA's tokens with a division each) in every thread.
  __shared__ uint8_t local_tile_kind[kDecodeMaxLocalTiles];
  if (local) {  // uniform per CTA
    for (int t = threadIdx.x; t * kBlockN < key_hi; t += kThreads) {
      const int first = t * kBlockN;
      TileKind kind = classify_tile(layout, tok_lo, tok_hi, first, min(first + kBlockN, key_hi));
      if (kind == TileKind::kFull && first + kBlockN > key_hi) kind = TileKind::kPartial;
      local_tile_kind[t] = static_cast<uint8_t>(kind);
    }
    __syncthreads();
  }
  auto tile_kind = [&](int first) -> TileKind {
    if (!local) return first + kBlockN <= key_hi ? TileKind::kFull : TileKind::kPartial;
    return static_cast<TileKind>(local_tile_kind[first / kBlockN]);  // the local keys start at 0
  };
  auto next_tile = [&](int first) {  // first tile start >= `first` with work, or key_hi
    while (first < key_hi && tile_kind(first) == TileKind::kEmpty) first += kBlockN;
    return first;
  };

  const int64_t part_rows = static_cast<int64_t>(p.batch) * p.steps * p.q_heads;  // rows per split
  auto part_row = [&](int r) {  // index of packed row r in the partial buffers
    const int t = r / group;
    const int head = kv_head * group + r % group;
    return static_cast<int64_t>(split) * part_rows + (static_cast<int64_t>(b) * p.steps + t) * p.q_heads + head;
  };

  int tile = next_tile(key_lo);
  if (tile >= key_hi) {
    // Nothing to attend to in this split (n = 0, or a chunk past n): weight 0 in the merge.
    for (int r = row0 + threadIdx.x; r < min(row0 + kBlockM, rows); r += kThreads)
      p.lse_partial[part_row(r)] = kNegInf;
    return;
  }

  // ---- the local split of the first row tile commits the drafts' K/V to [n, n + k) ----
  if (local && blockIdx.x == 0) {
    const T* kn = static_cast<const T*>(p.k_new) + b * p.knew_stride[0] + kv_head * p.knew_stride[2];
    const T* vn = static_cast<const T*>(p.v_new) + b * p.vnew_stride[0] + kv_head * p.vnew_stride[2];
    const int writable = min(p.draft_len, p.max_len - n);  // never past max_len
    for (int c = threadIdx.x; c < writable * S::kChunksPerRow; c += kThreads) {
      const int i = c / S::kChunksPerRow;
      const int col = (c % S::kChunksPerRow) * 8;
      int64_t k_row, v_row;  // element offsets of cache row n + i
      if constexpr (kPaged) {
        const int t = n + i;
        const int page = page_of(pages, p, t);
        const int slot = t % p.page_size;
        k_row = page * p.kcache_stride[0] + slot * p.kcache_stride[1];
        v_row = page * p.vcache_stride[0] + slot * p.vcache_stride[1];
      } else {
        k_row = (n + i) * p.kcache_stride[1];
        v_row = (n + i) * p.vcache_stride[1];
      }
      *reinterpret_cast<uint4*>(k_cache_head + k_row + col) =
          *reinterpret_cast<const uint4*>(kn + i * p.knew_stride[1] + col);
      *reinterpret_cast<uint4*>(v_cache_head + v_row + col) =
          *reinterpret_cast<const uint4*>(vn + i * p.vnew_stride[1] + col);
    }
  }

  // ---- Q tile: packed row r -> token r / G, head kv_head * G + r % G; rows past R zero ----
  {
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0];
    constexpr int kChunks = kBlockM * S::kChunksPerRow;
#pragma unroll
    for (int i = 0; i < kChunks / kThreads; ++i) {
      const int chunk = threadIdx.x + i * kThreads;
      const int row = chunk / S::kChunksPerRow;
      const int col = (chunk % S::kChunksPerRow) * 8;
      const int r = row0 + row;
      const bool valid = r < rows;
      const T* src = valid ? q + (r / group) * p.q_stride[1] + (kv_head * group + r % group) * p.q_stride[2] + col : q;
      cp_async_16(smem_addr(q_smem + row * S::kPitch + col), src, valid ? 16 : 0);
    }
  }
  cp_async_commit();

  // K/V source of this split
  const T* k_src;
  const T* v_src;
  int64_t k_row_stride, v_row_stride;
  if (local) {
    k_src = static_cast<const T*>(p.k_new) + b * p.knew_stride[0] + kv_head * p.knew_stride[2];
    v_src = static_cast<const T*>(p.v_new) + b * p.vnew_stride[0] + kv_head * p.vnew_stride[2];
    k_row_stride = p.knew_stride[1];
    v_row_stride = p.vnew_stride[1];
  } else {
    k_src = k_cache_head;
    v_src = v_cache_head;
    k_row_stride = p.kcache_stride[1];
    v_row_stride = p.vcache_stride[1];
  }

  if (kPaged && !local) {
    load_paged_tiles<kHeadDim>(k_smem, v_smem, k_src, v_src, pages, p, tile, key_hi);
  } else {
    load_tile<kHeadDim>(k_smem, k_src, k_row_stride, tile, key_hi);
    load_tile<kHeadDim>(v_smem, v_src, v_row_stride, tile, key_hi);
  }
  cp_async_commit();

  // Q fragments stay in registers for the whole key loop.
  cp_async_wait<1>();  // the Q group is complete
  __syncthreads();
  uint32_t q_frag[kDChunks][4];
#pragma unroll
  for (int kc = 0; kc < kDChunks; ++kc)
    ldmatrix_x4(q_frag[kc], smem_addr(q_smem + (warp * 16 + lane % 16) * S::kPitch + kc * 16 + (lane / 16) * 8));

  // This thread's two rows (quad_row and quad_row + 8 of the warp's 16) and,
  // for the local split, their visible key ranges.
  KeyRanges ranges[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = row0 + warp * 16 + quad_row + 8 * h;
    ranges[h] = key_ranges(layout, min(r, rows - 1) / group);
  }

  float o_acc[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) o_acc[i][0] = o_acc[i][1] = o_acc[i][2] = o_acc[i][3] = 0.f;
  float row_max[2] = {kNegInf, kNegInf};  // running max of scaled scores (log2 domain)
  float row_sum[2] = {0.f, 0.f};          // this thread's share of the running sum
  const float scale_log2 = p.scale * kLog2e;

  for (int stage = 0; tile < key_hi; stage ^= 1) {
    // Prefetch the next tile with work into the other stage while this one is used.
    const int next = next_tile(tile + kBlockN);
    if (next < key_hi && kPaged && !local) {
      load_paged_tiles<kHeadDim>(k_smem + (stage ^ 1) * S::kTileElems, v_smem + (stage ^ 1) * S::kTileElems, k_src,
                                 v_src, pages, p, next, key_hi);
    } else if (next < key_hi) {
      load_tile<kHeadDim>(k_smem + (stage ^ 1) * S::kTileElems, k_src, k_row_stride, next, key_hi);
      load_tile<kHeadDim>(v_smem + (stage ^ 1) * S::kTileElems, v_src, v_row_stride, next, key_hi);
    }
    cp_async_commit();  // possibly empty: keeps the group count uniform
    cp_async_wait<TIDAR_MUTATION(wait_pending, 1, 2)>();  // this stage has landed
    __syncthreads();

    const T* ks = k_smem + stage * S::kTileElems;
    const T* vs = v_smem + stage * S::kTileElems;

    // ---- S = Q K^T for the warp's 16 rows x kBlockN keys ----
    float s[kNTiles][4];
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kc = 0; kc < kDChunks; ++kc) {
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        // matrices: keys [np*16, +8) x d [kc*16, +8), same keys x d +8, keys +8 x d, keys +8 x d +8
        uint32_t kb[4];
        const int key = np * 16 + (lane / 16) * 8 + lane % 8;
        const int d = kc * 16 + ((lane / 8) % 2) * 8;
        ldmatrix_x4(kb, smem_addr(ks + key * S::kPitch + d));
        mma_16816<kIsBF16>(s[2 * np], q_frag[kc], kb[0], kb[1]);
        mma_16816<kIsBF16>(s[2 * np + 1], q_frag[kc], kb[2], kb[3]);
      }
    }

    // ---- mask, then online softmax (exp2 domain) ----
    const TileKind kind = tile_kind(tile);
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = tile + j * 8 + quad_col + (e & 1);
        bool visible = true;
        if (kind != TileKind::kFull) visible = col < key_hi && (!local || row_sees(ranges[e >> 1], col));
        s[j][e] = visible ? s[j][e] * scale_log2 : kNegInf;
      }
    }
    float scale_old[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = row_max[h];
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * h], s[j][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the 4 threads of a quad share a row
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // A row that has seen no key yet keeps max -inf: subtract 0 instead (no inf - inf).
      const float base = mx == kNegInf ? 0.f : mx;
      scale_old[h] = ex2_approx(row_max[h] - base);
      row_max[h] = mx;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) {
        s[j][2 * h] = ex2_approx(s[j][2 * h] - base);
        s[j][2 * h + 1] = ex2_approx(s[j][2 * h + 1] - base);
        sum += s[j][2 * h] + s[j][2 * h + 1];
      }
      row_sum[h] = row_sum[h] * scale_old[h] + sum;
    }
#pragma unroll
    for (int i = 0; i < kDTiles; ++i) {
      o_acc[i][0] *= scale_old[0];
      o_acc[i][1] *= scale_old[0];
      o_acc[i][2] *= scale_old[1];
      o_acc[i][3] *= scale_old[1];
    }

    // ---- O += P V: P from the score accumulators, V^T fragments by ldmatrix.trans ----
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t pa[4] = {
          Element<kIsBF16>::pack(s[2 * kk][0], s[2 * kk][1]), Element<kIsBF16>::pack(s[2 * kk][2], s[2 * kk][3]),
          Element<kIsBF16>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
          Element<kIsBF16>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < kDTiles / 2; ++dp) {
        // matrices: keys [kk*16, +8) x d [dp*16, +8), keys +8 x d, keys x d +8, keys +8 x d +8
        uint32_t vb[4];
        const int key = kk * 16 + lane % 8 + ((lane / 8) % 2) * 8;
        const int d = dp * 16 + (lane / 16) * 8;
        TIDAR_MUTATION(v_not_transposed, ldmatrix_x4_trans, ldmatrix_x4)(vb, smem_addr(vs + key * S::kPitch + d));
        mma_16816<kIsBF16>(o_acc[2 * dp], pa, vb[0], vb[1]);
        mma_16816<kIsBF16>(o_acc[2 * dp + 1], pa, vb[2], vb[3]);
      }
    }

    TIDAR_MUTATION(no_refill_barrier, __syncthreads(), );  // every warp is done with this stage before it is refilled
    tile = next;
  }

  // ---- normalise and write the partial output and its log2-sum-exp2 ----
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float sum = row_sum[h];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int r = row0 + warp * 16 + quad_row + 8 * TIDAR_MUTATION(output_row_swap, h, (1 - h));
    if (r >= rows) continue;
    const int64_t idx = part_row(r);
    if (sum == 0.f) {  // no visible key in this split (cannot happen for a real row locally)
      if (lane % 4 == 0) p.lse_partial[idx] = kNegInf;
      continue;
    }
    const float inv = 1.f / sum;
    T* out = static_cast<T*>(p.out_partial) + idx * kHeadDim;
#pragma unroll
    for (int i = 0; i < kDTiles; ++i)
      *reinterpret_cast<uint32_t*>(out + i * 8 + quad_col) =
          TIDAR_MUTATION(partial_pair_swap, Element<kIsBF16>::pack(o_acc[i][2 * h] * inv, o_acc[i][2 * h + 1] * inv),
                         Element<kIsBF16>::pack(o_acc[i][2 * h + 1] * inv, o_acc[i][2 * h] * inv));
    if (lane % 4 == 0) p.lse_partial[idx] = row_max[h] + __log2f(sum);
  }
}

// ---------------------------------------------------------------------------
// LSE merge of the num_splits + 1 partials of every (b, t, q_head) row: one warp per row,
// each lane 2 or 4 contiguous dims (one 32- or 64-bit access per split), summed in fp32.
// ---------------------------------------------------------------------------

// kPerLane contiguous 16-bit elements at src (4- or 8-byte aligned) as kPerLane / 2 packed pairs,
// in one 32- or 64-bit access (a 64-bit integer: nvcc 13.0 splits a uint2 store into two).
template <int kPerLane>
__device__ __forceinline__ void load_pairs(uint32_t (&pairs)[kPerLane / 2], const void* src) {
  static_assert(kPerLane == 2 || kPerLane == 4, "head dim 64 or 128");
  if constexpr (kPerLane == 4) {
    const uint64_t bits = *static_cast<const uint64_t*>(src);
    pairs[0] = static_cast<uint32_t>(TIDAR_MUTATION(merge_word_swap, bits, bits >> 32)),
    pairs[1] = static_cast<uint32_t>(TIDAR_MUTATION(merge_word_swap, bits >> 32, bits));
  } else {
    pairs[0] = *static_cast<const uint32_t*>(src);
  }
}

template <int kPerLane>
__device__ __forceinline__ void store_pairs(void* dst, const uint32_t (&pairs)[kPerLane / 2]) {
  static_assert(kPerLane == 2 || kPerLane == 4, "head dim 64 or 128");
  if constexpr (kPerLane == 4) *static_cast<uint64_t*>(dst) = static_cast<uint64_t>(pairs[1]) << 32 | pairs[0];
  else *static_cast<uint32_t*>(dst) = pairs[0];
}

template <bool kIsBF16, int kHeadDim>
__global__ void __launch_bounds__(128) combine_kernel(const DecodeParams p) {
  using T = typename Element<kIsBF16>::type;
  constexpr int kPerLane = kHeadDim / 32;  // 2 or 4 contiguous dims per lane
  constexpr float kNegInf = -__builtin_huge_valf();
  const int64_t part_rows = static_cast<int64_t>(p.batch) * p.steps * p.q_heads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  if (row >= part_rows) return;
  const int lane = threadIdx.x % 32;
  const int splits = p.num_splits + 1;

  float lse_max = kNegInf;
  for (int s = 0; s < splits; ++s) lse_max = fmaxf(lse_max, p.lse_partial[s * part_rows + row]);
  float acc[kPerLane] = {};
  float weight_sum = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float lse = p.lse_partial[s * part_rows + row];
    if (lse == kNegInf) continue;  // empty split: its partial output was never written
    const float w = ex2_approx(lse - lse_max);
    weight_sum += w;
    uint32_t pairs[kPerLane / 2];
    load_pairs<kPerLane>(pairs, static_cast<const T*>(p.out_partial) + (s * part_rows + row) * kHeadDim +
                                    lane * kPerLane);
#pragma unroll
    for (int i = 0; i < kPerLane / 2; ++i) {
      const float2 v = Element<kIsBF16>::unpack(pairs[i]);
      acc[2 * i] += w * v.x, acc[2 * i + 1] += w * v.y;
    }
  }
  // The local split always sees d_0, so weight_sum > 0 for every row.
  const float inv = 1.f / weight_sum;
  uint32_t out_pairs[kPerLane / 2];
#pragma unroll
  for (int i = 0; i < kPerLane / 2; ++i) out_pairs[i] = Element<kIsBF16>::pack(acc[2 * i] * inv, acc[2 * i + 1] * inv);
  store_pairs<kPerLane>(static_cast<T*>(p.out) + row * kHeadDim + lane * kPerLane, out_pairs);
}

template <bool kIsBF16, int kHeadDim>
void launch(const DecodeParams& p, cudaStream_t stream) {
  const int rows = p.steps * (p.q_heads / p.kv_heads);
  const dim3 grid((rows + kBlockM - 1) / kBlockM, p.num_splits + 1, p.batch * p.kv_heads);
  constexpr int kSmem = Smem<kHeadDim>::kBytes;
  auto kernel = p.block_table != nullptr ? decode_attention_kernel<kIsBF16, kHeadDim, true>
                                         : decode_attention_kernel<kIsBF16, kHeadDim, false>;
  set_max_dynamic_smem(kernel, kSmem);
  launch_kernel(kernel, grid, dim3(kThreads), kSmem, stream, p);
  const int64_t part_rows = static_cast<int64_t>(p.batch) * p.steps * p.q_heads;
  launch_kernel(combine_kernel<kIsBF16, kHeadDim>, dim3(static_cast<unsigned>((part_rows + 3) / 4)), dim3(128), 0,
                stream, p);
}

}  // namespace decode

#define TIDAR_INSTANTIATE_DECODE_ATTENTION(IS_BF16, HEAD_DIM)                              \
  template <>                                                                               \
  void run_decode_attention<IS_BF16, HEAD_DIM>(const DecodeParams& p, cudaStream_t stream) { \
    decode::launch<IS_BF16, HEAD_DIM>(p, stream);                                           \
  }

}  // namespace tidar
