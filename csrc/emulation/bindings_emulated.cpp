// Torch binding of the emulated kernels (the "cuda_emulated" backend): the CUDA kernel sources
// compiled for the host (kernels_emulated.cpp) behind the same checks and launch parameters as
// the CUDA backend (bindings_common.h), on CPU tensors.
//
// Registers tidar::cached_attention_cuda_emulated and tidar::accept_drafts_cuda_emulated for
// the CPU; fakes in tidar_kernels/kernels/backends/cuda_emulated_ops.py.
#include <torch/extension.h>
#include <torch/library.h>

#include "../bindings_common.h"
#include "../kernels.h"
#include "emulation_api.h"

namespace tidar {
namespace {

constexpr binding::Target kEmulated{c10::DeviceType::CPU, "a CPU tensor", "cuda_emulated"};
// The planners see the GPU the kernels target (an H100 SXM: its roofline figures for the
// decode splits, its 132 SMs for the accept chunks); tests force other split counts
// through TIDAR_FORCE_DECODE_SPLITS.
constexpr int kEmulatedSms = 132;

void check_launch() {
  const cudaError_t error = emulated_launch_error();
  TORCH_CHECK(error == cudaSuccess, "emulated kernel launch failed: error ", static_cast<int>(error),
              " (invalid launch configuration or shared memory size)");
}

at::Tensor cached_attention_cuda_emulated(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                                          at::Tensor& k_cache, at::Tensor& v_cache,
                                          const at::Tensor& cache_seqlens,
                                          const std::optional<at::Tensor>& context_lens, int64_t layout,
                                          int64_t block_size, double scale,
                                          const std::optional<at::Tensor>& block_table) {
  auto launch = binding::prepare_decode(kEmulated, q, k_new, v_new, k_cache, v_cache, cache_seqlens, context_lens,
                                        layout, block_size, scale, roofline::kH100, block_table);
  if (launch.empty) return launch.out;
  binding::run_decode(q, launch.params, nullptr);
  check_launch();
  return launch.out;
}

std::tuple<at::Tensor, at::Tensor> accept_drafts_cuda_emulated(const at::Tensor& drafts,
                                                               const at::Tensor& draft_logits,
                                                               const at::Tensor& block_logits,
                                                               at::Tensor& cache_seqlens,
                                                               const std::optional<at::Tensor>& active, double beta) {
  auto launch = binding::prepare_accept(kEmulated, drafts, draft_logits, block_logits, cache_seqlens, active, beta,
                                        kEmulatedSms);
  if (launch.empty) return {launch.accepted, launch.targets};
  run_accept_drafts(launch.params, nullptr);
  check_launch();
  return {launch.accepted, launch.targets};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tidar, m) {
  m.def(binding::decode_schema("_cuda_emulated").c_str());
  m.def(binding::accept_schema("_cuda_emulated").c_str());
}

TORCH_LIBRARY_IMPL(tidar, CPU, m) {
  m.impl("cached_attention_cuda_emulated", &cached_attention_cuda_emulated);
  m.impl("accept_drafts_cuda_emulated", &accept_drafts_cuda_emulated);
}

}  // namespace tidar

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tidar-kernels emulated CUDA kernels: registers the tidar::*_cuda_emulated ops (CPU) on import";
}
