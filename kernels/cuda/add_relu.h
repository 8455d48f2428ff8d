// Residual add with optional ReLU over (N, C, H, W) tensors of any strides: the launcher's arguments.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.h"

namespace cnnfast {

struct AddReluArgs {
  DType dtype;
  uintptr_t x, y, out;                // device pointers, same dtype
  int64_t sizes[4];        // N, C, H, W
  int64_t x_strides[4];    // in elements, in (N, C, H, W) order
  int64_t y_strides[4];
  int64_t out_strides[4];
  bool relu;
};

void add_relu(const AddReluArgs& args, cudaStream_t stream);

}  // namespace cnnfast
