// Torch binding of the CUDA kernels (with bindings_common.h, the only files of the extension
// that include torch).
//
// Registers, in namespace `tidar`, the schemas of the "cuda" backend's ops and
// their CUDA implementations; the fake (meta) implementations are registered in
// Python (tidar_kernels/kernels/backends/cuda_ops.py). Every check (bindings_common.h, shared
// with the emulated backend) runs before any launch, so bad input raises without
// writing anything. A minimal pybind11 module makes `import tidar_kernels._C` load
// the library (and the ops).
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

#include "bindings_common.h"
#include "kernels.h"

namespace tidar {
namespace {

constexpr binding::Target kCuda{c10::DeviceType::CUDA, "a CUDA tensor", "cuda"};

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

at::Tensor cached_attention_cuda(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                                 at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                 const std::optional<at::Tensor>& context_lens, int64_t layout, int64_t block_size,
                                 double scale, const std::optional<at::Tensor>& block_table) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor for the cuda backend, got device ", q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  auto launch = binding::prepare_decode(kCuda, q, k_new, v_new, k_cache, v_cache, cache_seqlens, context_lens,
                                        layout, block_size, scale, plan_device(q), block_table);
  if (launch.empty) return launch.out;
  binding::run_decode(q, launch.params, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return launch.out;
}

std::tuple<at::Tensor, at::Tensor> accept_drafts_cuda(const at::Tensor& drafts, const at::Tensor& draft_logits,
                                                      const at::Tensor& block_logits, at::Tensor& cache_seqlens,
                                                      const std::optional<at::Tensor>& active, double beta) {
  TORCH_CHECK(drafts.is_cuda(), "drafts must be a CUDA tensor for the cuda backend, got device ", drafts.device());
  const c10::cuda::CUDAGuard guard(drafts.device());
  auto launch = binding::prepare_accept(kCuda, drafts, draft_logits, block_logits, cache_seqlens, active, beta,
                                        num_sms(drafts));
  if (launch.empty) return {launch.accepted, launch.targets};
  run_accept_drafts(launch.params, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {launch.accepted, launch.targets};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tidar, m) {
  m.def(binding::decode_schema("_cuda").c_str());
  m.def(binding::accept_schema("_cuda").c_str());
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
