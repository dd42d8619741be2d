// Host-side interface of the hand-written CUDA kernels.
//
// Plain C++ (only the CUDA runtime types): included by the kernel files
// (decode_attention_*.cu, accept_drafts.cu; host-compiled against csrc/emulation/ for the
// emulated build) and by the bindings (bindings_common.h). Pointers are raw, strides are in elements, and every
// length the kernels need at run time is read from device memory, so a launch
// is the same on every step and can be captured in a CUDA graph.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "decode_attention_plan.h"

namespace tidar {

// ---------------------------------------------------------------------------
// Decode-step attention (Layout::kDecode)
// ---------------------------------------------------------------------------

// Tiling shared by the kernels and the host planner: decode_attention_plan.h.
// The step-local split classifies its key tiles once into shared memory: at most this many
// tiles, so steps = k + k*k <= kDecodeBlockN * kDecodeMaxLocalTiles (k <= 63).
constexpr int kDecodeMaxLocalTiles = 64;

struct DecodeParams {
  // q [batch, steps, q_heads, head_dim]; k_new / v_new [batch, steps, kv_heads, head_dim];
  // k_cache / v_cache [batch, max_len, kv_heads, head_dim] (or page pools, see block_table);
  // the last dim is contiguous.
  const void* q;
  const void* k_new;
  const void* v_new;
  void* k_cache;
  void* v_cache;
  const int32_t* cache_seqlens;  // [batch], committed lengths n_b (device)
  void* out;                     // [batch, steps, q_heads, head_dim], contiguous
  // Workspace: partial outputs [num_splits + 1, batch, steps, q_heads, head_dim] in q's dtype
  // and their fp32 log2-sum-exp2 [num_splits + 1, batch, steps, q_heads].
  void* out_partial;
  float* lse_partial;
  int64_t q_stride[3];      // batch, step, head
  int64_t knew_stride[3];
  int64_t vnew_stride[3];
  int64_t kcache_stride[3];
  int64_t vcache_stride[3];
  int batch;
  int steps;       // k + k*k
  int draft_len;   // k
  int q_heads;
  int kv_heads;
  int max_len;
  int num_splits;  // cache splits; one more split holds the step-local keys
  float scale;     // softmax scale (natural-log domain)
  // Paged caches (flash-attn's flash_attn_with_kvcache convention), or nullptr: contiguous caches.
  // With a table, k_cache / v_cache are page pools [num_pages, page_size, kv_heads, head_dim]
  // (kcache_stride[0] strides pages, kcache_stride[1] slots) and row t of sequence b is slot
  // t % page_size of page block_table[b * block_table_stride[0] + (t / page_size) * block_table_stride[1]];
  // max_len is then max_pages_per_seq * page_size. Only the entries of rows [0, n_b + k) are
  // read; they must be distinct pages in [0, num_pages) (checked by the Python op).
  // Appended last so the contiguous kernels' parameter offsets do not move.
  const int32_t* block_table;
  int64_t block_table_stride[2];  // batch, column (elements)
  int page_size;
};

// One instantiation per (dtype, head_dim), each in its own .cu file.
template <bool kIsBF16, int kHeadDim>
void run_decode_attention(const DecodeParams& params, cudaStream_t stream);

// ---------------------------------------------------------------------------
// Accept drafts and commit (docs/semantics.md#acceptance, greedy)
// ---------------------------------------------------------------------------

enum class LogitsType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

struct AcceptParams {
  const int64_t* drafts;      // [batch, k], contiguous
  const void* draft_logits;   // [batch, k, vocab], last dim contiguous
  const void* block_logits;   // same shape and dtype as draft_logits
  int64_t draft_stride[2];    // batch, row (elements)
  int64_t block_stride[2];
  int32_t* cache_seqlens;     // [batch], advanced in place by the accepted count
  const bool* active;         // [batch] or nullptr (all active)
  int32_t* accepted;          // [batch] out
  int64_t* targets;           // [batch, k] out, contiguous
  float* partial_value;       // workspace [batch * k, num_chunks]
  int32_t* partial_index;     // workspace [batch * k, num_chunks]
  int batch;
  int draft_len;
  int vocab;
  int num_chunks;  // vocabulary chunks per row (one CTA each)
  int chunk;       // elements per chunk
  float beta;
  float one_minus_beta;  // rounded once on the host, like the reference's Python scalar
  LogitsType dtype;
};

// Vocabulary split from static sizes: sets num_chunks and chunk.
void accept_drafts_plan(AcceptParams& params, int num_sms);

void run_accept_drafts(const AcceptParams& params, cudaStream_t stream);

// Architectures this extension was compiled for (e.g. "sm_80;sm_90a").
const char* compiled_archs();

}  // namespace tidar
