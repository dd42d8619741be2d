// What the emulated kernels' translation unit (kernels_emulated.cpp) offers code that does not
// include the emulation itself (the torch binding, the sanitizer driver).
#pragma once

#include <cuda_runtime_api.h>

namespace tidar {

// The error of the last emulated launch, like cudaGetLastError (and reset it).
cudaError_t emulated_launch_error();

}  // namespace tidar
