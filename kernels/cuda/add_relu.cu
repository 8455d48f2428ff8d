// out = relu?(x + y), memory-bound: its speed is the bandwidth it reaches.
//
// Two kernels. When x, y and out share one dense layout (all channels_last, or all NCHW), element
// i of each sits at offset i from its pointer, so the flat kernel walks numel elements as one array
// with a grid-stride loop, VEC elements (16 bytes) per load when all three pointers are 16-byte
// aligned, one otherwise. Any other strides take the strided kernel: one element per thread, the
// linear index decoded in (n, h, w, c) order (c fastest, so a warp reads consecutive channels of a
// channels_last tensor) and each tensor addressed through its own strides.
//
// The sum is taken in float32 and rounded once; the ReLU is a select (NaN < 0 is false, so NaN
// passes through as in torch.relu). RELU is a template parameter, not a branch in the loop.
// Offsets are int64: N * C * H * W passes 2^31 on large batches.
#include "add_relu.h"

#include <algorithm>
#include <array>
#include <numeric>
#include <stdexcept>
#include <string>

#include "elementwise.cuh"

namespace cnnfast {
namespace {

constexpr int kThreads = 256;

template <bool RELU>
__device__ __forceinline__ float add_act(float a, float b) {
  const float s = a + b;
  return RELU ? (s < 0.f ? 0.f : s) : s;
}

template <typename T, int VEC, bool RELU>
__global__ void __launch_bounds__(kThreads)
add_relu_flat_kernel(const T* __restrict__ x, const T* __restrict__ y, T* __restrict__ out, int64_t numel) {
  const int64_t vectors = numel / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; v < vectors; v += stride) {
    const Vec<T, VEC> a = reinterpret_cast<const Vec<T, VEC>*>(x)[v];
    const Vec<T, VEC> b = reinterpret_cast<const Vec<T, VEC>*>(y)[v];
    Vec<T, VEC> r;
#pragma unroll
    for (int i = 0; i < VEC; ++i) r.v[i] = from_float<T>(add_act<RELU>(to_float(a.v[i]), to_float(b.v[i])));
    reinterpret_cast<Vec<T, VEC>*>(out)[v] = r;
  }
  // The last numel % VEC elements, one per thread of the first block.
  const int64_t tail = vectors * VEC + threadIdx.x;
  if (blockIdx.x == 0 && tail < numel) out[tail] = from_float<T>(add_act<RELU>(to_float(x[tail]), to_float(y[tail])));
}

template <typename T, bool RELU>
__global__ void __launch_bounds__(kThreads)
add_relu_strided_kernel(const T* __restrict__ x, const T* __restrict__ y, T* __restrict__ out, AddReluArgs a) {
  const int64_t numel = a.sizes[0] * a.sizes[1] * a.sizes[2] * a.sizes[3];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < numel; i += stride) {
    int64_t rest = i;
    const int64_t c = rest % a.sizes[1];
    rest /= a.sizes[1];
    const int64_t w = rest % a.sizes[3];
    rest /= a.sizes[3];
    const int64_t h = rest % a.sizes[2];
    const int64_t n = rest / a.sizes[2];
    const auto offset = [&](const int64_t* s) { return n * s[0] + c * s[1] + h * s[2] + w * s[3]; };
    out[offset(a.out_strides)] = from_float<T>(add_act<RELU>(to_float(x[offset(a.x_strides)]), to_float(y[offset(a.y_strides)])));
  }
}

// Whether the strides describe a dense layout (some permutation of the dimensions, contiguous).
bool dense(const int64_t* sizes, const int64_t* strides) {
  std::array<int, 4> order;
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int p, int q) { return strides[p] < strides[q]; });
  int64_t expected = 1;
  for (int d : order) {
    if (sizes[d] == 1) continue;
    if (strides[d] != expected) return false;
    expected *= sizes[d];
  }
  return true;
}

int blocks_for(int64_t work) {
  // Enough blocks to fill every SM several times over; the grid-stride loops cover the rest.
  return static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, 132LL * 16));
}

template <typename T, bool RELU>
void launch(const AddReluArgs& a, cudaStream_t stream) {
  const int64_t numel = a.sizes[0] * a.sizes[1] * a.sizes[2] * a.sizes[3];
  const T* x = reinterpret_cast<const T*>(a.x);
  const T* y = reinterpret_cast<const T*>(a.y);
  T* out = reinterpret_cast<T*>(a.out);
  const bool same_strides = std::equal(a.x_strides, a.x_strides + 4, a.y_strides) &&
                            std::equal(a.x_strides, a.x_strides + 4, a.out_strides);
  const bool flat = same_strides && dense(a.sizes, a.x_strides);
  if (!flat) {
    add_relu_strided_kernel<T, RELU><<<blocks_for(numel), kThreads, 0, stream>>>(x, y, out, a);
    return;
  }
  constexpr int kVec = 16 / sizeof(T);
  if (a.x % 16 == 0 && a.y % 16 == 0 && a.out % 16 == 0) {
    add_relu_flat_kernel<T, kVec, RELU><<<blocks_for(numel / kVec + 1), kThreads, 0, stream>>>(x, y, out, numel);
  } else {
    add_relu_flat_kernel<T, 1, RELU><<<blocks_for(numel), kThreads, 0, stream>>>(x, y, out, numel);
  }
}

template <typename T>
void dispatch_relu(const AddReluArgs& a, cudaStream_t stream) {
  if (a.relu) launch<T, true>(a, stream);
  else launch<T, false>(a, stream);
}

}  // namespace

void add_relu(const AddReluArgs& a, cudaStream_t stream) {
  if (a.sizes[0] * a.sizes[1] * a.sizes[2] * a.sizes[3] == 0) return;
  launch_for_dtype(a.dtype, "add_relu", [&](auto element) { dispatch_relu<decltype(element)>(a, stream); });
}

}  // namespace cnnfast
