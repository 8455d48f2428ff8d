// The classifier head, linear(global_avg_pool(x)): the launcher's arguments.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.h"

namespace cnnfast {

struct GapLinearArgs {
  DType dtype;
  uintptr_t x;       // (N, C, H, W), any strides, dtype
  uintptr_t weight;  // (O, C) dense row-major, dtype
  uintptr_t bias;    // (O,) float32, or 0 for no bias
  uintptr_t pooled;  // (N, C) dense scratch, dtype: the pooled features
  uintptr_t out;     // (N, O) dense, dtype
  int64_t N, C, H, W, O;
  int64_t stride_n, stride_c, stride_h, stride_w;  // of x, in elements
};

// Pools x into `pooled` (rounded to dtype, as PyTorch's mean -> linear does), then out = pooled @ weight^T + bias
// with float32 accumulation; two launches on `stream`, both with a fixed summation order.
void gap_linear(const GapLinearArgs& args, cudaStream_t stream);

}  // namespace cnnfast
