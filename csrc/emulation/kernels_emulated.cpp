// The CUDA kernel sources, unchanged, compiled by the host compiler: csrc/ptx.cuh then maps
// every PTX instruction and CUDA built-in to the CPU emulation (emulation.h). One translation
// unit for the emulated extension and the sanitizer driver.
#include "../accept_drafts.cu"
#include "../decode_attention_bf16_hd128.cu"
#include "../decode_attention_bf16_hd64.cu"
#include "../decode_attention_fp16_hd128.cu"
#include "../decode_attention_fp16_hd64.cu"

#include "emulation_api.h"

namespace tidar {
cudaError_t emulated_launch_error() { return emu::take_last_error(); }
}  // namespace tidar
