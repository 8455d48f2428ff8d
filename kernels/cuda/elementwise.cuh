// What the memory-bound kernels share: float32 conversions, 16-byte vectors, and the host-side
// dispatch from a DType to the element type plus the launch-error check.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "dtype.h"

namespace cnnfast {

template <typename T> __device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The sum of v over the 32 lanes of a warp, in lane 0 (a fixed shuffle order: repeatable bits).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// VEC elements of T loaded or stored as one aligned vector.
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Vec { T v[VEC]; };

// Calls launch(T{}) with T the element type of `dtype`, then raises if the launch failed.
template <typename Launch>
void launch_for_dtype(DType dtype, const char* op, Launch&& launch) {
  switch (dtype) {
    case DType::kFloat32: launch(float{}); break;
    case DType::kFloat16: launch(__half{}); break;
    case DType::kBFloat16: launch(__nv_bfloat16{}); break;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(op) + " launch failed: " + cudaGetErrorString(err));
}

}  // namespace cnnfast
