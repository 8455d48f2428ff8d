// Global average pooling over NHWC: the launcher's argument block, shared by the kernel and bindings.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.h"

namespace cnnfast {

struct GlobalAvgPoolArgs {
  DType dtype;
  uintptr_t x;    // device pointer to the input, logical (N, C, H, W), any strides
  uintptr_t out;  // device pointer to the output, (N, C), same dtype as x
  int64_t N, C, H, W;
  int64_t stride_n, stride_c, stride_h, stride_w;  // in elements
  int64_t out_stride_n, out_stride_c;              // in elements
};

void global_avg_pool_nhwc(const GlobalAvgPoolArgs& args, cudaStream_t stream);

}  // namespace cnnfast
