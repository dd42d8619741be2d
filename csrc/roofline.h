// Roofline cost model of a cached-attention launch: the C++ mirror of
// tidar_kernels/kernels/roofline.py (same formulas, same order of operations, so both pick
// the same plan; checked by CTest on cases exported from Python,
// python_tests/helpers/decode_plan_cases.py -> csrc/tests/decode_plan_cases.txt).
// Plain C++ (no CUDA, no torch): the host planner and its test include it.
#pragma once

#include <algorithm>
#include <cstring>

namespace tidar {
namespace roofline {

constexpr int kWarpsForPeak = 8;  // an SM reaches its peak with two warpgroups resident
constexpr int kRegistersPerSm = 65536;
constexpr int kRegistersPerThread = 256;  // the 255-register cap, ptxas' worst case
constexpr int kSmemReservedPerCta = 1024;
constexpr int kMaxCtasPerSm = 32;
constexpr int kFp32Bytes = 4;
// On a compute-bound step, the fastest plan whose split partials move no more than the step's
// ideal bytes is taken when modelled at most this factor slower than the fastest plan: the
// mirror of PARTIAL_SLACK in tidar_kernels/kernels/roofline.py, where the reason for 1.25 is given.
constexpr double kPartialSlack = 1.25;

struct Device {
  double tensor_flops;     // dense fp16/bf16 tensor-core FLOP/s
  double hbm_bytes_per_s;  // HBM bandwidth
  int sm_count;
  int smem_per_sm;  // bytes of shared memory an SM gives its resident CTAs

  double ridge() const { return tensor_flops / hbm_bytes_per_s; }  // FLOP per byte: compute-bound above
};

inline constexpr Device kH100{989e12, 3.35e12, 132, 228 * 1024};
inline constexpr Device kH200{989e12, 4.8e12, 132, 228 * 1024};
inline constexpr Device kA100{312e12, 2.039e12, 108, 164 * 1024};

// Known figures for a device name ("NVIDIA H100 80GB HBM3", "NVIDIA H200") with the
// same SM count; otherwise this GPU's SMs and shared memory with an H100 SM's rates.
inline Device device_for(const char* name, int sm_count, int smem_per_sm) {
  if (std::strstr(name, "H200") != nullptr && kH200.sm_count == sm_count) return kH200;
  if (std::strstr(name, "H100") != nullptr && std::strstr(name, "HBM3") != nullptr && kH100.sm_count == sm_count)
    return kH100;
  return Device{kH100.tensor_flops / kH100.sm_count * sm_count, kH100.hbm_bytes_per_s / kH100.sm_count * sm_count,
                sm_count, smem_per_sm};
}

inline int ctas_per_sm(const Device& device, int smem_per_cta, int warps) {
  const int by_smem = device.smem_per_sm / (smem_per_cta + kSmemReservedPerCta);
  const int by_registers = kRegistersPerSm / (warps * 32 * kRegistersPerThread);
  return std::max(1, std::min({by_smem, by_registers, kMaxCtasPerSm}));
}

// Fraction of the GPU's peak a launch of `ctas` equal CTAs gets.
inline double utilisation(const Device& device, long long ctas, int warps, int smem_per_cta) {
  const long long per_sm = (ctas + device.sm_count - 1) / device.sm_count;
  const long long resident = std::min<long long>(per_sm, ctas_per_sm(device, smem_per_cta, warps));
  const double rate = std::min(1.0, static_cast<double>(resident * warps) / kWarpsForPeak);
  return static_cast<double>(ctas) / static_cast<double>(per_sm * device.sm_count) * rate;
}

struct CachedStep {
  int batch, num_rows, q_heads, kv_heads, head_dim, max_len, rows_written, elem_bytes;

  int packed_rows() const { return num_rows * (q_heads / kv_heads); }
  double flops() const { return 4.0 * batch * q_heads * num_rows * max_len * head_dim; }
  double padded_flops(int block_m) const {
    const long long tiles = (packed_rows() + block_m - 1) / block_m;
    return 4.0 * batch * kv_heads * tiles * block_m * (static_cast<long long>(max_len) + num_rows) * head_dim;
  }
  double ideal_bytes() const {
    const long long rows = 2LL * kv_heads * max_len + 2LL * num_rows * q_heads + 2LL * num_rows * kv_heads +
                           2LL * rows_written * kv_heads;
    return static_cast<double>(static_cast<long long>(elem_bytes) * batch * head_dim * rows);
  }
  // Partial outputs (partial_elem_bytes per element) and fp32 log-sum-exps, written and read.
  double partial_bytes(int partials, int partial_elem_bytes) const {
    return 2.0 * partials * batch * kv_heads * packed_rows() * (partial_elem_bytes * head_dim + kFp32Bytes);
  }
};

inline bool compute_bound(const CachedStep& step, const Device& device) {
  return step.flops() / step.ideal_bytes() > device.ridge();
}

struct CachedKernel {
  int block_m;
  int warps;
  int smem_bytes;
  bool local_split;        // step-local keys in an extra split; every split writes partials
  int partial_elem_bytes;  // bytes per element of the partial outputs
};

struct Estimate {
  double seconds;
  double partial_bytes;
  long long ctas;
};

inline Estimate estimate(const CachedStep& step, const CachedKernel& kernel, int splits, const Device& device) {
  const long long tiles = (step.packed_rows() + kernel.block_m - 1) / kernel.block_m;
  const long long ctas = static_cast<long long>(splits) * tiles * step.batch * step.kv_heads;
  const int partials = kernel.local_split ? splits + 1 : (splits > 1 ? splits : 0);
  const double partial = step.partial_bytes(partials, kernel.partial_elem_bytes);
  const double used = utilisation(device, ctas, kernel.warps, kernel.smem_bytes);
  const double compute = step.padded_flops(kernel.block_m) / (device.tensor_flops * used);
  const double memory = (step.ideal_bytes() + partial / 2) / (device.hbm_bytes_per_s * used);
  const double main = std::max(compute, memory);
  const double merge = partial / 2 / device.hbm_bytes_per_s;
  return Estimate{main + merge, partial, ctas};
}

// Splits of least modelled time for one kernel (ties: fewer splits), each split getting at
// least min_keys_per_split rows of a full cache; on a compute-bound step, the fastest split
// count whose partials move at most the step's ideal bytes instead when its time is within
// partial_slack (>= 1) of the least.
inline int plan_splits(const CachedStep& step, const CachedKernel& kernel, const Device& device, int max_splits,
                       int min_keys_per_split, double partial_slack) {
  const int most = std::max(1, std::min(max_splits, step.max_len / min_keys_per_split));
  int best = 0, lean = 0;  // 0: none yet
  double best_seconds = 0, lean_seconds = 0;
  for (int splits = 1; splits <= most; ++splits) {
    const Estimate guess = estimate(step, kernel, splits, device);
    if (best == 0 || guess.seconds < best_seconds) best = splits, best_seconds = guess.seconds;
    if (guess.partial_bytes <= step.ideal_bytes() && (lean == 0 || guess.seconds < lean_seconds))
      lean = splits, lean_seconds = guess.seconds;
  }
  if (partial_slack > 1.0 && compute_bound(step, device) && lean != 0 && lean_seconds <= partial_slack * best_seconds)
    return lean;
  return best;
}

}  // namespace roofline
}  // namespace tidar
