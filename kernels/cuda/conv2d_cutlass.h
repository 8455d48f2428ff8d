// Fused 2-D convolution on NVIDIA CUTLASS (sm90 implicit GEMM): the launcher's arguments.
//
// out = relu?(conv2d(x, weight) + bias[k] + residual), accumulated and post-processed in float32.
// x is dense NHWC (channels_last), weight dense KRSC (a channels_last (K, C, R, S) tensor),
// residual dense NPQK, out NPQK with a pixel stride of out_pixel_stride >= K elements (K when
// dense; more when out is a channel slice of a wider channels_last tensor, as Inception's
// branches); bias is float32, length K. float16 and bfloat16 are compiled, and float32 computed
// as TF32.
// The declarations below do not need the CUTLASS headers; the kernels live in
// conv2d_cutlass_*.cu, which are only built when CUTLASS is found (CNNFAST_WITH_CUTLASS).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.h"

namespace cnnfast {

// The CUTLASS kernels conv2d_cutlass_launch can run (see conv2d_cutlass_kernel); kAuto lets it choose.
enum class Conv2dCutlassSchedule { kAuto, kFprop, kGemmPingpong };

struct Conv2dCutlassArgs {
  DType dtype;
  uintptr_t x;         // (N, H, W, C) dense, dtype
  uintptr_t weight;    // (K, R, S, C) dense, dtype
  uintptr_t bias;      // (K,) float32, or 0 for no bias
  uintptr_t residual;  // (N, P, Q, K) dense, dtype; used only when has_residual
  uintptr_t out;       // (N, P, Q, K), dtype, pixels out_pixel_stride elements apart
  int64_t N, C, H, W;
  int64_t K, R, S;
  int64_t pad_h, pad_w;
  int64_t stride_h, stride_w;
  int64_t dilation_h, dilation_w;
  int64_t out_pixel_stride;
  bool has_residual;
  bool relu;
  // kAuto: the rule of conv2d_cutlass_kernel. kFprop or kGemmPingpong force that kernel (for
  // measuring one against the other); the GEMM only where it applies, else invalid_argument.
  Conv2dCutlassSchedule schedule = Conv2dCutlassSchedule::kAuto;
};

// Output extent of one spatial dimension (PyTorch's formula, symmetric padding).
inline int64_t conv2d_cutlass_out_extent(int64_t in, int64_t pad, int64_t stride, int64_t dilation, int64_t filter) {
  return (in + 2 * pad - dilation * (filter - 1) - 1) / stride + 1;
}

// Throws std::invalid_argument naming the first thing the kernel does not support (dtype, C or K not
// a multiple of 16 bytes, misaligned pointers, TMA im2col limits on stride/padding/dilation), then
// asks CUTLASS's can_implement of the kernel conv2d_cutlass_kernel picks (host-side); needs no GPU.
void conv2d_cutlass_check(const Conv2dCutlassArgs& args);

// Runs the kernel conv2d_cutlass_kernel picks on `stream`, for args that conv2d_cutlass_check has
// accepted (the caller checks first, so that argument errors come before "no GPU" errors, and the
// checks, CUTLASS's can_implement among them, run once a call). CUTLASS errors become
// std::runtime_error. A build without CUTLASS throws std::runtime_error saying so.
void conv2d_cutlass_launch(const Conv2dCutlassArgs& args, cudaStream_t stream);

// Which CUTLASS kernel conv2d_cutlass_launch runs, and its CTA tile (M pixels, N output channels, K
// reduction elements per stage):
//   kFprop: the sm90 implicit-GEMM convolution (conv2d_cutlass.cuh), N = 128, or 64 for
//     float16/bfloat16 with ReLU when K <= 64, where a 128-wide tile would leave half or more of
//     its columns idle. (For K = 192, 320, ... a 64-wide tile would also idle fewer columns, but it
//     reads each input tile more often; that trade is left to a measurement.) The 64-wide tile is
//     compiled for the ReLU epilogue only, that of the conv+BN+ReLU layers; the K <= 64 convs without
//     ReLU (the pre-activation blocks') keep the 128-wide tile, so each 64-wide kernel costs one
//     compile, not two.
//   kGemmPingpong: 1x1, stride-1, unpadded convolutions with ReLU and K > 64 in float16/bfloat16, a
//     GEMM on the persistent ping-pong kernel (conv2d_cutlass_gemm.cuh), 128 x 128 x 64 per warp group.
// A schedule requested in args overrides the rule: kFprop always applies (with the tile width
// above); kGemmPingpong only where the GEMM does, else std::invalid_argument says why.
// Reads dtype, K, R, S, stride, padding, relu and schedule of args; needs no pointers and no GPU.
struct Conv2dCutlassKernel {
  Conv2dCutlassSchedule schedule;
  int m, n, k;
};
Conv2dCutlassKernel conv2d_cutlass_kernel(const Conv2dCutlassArgs& args);
const char* conv2d_cutlass_schedule_name(Conv2dCutlassSchedule schedule);  // "auto", "fprop", "gemm-pingpong"

// The kernels, args already checked: with launch = false they only ask CUTLASS's can_implement (on
// the host), and throw std::invalid_argument if it refuses (conv2d_cutlass_check's last step); with
// launch = true they run, trusting that check. The fprop with 128-wide tiles, both activations:
// conv2d_cutlass_{f16,bf16,tf32}.cu; with 64-wide tiles and ReLU: conv2d_cutlass_n64_relu.cu; the 1x1
// GEMM with ReLU: conv2d_cutlass_gemm_{f16,bf16}.cu.
void conv2d_cutlass_f16(const Conv2dCutlassArgs& args, cudaStream_t stream, bool launch);
void conv2d_cutlass_bf16(const Conv2dCutlassArgs& args, cudaStream_t stream, bool launch);
void conv2d_cutlass_tf32(const Conv2dCutlassArgs& args, cudaStream_t stream, bool launch);
void conv2d_cutlass_f16_n64_relu(const Conv2dCutlassArgs& args, cudaStream_t stream, bool launch);
void conv2d_cutlass_bf16_n64_relu(const Conv2dCutlassArgs& args, cudaStream_t stream, bool launch);
void conv2d_cutlass_gemm_f16_relu(const Conv2dCutlassArgs& args, cudaStream_t stream, bool launch);
void conv2d_cutlass_gemm_bf16_relu(const Conv2dCutlassArgs& args, cudaStream_t stream, bool launch);

}  // namespace cnnfast
