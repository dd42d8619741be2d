// Checks and launch parameters shared by the torch bindings of the kernels: the CUDA
// extension (bindings.cpp, CUDA tensors) and the emulated one (emulation/bindings_emulated.cpp,
// the same kernel sources run on the CPU, CPU tensors). One copy of every check, so the
// emulated backend exercises exactly what the CUDA backend will see on a GPU.
//
// The checks are those memory safety needs (shapes, dtypes, devices, strides, alignment,
// aliasing, grid limits), since the torch ops can be called directly; checks of meaning that
// touch no memory (softmax scale > 0, beta in [0, 1], block-table values) are
// tidar_kernels/kernels/validation.py's, which every public op runs first. Every check runs
// before anything is allocated for the launch or written, so bad input raises without side
// effects. Torch headers only here and in the two binding files.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kernels.h"

namespace tidar {
namespace binding {

// Constants shared with Python: python_tests/test_shared_constants.py fails on a difference.
constexpr int64_t kLayoutDecode = 3;  // tidar_kernels.kernels.mask.Layout.DECODE
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
// Paged caches: pages of 1 (SGLang's token pool) up to 256 rows; tidar_kernels.kernels.validation.MAX_PAGE_SIZE.
constexpr int64_t kMaxPageSize = 256;
// Tests only (docs/ENVIRONMENT.md): a fixed number of cache splits instead of the planner's.
constexpr const char* kForceSplitsEnv = "TIDAR_FORCE_DECODE_SPLITS";

// Where the tensors of one backend must live: CUDA for "cuda", CPU for "cuda_emulated".
struct Target {
  c10::DeviceType device_type;
  const char* device_words;  // "a CUDA tensor" / "a CPU tensor"
  const char* backend;       // for messages
};

inline std::string shape_of(const at::Tensor& t) { return c10::str(t.sizes()); }

inline void check_device(const Target& target, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.device().type() == target.device_type, name, " must be ", target.device_words,
              " for the ", target.backend, " backend, got device ", t.device());
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), " like the other inputs, got ",
              t.device());
}

// No two index tuples may reach the same element: sorted by stride, every stride of a dim of
// size > 1 must exceed the extent of the smaller ones. Rejects stride 0 (an expanded tensor)
// and rows that overlap each other; a cache that overlaps itself would race on the draft write.
inline void check_no_self_overlap(const char* name, const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of dims with size > 1
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t extent = 1;  // elements spanned by the dims checked so far
  for (const auto& [stride, size] : dims) {
    TORCH_CHECK(stride >= extent, name, " must not overlap itself: a dim of size ", size, " has stride ", stride,
                " (stride 0 = expanded, or rows overlapping), need >= ", extent, "; got strides ",
                c10::str(t.strides()), " for shape ", shape_of(t));
    extent = stride * (size - 1) + extent;
  }
}

// [first, last] byte addresses a tensor can touch.
inline std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const auto first = reinterpret_cast<uintptr_t>(t.data_ptr());
  return {first, first + static_cast<uintptr_t>((last + 1) * t.element_size()) - 1};
}

// 4-d [batch, rows, heads, head_dim] with a contiguous last dim, 16-byte aligned
// rows (the kernels move 16-byte vectors), in the attention dtype, not overlapping itself.
inline void check_attention_tensor(const Target& target, const char* name, const at::Tensor& t,
                                   const at::Tensor& q) {
  check_device(target, name, t, q);
  TORCH_CHECK(t.dim() == 4, name, " must be 4-d [batch, seq, heads, head_dim], got shape ", shape_of(t));
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.stride(3) == 1, name, " must have a contiguous last dim (stride 1), got strides ",
              c10::str(t.strides()));
  for (int d = 0; d < 3; ++d)
    TORCH_CHECK(t.stride(d) % 8 == 0, name, " strides must be multiples of 8 elements (16-byte rows), got ",
                c10::str(t.strides()));
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
              " must start at a 16-byte aligned address, got offset ", t.storage_offset());
  check_no_self_overlap(name, t);
}

inline void copy_strides(int64_t (&dst)[3], const at::Tensor& t) {
  for (int d = 0; d < 3; ++d) dst[d] = t.stride(d);
}

// The split count TIDAR_FORCE_DECODE_SPLITS asks for, or 0 (use the planner).
inline int forced_num_splits() {
  const char* text = std::getenv(kForceSplitsEnv);
  if (text == nullptr || *text == '\0') return 0;
  char* end = nullptr;
  const long value = std::strtol(text, &end, 10);
  TORCH_CHECK(*end == '\0' && value >= 1 && value <= 1024, kForceSplitsEnv,
              " must be an integer in [1, 1024] (or unset), got '", text, "'");
  return static_cast<int>(value);
}

// A decode step ready to launch: parameters and the tensors they point into.
struct DecodeLaunch {
  DecodeParams params{};
  at::Tensor out, out_partial, lse_partial;
  bool empty = false;  // batch 0: nothing to launch
};

// Static checks of a block table [batch, max_pages_per_seq] (int32, on q's device, not overlapping
// itself) and of the page pools it indexes; returns each sequence's capacity in rows,
// max_pages_per_seq * page_size. Its values (pages in [0, num_pages), distinct) would need a
// device sync: tidar_kernels.kernels.validation checks them on the host unless check_lengths=False.
inline int64_t check_block_table(const Target& target, const at::Tensor& block_table, const at::Tensor& q,
                                 const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t batch,
                                 int64_t kv_heads, int64_t head_dim) {
  check_device(target, "block_table", block_table, q);
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2,
              "block_table must be an int32 tensor [batch, max_pages_per_seq], got ", block_table.scalar_type(), " ",
              shape_of(block_table));
  TORCH_CHECK(block_table.size(0) == batch && block_table.size(1) >= 1, "block_table must have shape [batch=", batch,
              ", max_pages_per_seq >= 1], got ", shape_of(block_table));
  check_no_self_overlap("block_table", block_table);  // an expanded table would share pages between sequences
  for (const auto& [name, pool] : {std::pair<const char*, const at::Tensor&>{"k_cache", k_cache},
                                   std::pair<const char*, const at::Tensor&>{"v_cache", v_cache}}) {
    TORCH_CHECK(pool.size(0) >= 1 && pool.size(1) >= 1 && pool.size(1) <= kMaxPageSize && pool.size(2) == kv_heads &&
                    pool.size(3) == head_dim,
                name, " must be a page pool [num_pages >= 1, page_size in [1, ", kMaxPageSize, "], kv_heads=", kv_heads,
                ", head_dim=", head_dim, "] with block_table, got ", shape_of(pool));
  }
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must have k_cache's shape ", shape_of(k_cache),
              " (the same pages and page_size), got ", shape_of(v_cache));
  return block_table.size(1) * k_cache.size(1);
}

inline DecodeLaunch prepare_decode(const Target& target, const at::Tensor& q, const at::Tensor& k_new,
                                   const at::Tensor& v_new, at::Tensor& k_cache, at::Tensor& v_cache,
                                   const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& context_lens,
                                   int64_t layout, int64_t block_size, double scale,
                                   const roofline::Device& plan_device,
                                   const std::optional<at::Tensor>& block_table) {
  TORCH_CHECK(layout == kLayoutDecode, "layout must be ", kLayoutDecode, " (Layout.DECODE): the ", target.backend,
              " backend implements only the decode step, got ", layout);
  TORCH_CHECK(!context_lens.has_value(), "context_lens must be None for Layout.DECODE, got a tensor of shape ",
              context_lens.has_value() ? shape_of(*context_lens) : "");
  TORCH_CHECK(q.device().type() == target.device_type, "q must be ", target.device_words, " for the ",
              target.backend, " backend, got device ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "q must be float16 or bfloat16, got ", q.scalar_type());
  check_attention_tensor(target, "q", q, q);
  check_attention_tensor(target, "k_new", k_new, q);
  check_attention_tensor(target, "v_new", v_new, q);
  check_attention_tensor(target, "k_cache", k_cache, q);
  check_attention_tensor(target, "v_cache", v_cache, q);

  const int64_t batch = q.size(0), steps = q.size(1), q_heads = q.size(2), head_dim = q.size(3);
  const int64_t kv_heads = k_new.size(2);
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "q head_dim must be 64 or 128, got ", head_dim);
  TORCH_CHECK(block_size >= 1 && steps == block_size + block_size * block_size, "q.shape[1] must be k + k*k = ",
              block_size + block_size * block_size, " for block_size (draft length) k = ", block_size, ", got ",
              steps);
  TORCH_CHECK(steps <= static_cast<int64_t>(kDecodeBlockN) * kDecodeMaxLocalTiles, "q.shape[1] = k + k*k must be <= ",
              kDecodeBlockN * kDecodeMaxLocalTiles, " (draft length k <= 63), got ", steps);
  TORCH_CHECK(q_heads >= 1, "q must have at least one head, got shape ", shape_of(q));
  TORCH_CHECK(k_new.sizes() == v_new.sizes(), "v_new must have k_new's shape ", shape_of(k_new), ", got ",
              shape_of(v_new));
  TORCH_CHECK(k_new.size(0) == batch && k_new.size(1) == steps && k_new.size(3) == head_dim,
              "k_new must be [batch=", batch, ", seq=", steps, ", kv_heads, head_dim=", head_dim, "], got ",
              shape_of(k_new));
  TORCH_CHECK(kv_heads >= 1 && q_heads % kv_heads == 0, "q heads (", q_heads,
              ") must be a multiple of k_new heads (", kv_heads, ") for GQA");
  // Rows per sequence: the cache's max_len, or max_pages_per_seq * page_size through a block table.
  const int64_t max_len = block_table.has_value()
                              ? check_block_table(target, *block_table, q, k_cache, v_cache, batch, kv_heads, head_dim)
                              : k_cache.size(1);
  for (const auto& [name, cache] : {std::pair<const char*, const at::Tensor&>{"k_cache", k_cache},
                                    std::pair<const char*, const at::Tensor&>{"v_cache", v_cache}}) {
    if (block_table.has_value()) break;  // page pools: checked with the table
    TORCH_CHECK(cache.size(0) == batch && cache.size(1) == max_len && cache.size(2) == kv_heads &&
                    cache.size(3) == head_dim,
                name, " must be [batch=", batch, ", max_len=", max_len, ", kv_heads=", kv_heads,
                ", head_dim=", head_dim, "], got ", shape_of(cache));
  }
  if (k_cache.numel() > 0) {
    const auto [k_first, k_last] = byte_span(k_cache);
    const auto [v_first, v_last] = byte_span(v_cache);
    TORCH_CHECK(k_last < v_first || v_last < k_first,
                "k_cache and v_cache must not overlap in memory (the drafts' K and V writes would race): "
                "k_cache spans bytes [", k_first, ", ", k_last, "], v_cache [", v_first, ", ", v_last, "]");
  }
  TORCH_CHECK(max_len >= block_size, block_table.has_value() ? "max_pages_per_seq * page_size (" : "k_cache max_len (",
              max_len, ") must hold the ", block_size, " drafts");
  check_device(target, "cache_seqlens", cache_seqlens, q);
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 &&
                  cache_seqlens.size(0) == batch && cache_seqlens.is_contiguous(),
              "cache_seqlens must be a contiguous int32 tensor [batch=", batch, "], got ",
              cache_seqlens.scalar_type(), " ", shape_of(cache_seqlens));
  TORCH_CHECK(batch * kv_heads <= kMaxGridYZ, "batch * kv_heads must be <= ", kMaxGridYZ, " (grid z), got ",
              batch * kv_heads);
  TORCH_CHECK(max_len < (1LL << 30) && steps * q_heads < (1LL << 24), "sizes out of range: max_len ", max_len,
              ", steps * q_heads ", steps * q_heads);
  const int64_t part_rows = batch * steps * q_heads;
  TORCH_CHECK((part_rows + 3) / 4 <= kMaxGridX, "batch * steps * q_heads must be <= ", 4 * kMaxGridX,
              " (the merge kernel's grid x), got ", part_rows);

  DecodeLaunch launch;
  launch.out = at::empty({batch, steps, q_heads, head_dim}, q.options());
  if (batch == 0) {
    launch.empty = true;
    return launch;
  }
  DecodeParams& p = launch.params;
  p.batch = static_cast<int>(batch);
  p.steps = static_cast<int>(steps);
  p.draft_len = static_cast<int>(block_size);
  p.q_heads = static_cast<int>(q_heads);
  p.kv_heads = static_cast<int>(kv_heads);
  p.max_len = static_cast<int>(max_len);
  const int forced = forced_num_splits();
  p.num_splits = forced > 0 ? forced
                            : decode_num_splits(p.batch, p.steps, p.draft_len, p.q_heads, p.kv_heads,
                                                static_cast<int>(head_dim), p.max_len, plan_device);
  p.scale = static_cast<float>(scale);
  // Partial outputs (q's dtype) and fp32 log2-sum-exp2 of the num_splits cache splits and the step-local split.
  launch.out_partial = at::empty({p.num_splits + 1, batch, steps, q_heads, head_dim}, q.options());
  launch.lse_partial = at::empty({p.num_splits + 1, batch, steps, q_heads}, q.options().dtype(at::kFloat));
  p.q = q.data_ptr();
  p.k_new = k_new.data_ptr();
  p.v_new = v_new.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.out = launch.out.data_ptr();
  p.out_partial = launch.out_partial.data_ptr();
  p.lse_partial = launch.lse_partial.data_ptr<float>();
  copy_strides(p.q_stride, q);
  copy_strides(p.knew_stride, k_new);
  copy_strides(p.vnew_stride, v_new);
  copy_strides(p.kcache_stride, k_cache);
  copy_strides(p.vcache_stride, v_cache);
  if (block_table.has_value()) {
    p.block_table = block_table->data_ptr<int32_t>();
    p.block_table_stride[0] = block_table->stride(0);
    p.block_table_stride[1] = block_table->stride(1);
    p.page_size = static_cast<int>(k_cache.size(1));
  }
  return launch;
}

// The instantiation of run_decode_attention for q's dtype and head dim (checked above).
inline void run_decode(const at::Tensor& q, const DecodeParams& p, cudaStream_t stream) {
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  const int64_t head_dim = q.size(3);
  if (bf16 && head_dim == 64) run_decode_attention<true, 64>(p, stream);
  else if (bf16) run_decode_attention<true, 128>(p, stream);
  else if (head_dim == 64) run_decode_attention<false, 64>(p, stream);
  else run_decode_attention<false, 128>(p, stream);
}

inline LogitsType logits_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return LogitsType::kFloat16;
    case at::kBFloat16: return LogitsType::kBFloat16;
    default: return LogitsType::kFloat32;
  }
}

// An accept step ready to launch: parameters and the tensors they point into.
struct AcceptLaunch {
  AcceptParams params{};
  at::Tensor accepted, targets;
  at::Tensor draft_logits, block_logits, drafts, partial_value, partial_index;  // kept alive for the launch
  bool empty = false;
};

inline AcceptLaunch prepare_accept(const Target& target, const at::Tensor& drafts, const at::Tensor& draft_logits_in,
                                   const at::Tensor& block_logits_in, at::Tensor& cache_seqlens,
                                   const std::optional<at::Tensor>& active, double beta, int num_sms) {
  TORCH_CHECK(drafts.device().type() == target.device_type, "drafts must be ", target.device_words, " for the ",
              target.backend, " backend, got device ", drafts.device());
  TORCH_CHECK(drafts.scalar_type() == at::kLong && drafts.dim() == 2,
              "drafts must be int64 [batch, k], got ", drafts.scalar_type(), " ", shape_of(drafts));
  const int64_t batch = drafts.size(0), draft_len = drafts.size(1);
  TORCH_CHECK(draft_len >= 1 && draft_len <= 4096, "drafts k must lie in [1, 4096], got ", draft_len);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"draft_logits", draft_logits_in},
                                std::pair<const char*, const at::Tensor&>{"block_logits", block_logits_in}}) {
    check_device(target, name, t, drafts);
    TORCH_CHECK(t.dim() == 3 && t.size(0) == batch && t.size(1) == draft_len, name, " must be [batch=", batch,
                ", k=", draft_len, ", vocab], got ", shape_of(t));
    const auto dtype = t.scalar_type();
    TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, name,
                " must be float16, bfloat16 or float32, got ", dtype);
    TORCH_CHECK(t.stride(2) == 1, name, " must have a contiguous vocab dim (stride 1), got strides ",
                c10::str(t.strides()));
  }
  TORCH_CHECK(block_logits_in.sizes() == draft_logits_in.sizes(), "block_logits must have draft_logits' shape ",
              shape_of(draft_logits_in), ", got ", shape_of(block_logits_in));
  const int64_t vocab = draft_logits_in.size(2);
  TORCH_CHECK(vocab >= 1 && vocab < (1LL << 31) - 65536, "vocab must lie in [1, 2^31 - 65536), got ", vocab);
  check_device(target, "cache_seqlens", cache_seqlens, drafts);
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 &&
                  cache_seqlens.size(0) == batch && cache_seqlens.is_contiguous(),
              "cache_seqlens must be a contiguous int32 tensor [batch=", batch, "], got ",
              cache_seqlens.scalar_type(), " ", shape_of(cache_seqlens));
  if (active.has_value()) {
    check_device(target, "active", *active, drafts);
    TORCH_CHECK(active->scalar_type() == at::kBool && active->dim() == 1 && active->size(0) == batch &&
                    active->is_contiguous(),
                "active must be a contiguous bool tensor [batch=", batch, "] or None, got ", active->scalar_type(),
                " ", shape_of(*active));
  }
  TORCH_CHECK(batch * draft_len <= kMaxGridYZ, "batch * k must be <= ", kMaxGridYZ, " (grid y), got ",
              batch * draft_len);

  AcceptLaunch launch;
  // Mixed logits dtypes: compare in fp32 (exact for fp16/bf16, so the result is unchanged).
  const bool same_dtype = draft_logits_in.scalar_type() == block_logits_in.scalar_type();
  launch.draft_logits = same_dtype ? draft_logits_in : draft_logits_in.to(at::kFloat);
  launch.block_logits = same_dtype ? block_logits_in : block_logits_in.to(at::kFloat);
  launch.drafts = drafts.contiguous();
  launch.accepted = at::empty({batch}, cache_seqlens.options());
  launch.targets = at::empty({batch, draft_len}, drafts.options());
  if (batch == 0) {
    launch.empty = true;
    return launch;
  }
  AcceptParams& p = launch.params;
  p.batch = static_cast<int>(batch);
  p.draft_len = static_cast<int>(draft_len);
  p.vocab = static_cast<int>(vocab);
  accept_drafts_plan(p, num_sms);
  launch.partial_value = at::empty({batch * draft_len, p.num_chunks}, launch.draft_logits.options().dtype(at::kFloat));
  launch.partial_index = at::empty({batch * draft_len, p.num_chunks}, cache_seqlens.options());
  p.drafts = launch.drafts.data_ptr<int64_t>();
  p.draft_logits = launch.draft_logits.data_ptr();
  p.block_logits = launch.block_logits.data_ptr();
  p.draft_stride[0] = launch.draft_logits.stride(0);
  p.draft_stride[1] = launch.draft_logits.stride(1);
  p.block_stride[0] = launch.block_logits.stride(0);
  p.block_stride[1] = launch.block_logits.stride(1);
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.active = active.has_value() ? active->data_ptr<bool>() : nullptr;
  p.accepted = launch.accepted.data_ptr<int32_t>();
  p.targets = launch.targets.data_ptr<int64_t>();
  p.partial_value = launch.partial_value.data_ptr<float>();
  p.partial_index = launch.partial_index.data_ptr<int32_t>();
  // Both weights rounded to fp32 once, as PyTorch does with the reference's Python scalars.
  p.beta = static_cast<float>(beta);
  p.one_minus_beta = static_cast<float>(1.0 - beta);
  p.dtype = logits_type(launch.draft_logits);
  return launch;
}

// Schemas of the ops of one backend: cached_attention<suffix> and accept_drafts<suffix>.
inline std::string decode_schema(const std::string& suffix) {
  return "cached_attention" + suffix +
         "(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, "
         "Tensor cache_seqlens, Tensor? context_lens, int layout, int block_size, float scale, "
         "Tensor? block_table=None) -> Tensor";
}
inline std::string accept_schema(const std::string& suffix) {
  return "accept_drafts" + suffix +
         "(Tensor drafts, Tensor draft_logits, Tensor block_logits, Tensor(a!) cache_seqlens, "
         "Tensor? active, float beta) -> (Tensor, Tensor)";
}

}  // namespace binding
}  // namespace tidar
