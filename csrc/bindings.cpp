// Torch binding of the CUDA kernels: the only file of the extension that includes torch.
//
// Registers, in namespace `tidar`, the schemas of the "cuda" backend's ops and
// their CUDA implementations; the fake (meta) implementations are registered in
// Python (tidar_kernels/backends/cuda_ops.py). Every check runs before any
// launch, so bad input raises without writing anything. A minimal pybind11
// module makes `import tidar_kernels._C` load the library (and the ops).
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers
// that a minimal CUDA toolkit (the CI machine's) does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <string>

#include "kernels.h"

namespace tidar {
namespace {

constexpr int64_t kLayoutDecode = 3;  // tidar_kernels.mask.Layout.DECODE

std::string shape_of(const at::Tensor& t) { return c10::str(t.sizes()); }

int num_sms(const at::Tensor& on) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, on.device().index()));
  return count;
}

// The decode planner's roofline figures of the tensor's GPU (name, SMs, shared memory per SM),
// read once per device: cudaGetDeviceProperties is slow.
roofline::Device plan_device(const at::Tensor& on) {
  static std::mutex mutex;
  static std::map<int, roofline::Device> known;
  const int index = on.device().index();
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = known.find(index);
  if (found == known.end()) {
    cudaDeviceProp prop{};
    C10_CUDA_CHECK(cudaGetDeviceProperties(&prop, index));
    found = known.emplace(index, roofline::device_for(prop.name, prop.multiProcessorCount,
                                                      static_cast<int>(prop.sharedMemPerMultiprocessor))).first;
  }
  return found->second;
}

void check_cuda(const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), " like the other inputs, got ",
              t.device());
}

// 4-d [batch, rows, heads, head_dim] with a contiguous last dim, 16-byte aligned
// rows (the kernels move 16-byte vectors), in the attention dtype.
void check_attention_tensor(const char* name, const at::Tensor& t, const at::Tensor& q) {
  check_cuda(name, t, q);
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
}

void copy_strides(int64_t (&dst)[3], const at::Tensor& t) {
  for (int d = 0; d < 3; ++d) dst[d] = t.stride(d);
}

at::Tensor cached_attention_cuda(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                                 at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                 const std::optional<at::Tensor>& context_lens, int64_t layout, int64_t block_size,
                                 double scale) {
  TORCH_CHECK(layout == kLayoutDecode, "layout must be ", kLayoutDecode,
              " (Layout.DECODE): the cuda backend implements only the decode step, got ", layout);
  TORCH_CHECK(!context_lens.has_value(), "context_lens must be None for Layout.DECODE, got a tensor of shape ",
              context_lens.has_value() ? shape_of(*context_lens) : "");
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor, got device ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "q must be float16 or bfloat16, got ", q.scalar_type());
  check_attention_tensor("q", q, q);
  check_attention_tensor("k_new", k_new, q);
  check_attention_tensor("v_new", v_new, q);
  check_attention_tensor("k_cache", k_cache, q);
  check_attention_tensor("v_cache", v_cache, q);

  const int64_t batch = q.size(0), steps = q.size(1), q_heads = q.size(2), head_dim = q.size(3);
  const int64_t kv_heads = k_new.size(2), max_len = k_cache.size(1);
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "q head_dim must be 64 or 128, got ", head_dim);
  TORCH_CHECK(block_size >= 1 && steps == block_size + block_size * block_size, "q.shape[1] must be k + k*k = ",
              block_size + block_size * block_size, " for block_size (draft length) k = ", block_size, ", got ",
              steps);
  TORCH_CHECK(k_new.sizes() == v_new.sizes(), "v_new must have k_new's shape ", shape_of(k_new), ", got ",
              shape_of(v_new));
  TORCH_CHECK(k_new.size(0) == batch && k_new.size(1) == steps && k_new.size(3) == head_dim,
              "k_new must be [batch=", batch, ", seq=", steps, ", kv_heads, head_dim=", head_dim, "], got ",
              shape_of(k_new));
  TORCH_CHECK(kv_heads >= 1 && q_heads % kv_heads == 0, "q heads (", q_heads,
              ") must be a multiple of k_new heads (", kv_heads, ") for GQA");
  for (const auto& [name, cache] : {std::pair<const char*, const at::Tensor&>{"k_cache", k_cache},
                                    std::pair<const char*, const at::Tensor&>{"v_cache", v_cache}}) {
    TORCH_CHECK(cache.size(0) == batch && cache.size(1) == max_len && cache.size(2) == kv_heads &&
                    cache.size(3) == head_dim,
                name, " must be [batch=", batch, ", max_len=", max_len, ", kv_heads=", kv_heads,
                ", head_dim=", head_dim, "], got ", shape_of(cache));
  }
  TORCH_CHECK(max_len >= block_size, "k_cache max_len (", max_len, ") must hold the ", block_size, " drafts");
  check_cuda("cache_seqlens", cache_seqlens, q);
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 &&
                  cache_seqlens.size(0) == batch && cache_seqlens.is_contiguous(),
              "cache_seqlens must be a contiguous int32 tensor [batch=", batch, "], got ",
              cache_seqlens.scalar_type(), " ", shape_of(cache_seqlens));
  TORCH_CHECK(scale > 0, "scale must be > 0, got ", scale);
  TORCH_CHECK(batch * kv_heads <= 65535, "batch * kv_heads must be <= 65535 (grid z), got ", batch * kv_heads);
  TORCH_CHECK(max_len < (1LL << 30) && steps * q_heads < (1LL << 24), "sizes out of range: max_len ", max_len,
              ", steps * q_heads ", steps * q_heads);

  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty({batch, steps, q_heads, head_dim}, q.options());
  if (batch == 0) return out;

  DecodeParams p{};
  p.batch = static_cast<int>(batch);
  p.steps = static_cast<int>(steps);
  p.draft_len = static_cast<int>(block_size);
  p.q_heads = static_cast<int>(q_heads);
  p.kv_heads = static_cast<int>(kv_heads);
  p.max_len = static_cast<int>(max_len);
  p.num_splits = decode_num_splits(p.batch, p.steps, p.draft_len, p.q_heads, p.kv_heads, static_cast<int>(head_dim),
                                   p.max_len, plan_device(q));
  p.scale = static_cast<float>(scale);
  // fp32 partial outputs of the num_splits cache splits and the step-local split.
  auto fopts = q.options().dtype(at::kFloat);
  auto out_partial = at::empty({p.num_splits + 1, batch, steps, q_heads, head_dim}, fopts);
  auto lse_partial = at::empty({p.num_splits + 1, batch, steps, q_heads}, fopts);
  p.q = q.data_ptr();
  p.k_new = k_new.data_ptr();
  p.v_new = v_new.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.out_partial = out_partial.data_ptr<float>();
  p.lse_partial = lse_partial.data_ptr<float>();
  copy_strides(p.q_stride, q);
  copy_strides(p.knew_stride, k_new);
  copy_strides(p.vnew_stride, v_new);
  copy_strides(p.kcache_stride, k_cache);
  copy_strides(p.vcache_stride, v_cache);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  if (bf16 && head_dim == 64) run_decode_attention<true, 64>(p, stream);
  else if (bf16) run_decode_attention<true, 128>(p, stream);
  else if (head_dim == 64) run_decode_attention<false, 64>(p, stream);
  else run_decode_attention<false, 128>(p, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

LogitsType logits_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return LogitsType::kFloat16;
    case at::kBFloat16: return LogitsType::kBFloat16;
    default: return LogitsType::kFloat32;
  }
}

std::tuple<at::Tensor, at::Tensor> accept_drafts_cuda(const at::Tensor& drafts, const at::Tensor& draft_logits_in,
                                                      const at::Tensor& block_logits_in, at::Tensor& cache_seqlens,
                                                      const std::optional<at::Tensor>& active, double beta) {
  TORCH_CHECK(drafts.is_cuda(), "drafts must be a CUDA tensor, got device ", drafts.device());
  TORCH_CHECK(drafts.scalar_type() == at::kLong && drafts.dim() == 2,
              "drafts must be int64 [batch, k], got ", drafts.scalar_type(), " ", shape_of(drafts));
  const int64_t batch = drafts.size(0), draft_len = drafts.size(1);
  TORCH_CHECK(draft_len >= 1 && draft_len <= 4096, "drafts k must lie in [1, 4096], got ", draft_len);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"draft_logits", draft_logits_in},
                                std::pair<const char*, const at::Tensor&>{"block_logits", block_logits_in}}) {
    check_cuda(name, t, drafts);
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
  check_cuda("cache_seqlens", cache_seqlens, drafts);
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 &&
                  cache_seqlens.size(0) == batch && cache_seqlens.is_contiguous(),
              "cache_seqlens must be a contiguous int32 tensor [batch=", batch, "], got ",
              cache_seqlens.scalar_type(), " ", shape_of(cache_seqlens));
  if (active.has_value()) {
    check_cuda("active", *active, drafts);
    TORCH_CHECK(active->scalar_type() == at::kBool && active->dim() == 1 && active->size(0) == batch &&
                    active->is_contiguous(),
                "active must be a contiguous bool tensor [batch=", batch, "] or None, got ", active->scalar_type(),
                " ", shape_of(*active));
  }
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0, "beta must lie in [0, 1], got ", beta);
  TORCH_CHECK(batch * draft_len <= 65535, "batch * k must be <= 65535 (grid y), got ", batch * draft_len);

  const c10::cuda::CUDAGuard guard(drafts.device());
  // Mixed logits dtypes: compare in fp32 (exact for fp16/bf16, so the result is unchanged).
  const bool same_dtype = draft_logits_in.scalar_type() == block_logits_in.scalar_type();
  const at::Tensor draft_logits = same_dtype ? draft_logits_in : draft_logits_in.to(at::kFloat);
  const at::Tensor block_logits = same_dtype ? block_logits_in : block_logits_in.to(at::kFloat);
  const at::Tensor drafts_c = drafts.contiguous();

  auto accepted = at::empty({batch}, cache_seqlens.options());
  auto targets = at::empty({batch, draft_len}, drafts.options());
  if (batch == 0) return {accepted, targets};

  AcceptParams p{};
  p.batch = static_cast<int>(batch);
  p.draft_len = static_cast<int>(draft_len);
  p.vocab = static_cast<int>(vocab);
  accept_drafts_plan(p, num_sms(drafts));
  auto partial_value = at::empty({batch * draft_len, p.num_chunks}, draft_logits.options().dtype(at::kFloat));
  auto partial_index = at::empty({batch * draft_len, p.num_chunks}, cache_seqlens.options());
  p.drafts = drafts_c.data_ptr<int64_t>();
  p.draft_logits = draft_logits.data_ptr();
  p.block_logits = block_logits.data_ptr();
  p.draft_stride[0] = draft_logits.stride(0);
  p.draft_stride[1] = draft_logits.stride(1);
  p.block_stride[0] = block_logits.stride(0);
  p.block_stride[1] = block_logits.stride(1);
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.active = active.has_value() ? active->data_ptr<bool>() : nullptr;
  p.accepted = accepted.data_ptr<int32_t>();
  p.targets = targets.data_ptr<int64_t>();
  p.partial_value = partial_value.data_ptr<float>();
  p.partial_index = partial_index.data_ptr<int32_t>();
  // Both weights rounded to fp32 once, as PyTorch does with the reference's Python scalars.
  p.beta = static_cast<float>(beta);
  p.one_minus_beta = static_cast<float>(1.0 - beta);
  p.dtype = logits_type(draft_logits);
  run_accept_drafts(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {accepted, targets};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tidar, m) {
  m.def(
      "cached_attention_cuda(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor cache_seqlens, Tensor? context_lens, int layout, int block_size, float scale) -> Tensor");
  m.def(
      "accept_drafts_cuda(Tensor drafts, Tensor draft_logits, Tensor block_logits, Tensor(a!) cache_seqlens, "
      "Tensor? active, float beta) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tidar, CUDA, m) {
  m.impl("cached_attention_cuda", &cached_attention_cuda);
  m.impl("accept_drafts_cuda", &accept_drafts_cuda);
}

}  // namespace tidar

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tidar-kernels CUDA extension: registers the tidar::*_cuda ops on import";
  m.def("compiled_archs", &tidar::compiled_archs,
        "Compute capabilities the kernels were compiled for (nvcc's __CUDA_ARCH_LIST__, e.g. '800,900')");
}
