// fp16 / bf16 bit patterns <-> float on the host, shared by the emulation (mma operands), the
// sanitizer driver and the primitive tests. Round to nearest even, as __float2half_rn /
// __float2bfloat16_rn; widening is exact.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

namespace tidar {
namespace emu {

inline uint16_t float_to_b16(float x, bool bf16) {
  uint16_t bits;
  if (bf16) {
    const __nv_bfloat16 h = __float2bfloat16_rn(x);
    std::memcpy(&bits, &h, 2);
  } else {
    const __half h = __float2half_rn(x);
    std::memcpy(&bits, &h, 2);
  }
  return bits;
}

inline float b16_to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    const uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &wide, 4);
    return f;
  }
  __half h;
  std::memcpy(static_cast<void*>(&h), &bits, 2);
  return __half2float(h);
}

}  // namespace emu
}  // namespace tidar
