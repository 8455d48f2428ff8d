// The classifier head: out[n, o] = bias[o] + sum_c mean_{h,w}(x[n, c, h, w]) * weight[o, c].
//
// Two launches rather than one fused kernel, because the two halves want different machines.
// Pooling reads all of x (51 MB for ResNet-50's head at batch 256 in bfloat16) and is bound by
// bandwidth: it needs every SM streaming x exactly once. The product is a small GEMM
// (N x C by C x O) that wants tensor-core tiles. Pooling inside the GEMM's operand loader re-reads x
// once per column of output tiles and leaves the pooling to a few hundred serial programs (the fused
// Triton kernel measured 0.07-0.26x of PyTorch on an H200 for that reason). The split costs the
// pooled matrix, N*C elements: 1 MB at batch 256, 2% of x.
//
// 1. global_avg_pool_nhwc (global_avg_pool.cu) writes pooled (N, C) rounded to x's dtype, as
//    PyTorch's mean -> linear rounds it before the product.
// 2. The product, accumulated in float32, plus the float32 bias, rounded once to the dtype:
//    - linear_few_rows_kernel, for float32 (no tensor cores: IEEE, as F.linear without TF32) and
//      for batches of at most kFewRowsMax: one warp per output feature o walks weight row o in
//      16-byte vectors and dots it with kRows pooled rows at a time (a grid row per group of kRows
//      images); the 32 lane sums are folded with shuffles. Weight is read once per row group, so
//      at batch 1 the kernel streams the weight once, spread over O warps.
//    - linear_wmma_kernel, for float16/bfloat16 batches above that: 64 x 64 output tiles
//      (blockIdx.x over O, blockIdx.y over N), 4 warps of 32 x 32 each as 2 x 2 wmma 16x16x16
//      fragments; operand tiles of 32 channels are staged in shared memory with 16-byte loads
//      (zero-filled past N, O and C); the epilogue goes through shared memory so that the bias add
//      and the stores run one output element per thread, coalesced along o.
// The summation order is fixed in both, so results are bitwise repeatable for a given shape (batches
// on either side of kFewRowsMax take different kernels, and so different orders). Offsets are int64.
#include "gap_linear.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "elementwise.cuh"
#include "global_avg_pool.h"

namespace cnnfast {
namespace {

constexpr int kRows = 8;              // pooled rows per warp in the few-rows kernel
constexpr int kWarpsPerBlock = 8;     // output features per block in the few-rows kernel
constexpr int64_t kFewRowsMax = 32;   // larger float16/bfloat16 batches use the tensor cores
constexpr int kMaxGridY = 65535;

template <typename T, int VEC>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
linear_few_rows_kernel(const T* __restrict__ pooled, const T* __restrict__ weight, const float* __restrict__ bias,
                       T* __restrict__ out, int64_t N, int64_t C, int64_t O) {
  const int lane = threadIdx.x % 32;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (o >= O) return;  // o is the same for the whole warp, so whole warps leave
  const T* w_row = weight + o * C;
  const float b = bias != nullptr ? bias[o] : 0.f;

  for (int64_t n0 = static_cast<int64_t>(blockIdx.y) * kRows; n0 < N; n0 += static_cast<int64_t>(gridDim.y) * kRows) {
    // Rows past N re-read the last row (branch-free) and are never stored.
    const int last = static_cast<int>(min(static_cast<int64_t>(kRows), N - n0)) - 1;
    const T* rows = pooled + n0 * C;
    float acc[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] = 0.f;
    // VEC > 1 needs C % VEC == 0 and aligned rows (the launcher checks), so a vector is whole.
    for (int64_t c = static_cast<int64_t>(lane) * VEC; c < C; c += 32 * VEC) {
      const Vec<T, VEC> w = *reinterpret_cast<const Vec<T, VEC>*>(w_row + c);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const Vec<T, VEC> p = *reinterpret_cast<const Vec<T, VEC>*>(rows + min(r, last) * C + c);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[r] += to_float(p.v[i]) * to_float(w.v[i]);
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float sum = warp_sum(acc[r]);
      if (lane == 0 && n0 + r < N) out[(n0 + r) * O + o] = from_float<T>(sum + b);
    }
  }
}

constexpr int kTileN = 64;     // output rows (images) per block
constexpr int kTileO = 64;     // output features per block
constexpr int kTileC = 32;     // channels per shared-memory stage
constexpr int kSkew = 8;       // keeps wmma rows 16-byte aligned while spreading them over banks
constexpr int kChunk = 8;      // elements per 16-byte load
constexpr int kWmmaThreads = 128;
static_assert(kTileN == kTileO, "one staging loop fills a_tile and b_tile row for row");

// Eight consecutive elements of row `row` of a dense (rows, C) matrix from column `col` into dst,
// zeros past the matrix's edge.
template <typename T>
__device__ __forceinline__ void stage_chunk(T* dst, const T* __restrict__ src, int64_t row, int64_t rows,
                                           int64_t col, int64_t C, bool vec) {
  if (vec && row < rows && col < C) {  // vec: C % 8 == 0, so the whole chunk is inside
    *reinterpret_cast<Vec<T, kChunk>*>(dst) = *reinterpret_cast<const Vec<T, kChunk>*>(src + row * C + col);
    return;
  }
#pragma unroll
  for (int i = 0; i < kChunk; ++i) dst[i] = row < rows && col + i < C ? src[row * C + col + i] : from_float<T>(0.f);
}

template <typename T>
__global__ void __launch_bounds__(kWmmaThreads)
linear_wmma_kernel(const T* __restrict__ pooled, const T* __restrict__ weight, const float* __restrict__ bias,
                   T* __restrict__ out, int64_t N, int64_t C, int64_t O, bool vec) {
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(32) T a_tile[kTileN][kTileC + kSkew];  // pooled rows
  __shared__ __align__(32) T b_tile[kTileO][kTileC + kSkew];  // weight rows = columns of weight^T
  __shared__ __align__(32) float c_tile[kTileN][kTileO + 4];

  const int64_t o_base = static_cast<int64_t>(blockIdx.x) * kTileO;
  const int warp = threadIdx.x / 32;
  const int warp_n = (warp / 2) * 32, warp_o = (warp % 2) * 32;

  // Row tiles beyond the grid's 65535 rows are taken in turn (the bound is the same for the whole block).
  for (int64_t n_base = static_cast<int64_t>(blockIdx.y) * kTileN; n_base < N;
       n_base += static_cast<int64_t>(gridDim.y) * kTileN) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

    for (int64_t c0 = 0; c0 < C; c0 += kTileC) {
      for (int chunk = threadIdx.x; chunk < kTileN * (kTileC / kChunk); chunk += kWmmaThreads) {
        const int row = chunk / (kTileC / kChunk), col = (chunk % (kTileC / kChunk)) * kChunk;
        stage_chunk(&a_tile[row][col], pooled, n_base + row, N, c0 + col, C, vec);
        stage_chunk(&b_tile[row][col], weight, o_base + row, O, c0 + col, C, vec);
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kTileC; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
        // weight^T (C x O) is column-major in weight's (O, C) rows: element (c, o) at b_tile[o][c].
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &a_tile[warp_n + 16 * i][k], kTileC + kSkew);
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &b_tile[warp_o + 16 * j][k], kTileC + kSkew);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&c_tile[warp_n + 16 * i][warp_o + 16 * j], acc[i][j], kTileO + 4, wmma::mem_row_major);
    __syncthreads();
    for (int e = threadIdx.x; e < kTileN * kTileO; e += kWmmaThreads) {
      const int row = e / kTileO, col = e % kTileO;
      const int64_t n = n_base + row, o = o_base + col;
      if (n < N && o < O) out[n * O + o] = from_float<T>(c_tile[row][col] + (bias != nullptr ? bias[o] : 0.f));
    }
    __syncthreads();  // c_tile is rewritten by the next row tile
  }
}

template <typename T>
void launch_linear(const GapLinearArgs& a, cudaStream_t stream) {
  const T* pooled = reinterpret_cast<const T*>(a.pooled);
  const T* weight = reinterpret_cast<const T*>(a.weight);
  const float* bias = reinterpret_cast<const float*>(a.bias);
  T* out = reinterpret_cast<T*>(a.out);
  if constexpr (!std::is_same_v<T, float>) {
    if (a.N > kFewRowsMax) {
      const bool vec = a.C % kChunk == 0 && a.weight % 16 == 0 && a.pooled % 16 == 0;
      const dim3 grid(static_cast<unsigned>((a.O + kTileO - 1) / kTileO),
                      static_cast<unsigned>(std::min<int64_t>((a.N + kTileN - 1) / kTileN, kMaxGridY)));
      linear_wmma_kernel<T><<<grid, kWmmaThreads, 0, stream>>>(pooled, weight, bias, out, a.N, a.C, a.O, vec);
      return;
    }
  }
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = a.C % kVec == 0 && a.weight % 16 == 0 && a.pooled % 16 == 0;
  const dim3 grid(static_cast<unsigned>((a.O + kWarpsPerBlock - 1) / kWarpsPerBlock),
                  static_cast<unsigned>(std::min<int64_t>((a.N + kRows - 1) / kRows, kMaxGridY)));
  if (vec) linear_few_rows_kernel<T, kVec><<<grid, 32 * kWarpsPerBlock, 0, stream>>>(pooled, weight, bias, out, a.N, a.C, a.O);
  else linear_few_rows_kernel<T, 1><<<grid, 32 * kWarpsPerBlock, 0, stream>>>(pooled, weight, bias, out, a.N, a.C, a.O);
}

}  // namespace

void gap_linear(const GapLinearArgs& a, cudaStream_t stream) {
  if (a.N == 0 || a.O == 0) return;
  if (a.O > static_cast<int64_t>(kWarpsPerBlock) * 2147483647LL)
    throw std::invalid_argument("gap_linear: " + std::to_string(a.O) + " output features are too many for one grid");
  const GlobalAvgPoolArgs pool{a.dtype, a.x, a.pooled, a.N, a.C, a.H, a.W,
                               a.stride_n, a.stride_c, a.stride_h, a.stride_w, /*out_stride_n=*/a.C, /*out_stride_c=*/1};
  global_avg_pool_nhwc(pool, stream);  // returns at once when C == 0: the product is then the bias
  launch_for_dtype(a.dtype, "gap_linear", [&](auto element) { launch_linear<decltype(element)>(a, stream); });
}

}  // namespace cnnfast
