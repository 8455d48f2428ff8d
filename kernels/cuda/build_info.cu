#include "build_info.h"

#include <cuda_runtime.h>

namespace cnnfast {

const char* kernels_cuda_architectures() { return CNNFAST_CUDA_ARCHITECTURES; }

int kernels_cuda_runtime_version() { return CUDART_VERSION; }

bool kernels_with_cutlass() {
#if defined(CNNFAST_WITH_CUTLASS)
  return true;
#else
  return false;
#endif
}

}  // namespace cnnfast
