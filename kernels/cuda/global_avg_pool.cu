// Global average pooling over an NHWC (channels_last) tensor: out[n, c] = mean_{h,w} x[n, h, w, c].
//
// Mapping: one thread block per (image n, slab of channels): blockIdx.x = n, blockIdx.y = slab.
// Inside a block, threadIdx.x walks channels (VEC consecutive channels per thread) and
// threadIdx.y walks pixels with a stride of blockDim.y. With 16-byte vectors a block is 8 x 32
// threads: a slab is 8 * VEC channels (64 in 16-bit types), so 8 threads read one pixel's slab as
// one 128-byte run, a warp reads 4 pixels, and a block keeps 32 pixels in flight. Narrow slabs
// give N * C / 64 blocks, enough to fill the GPU even at N = 64 with C = 256 (a 56x56 map), and
// the pixel loop is unrolled so that each thread has several loads in flight. The scalar path
// (VEC = 1, for strided or misaligned inputs) is 32 x 8 threads, a warp across 32 channels.
//
// NCHW inputs (each channel's H x W plane contiguous: PyTorch's default layout) go to
// global_avg_pool_planes_kernel instead, where a warp walks one plane, 32 consecutive pixels per
// step, and folds its lanes with shuffles; a channel-wide warp would read 32 planes at once, one
// element from each.
//
// Each thread keeps VEC float32 partial sums; the blockDim.y partial sums of each channel are
// folded in shared memory by all threads, in a fixed order, so results are bitwise repeatable.
// VEC > 1 needs unit channel stride and 16-byte aligned pixel rows; the launcher checks both and
// takes the VEC = 1 path otherwise. Offsets are int64 because N * H * W * C passes 2^31 for
// large batches; pixel indices within one image are int32 (the launcher checks H * W < 2^31 - 64).
#include "global_avg_pool.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

#include "elementwise.cuh"

namespace cnnfast {
namespace {

template <int VEC>
struct PoolShape {
  static constexpr int kLanesC = VEC > 1 ? 8 : 32;   // threads across channels
  static constexpr int kRowsP = VEC > 1 ? 32 : 8;    // threads across pixels
  static constexpr int kThreads = kLanesC * kRowsP;  // 256
  static constexpr int kChannels = kLanesC * VEC;    // channels per block
  // The fold: kGroups threads per channel each sum kRowsP / kGroups partial rows, then one sums the groups.
  static constexpr int kGroups = kThreads / kChannels;
  static_assert(kThreads % kChannels == 0 && kRowsP % kGroups == 0, "the fold must tile the partial sums");
};

template <typename T, int VEC>
__global__ void __launch_bounds__(PoolShape<VEC>::kThreads)
global_avg_pool_nhwc_kernel(const T* __restrict__ x, T* __restrict__ out,
                            int64_t C, int H, int W,
                            int64_t stride_n, int64_t stride_c, int64_t stride_h, int64_t stride_w,
                            int64_t out_stride_n, int64_t out_stride_c) {
  using Shape = PoolShape<VEC>;
  __shared__ float partial[Shape::kRowsP][Shape::kChannels];
  __shared__ float group_sums[Shape::kGroups][Shape::kChannels];

  const int64_t n = blockIdx.x;
  const int64_t slab = static_cast<int64_t>(blockIdx.y) * Shape::kChannels;
  const int64_t c0 = slab + threadIdx.x * VEC;
  const int pixels = H * W;
  const T* image = x + n * stride_n;

  float acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.f;

  if (c0 < C) {  // with VEC > 1 the launcher guarantees C % VEC == 0: a vector is wholly in range
#pragma unroll 4
    for (int p = threadIdx.y; p < pixels; p += Shape::kRowsP) {
      const int h = p / W;
      const T* pixel = image + h * stride_h + (p - h * W) * stride_w;
      if constexpr (VEC > 1) {
        const Vec<T, VEC> v = *reinterpret_cast<const Vec<T, VEC>*>(pixel + c0);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += to_float(v.v[i]);
      } else {
        acc[0] += to_float(pixel[c0 * stride_c]);
      }
    }
  }

#pragma unroll
  for (int i = 0; i < VEC; ++i) partial[threadIdx.y][threadIdx.x * VEC + i] = acc[i];
  __syncthreads();

  const int tid = threadIdx.y * Shape::kLanesC + threadIdx.x;
  const int channel = tid % Shape::kChannels, group = tid / Shape::kChannels;
  constexpr int kRowsPerGroup = Shape::kRowsP / Shape::kGroups;
  float sum = 0.f;
#pragma unroll
  for (int r = 0; r < kRowsPerGroup; ++r) sum += partial[group * kRowsPerGroup + r][channel];
  group_sums[group][channel] = sum;
  __syncthreads();

  if (tid >= Shape::kChannels || slab + channel >= C) return;
  float total = 0.f;
#pragma unroll
  for (int g = 0; g < Shape::kGroups; ++g) total += group_sums[g][channel];
  out[n * out_stride_n + (slab + channel) * out_stride_c] = from_float<T>(total / static_cast<float>(pixels));
}

constexpr int kPlanesPerBlock = 8;  // one warp per (n, c) plane

template <typename T>
__global__ void __launch_bounds__(32 * kPlanesPerBlock)
global_avg_pool_planes_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t N, int64_t C, int pixels,
                              int64_t stride_n, int64_t stride_c, int64_t out_stride_n, int64_t out_stride_c) {
  const int64_t plane = static_cast<int64_t>(blockIdx.x) * kPlanesPerBlock + threadIdx.x / 32;
  if (plane >= N * C) return;  // the same for the whole warp, so whole warps leave
  const int lane = threadIdx.x % 32;
  const int64_t n = plane / C, c = plane % C;
  const T* pixel = x + n * stride_n + c * stride_c;
  float acc = 0.f;
#pragma unroll 4
  for (int p = lane; p < pixels; p += 32) acc += to_float(pixel[p]);
  acc = warp_sum(acc);
  if (lane == 0) out[n * out_stride_n + c * out_stride_c] = from_float<T>(acc / static_cast<float>(pixels));
}

template <typename T>
void launch_planes(const GlobalAvgPoolArgs& a, cudaStream_t stream) {
  const int64_t blocks = (a.N * a.C + kPlanesPerBlock - 1) / kPlanesPerBlock;
  if (blocks > 2147483647LL)
    throw std::invalid_argument("global_avg_pool: " + std::to_string(a.N * a.C) + " planes are too many for one grid");
  global_avg_pool_planes_kernel<T><<<static_cast<unsigned>(blocks), 32 * kPlanesPerBlock, 0, stream>>>(
      reinterpret_cast<const T*>(a.x), reinterpret_cast<T*>(a.out), a.N, a.C, static_cast<int>(a.H * a.W),
      a.stride_n, a.stride_c, a.out_stride_n, a.out_stride_c);
}

template <typename T, int VEC>
void launch(const GlobalAvgPoolArgs& a, cudaStream_t stream) {
  using Shape = PoolShape<VEC>;
  // grid.x holds the batch (up to 2^31 - 1), grid.y the channel slabs (up to 65535).
  const int64_t slabs = (a.C + Shape::kChannels - 1) / Shape::kChannels;
  if (slabs > 65535)
    throw std::invalid_argument("global_avg_pool: " + std::to_string(a.C) + " channels exceed the supported " +
                                std::to_string(65535LL * Shape::kChannels));
  const dim3 grid(static_cast<unsigned>(a.N), static_cast<unsigned>(slabs));
  const dim3 block(Shape::kLanesC, Shape::kRowsP);
  global_avg_pool_nhwc_kernel<T, VEC><<<grid, block, 0, stream>>>(
      reinterpret_cast<const T*>(a.x), reinterpret_cast<T*>(a.out), a.C, static_cast<int>(a.H), static_cast<int>(a.W),
      a.stride_n, a.stride_c, a.stride_h, a.stride_w, a.out_stride_n, a.out_stride_c);
}

// 16-byte vectors when the channel run of every pixel starts 16-byte aligned and C fills whole
// vectors (the stride of a size-1 dimension is never stepped, whatever it is: an NCHW N x C x 1 x 1
// tensor qualifies); the plane kernel when each channel's pixels are contiguous (NCHW) and a map
// has more than one pixel; the scalar channel-wide kernel otherwise.
template <typename T>
void dispatch(const GlobalAvgPoolArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const auto steps_aligned = [](int64_t size, int64_t stride) { return size == 1 || stride % kVec == 0; };
  const bool aligned = a.x % 16 == 0 && a.stride_c == 1 && a.C % kVec == 0 && steps_aligned(a.N, a.stride_n) &&
                       steps_aligned(a.H, a.stride_h) && steps_aligned(a.W, a.stride_w);
  const bool planes = a.H * a.W > 1 && (a.W == 1 || a.stride_w == 1) && (a.H == 1 || a.stride_h == a.W);
  if (aligned) launch<T, kVec>(a, stream);
  else if (planes) launch_planes<T>(a, stream);
  else launch<T, 1>(a, stream);
}

}  // namespace

void global_avg_pool_nhwc(const GlobalAvgPoolArgs& a, cudaStream_t stream) {
  if (a.N == 0 || a.C == 0) return;
  if (a.N > 2147483647LL)
    throw std::invalid_argument("global_avg_pool: batch " + std::to_string(a.N) + " exceeds the supported 2^31 - 1");
  // The pixel loop steps an int index by up to 32 past the last pixel.
  if (a.H * a.W > 2147483647LL - 64)
    throw std::invalid_argument("global_avg_pool: an H x W map of " + std::to_string(a.H * a.W) +
                                " pixels exceeds the supported 2^31 - 65");
  launch_for_dtype(a.dtype, "global_avg_pool", [&](auto element) { dispatch<decltype(element)>(a, stream); });
}

}  // namespace cnnfast
