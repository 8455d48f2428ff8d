// Global average pooling over an NHWC (channels_last) tensor: out[n, c] = mean_{h,w} x[n, h, w, c].
//
// Mapping: one thread block per (image n, slab of channels): blockIdx.x = n, blockIdx.y = slab. Inside a block, threadIdx.x walks
// channels (VEC consecutive channels per thread, so a warp reads 32 * VEC * sizeof(T) contiguous
// bytes of one pixel) and threadIdx.y walks pixels with a stride of blockDim.y. Each thread keeps
// VEC float32 partial sums; the blockDim.y partial sums of a channel are reduced in shared memory.
// The summation order is fixed, so results are bitwise repeatable.
//
// VEC > 1 needs unit channel stride and 16-byte aligned pixel rows; the launcher checks both and
// takes the VEC = 1 path (plain strided loads) otherwise. Offsets are int64 throughout because
// N * H * W * C passes 2^31 for large batches.
#include "global_avg_pool.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

#include "elementwise.cuh"

namespace cnnfast {
namespace {

constexpr int kThreadsX = 32;  // one warp across channels
constexpr int kThreadsY = 8;   // pixels in flight per block

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreadsX * kThreadsY)
global_avg_pool_nhwc_kernel(const T* __restrict__ x, T* __restrict__ out,
                            int64_t C, int64_t H, int64_t W,
                            int64_t stride_n, int64_t stride_c, int64_t stride_h, int64_t stride_w,
                            int64_t out_stride_n, int64_t out_stride_c) {
  __shared__ float partial[kThreadsY][kThreadsX * VEC];

  const int64_t n = blockIdx.x;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * kThreadsX + threadIdx.x) * VEC;
  const int64_t pixels = H * W;
  const T* image = x + n * stride_n;

  float acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.f;

  for (int64_t p = threadIdx.y; p < pixels; p += kThreadsY) {
    const T* pixel = image + (p / W) * stride_h + (p % W) * stride_w;
    if constexpr (VEC > 1) {
      // The launcher guarantees C % VEC == 0, so a vector is either wholly in range or wholly out.
      if (c0 < C) {
        const Vec<T, VEC> v = *reinterpret_cast<const Vec<T, VEC>*>(pixel + c0);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += to_float(v.v[i]);
      }
    } else {
      if (c0 < C) acc[0] += to_float(pixel[c0 * stride_c]);
    }
  }

#pragma unroll
  for (int i = 0; i < VEC; ++i) partial[threadIdx.y][threadIdx.x * VEC + i] = acc[i];
  __syncthreads();

  // The first row of threads folds the kThreadsY partial sums of its channels.
  if (threadIdx.y != 0) return;
  const float inv_pixels = 1.f / static_cast<float>(pixels);
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const int64_t c = c0 + i;
    if (c >= C) break;
    float sum = 0.f;
#pragma unroll
    for (int y = 0; y < kThreadsY; ++y) sum += partial[y][threadIdx.x * VEC + i];
    out[n * out_stride_n + c * out_stride_c] = from_float<T>(sum * inv_pixels);
  }
}

template <typename T, int VEC>
void launch(const GlobalAvgPoolArgs& a, cudaStream_t stream) {
  const int64_t channels_per_block = kThreadsX * VEC;
  const dim3 grid(static_cast<unsigned>(a.N),
                  static_cast<unsigned>((a.C + channels_per_block - 1) / channels_per_block));
  const dim3 block(kThreadsX, kThreadsY);
  global_avg_pool_nhwc_kernel<T, VEC><<<grid, block, 0, stream>>>(
      reinterpret_cast<const T*>(a.x), reinterpret_cast<T*>(a.out), a.C, a.H, a.W,
      a.stride_n, a.stride_c, a.stride_h, a.stride_w, a.out_stride_n, a.out_stride_c);
}

// 16-byte vectors when the channel run of every pixel starts 16-byte aligned and C fills whole vectors.
template <typename T>
void dispatch_vec(const GlobalAvgPoolArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = a.x % 16 == 0 && a.stride_c == 1 && a.C % kVec == 0 &&
                       a.stride_n % kVec == 0 && a.stride_h % kVec == 0 && a.stride_w % kVec == 0;
  if (aligned) launch<T, kVec>(a, stream);
  else launch<T, 1>(a, stream);
}

}  // namespace

void global_avg_pool_nhwc(const GlobalAvgPoolArgs& a, cudaStream_t stream) {
  if (a.N == 0 || a.C == 0) return;
  // grid.x holds the batch (up to 2^31 - 1), grid.y the channel slabs (up to 65535).
  if (a.C > 65535LL * kThreadsX) throw std::invalid_argument("global_avg_pool: " + std::to_string(a.C) + " channels exceed the supported 2097120");
  launch_for_dtype(a.dtype, "global_avg_pool", [&](auto element) { dispatch_vec<decltype(element)>(a, stream); });
}

}  // namespace cnnfast
