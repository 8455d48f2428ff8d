// conv2d_cutlass: checks what the CUTLASS kernels support, picks one (conv2d_cutlass_kernel) and runs it.
// This file does not include CUTLASS (it compiles in seconds); the kernels are in
// conv2d_cutlass_*.cu, built only when CMake found the CUTLASS headers.
#include "conv2d_cutlass.h"

#include <sstream>
#include <stdexcept>
#include <string>

namespace cnnfast {

#define CONV_CHECK(cond, msg)                                                  \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::ostringstream os_;                                                  \
      os_ << "conv2d (cuda/CUTLASS): " << msg;                                 \
      throw std::invalid_argument(os_.str());                                  \
    }                                                                          \
  } while (0)

#if defined(CNNFAST_WITH_CUTLASS)
namespace {
// `kernel` (what conv2d_cutlass_kernel picked for a): launched, or (launch = false) only asked can_implement.
void run_kernel(const Conv2dCutlassArgs& a, const Conv2dCutlassKernel& kernel, cudaStream_t stream, bool launch) {
  const bool f16 = a.dtype == DType::kFloat16;
  if (kernel.schedule == Conv2dCutlassSchedule::kGemmPingpong) {
    f16 ? conv2d_cutlass_gemm_f16_relu(a, stream, launch) : conv2d_cutlass_gemm_bf16_relu(a, stream, launch);
    return;
  }
  const bool narrow = kernel.n == 64;
  switch (a.dtype) {
    case DType::kFloat16:
      narrow ? conv2d_cutlass_f16_n64_relu(a, stream, launch) : conv2d_cutlass_f16(a, stream, launch);
      break;
    case DType::kBFloat16:
      narrow ? conv2d_cutlass_bf16_n64_relu(a, stream, launch) : conv2d_cutlass_bf16(a, stream, launch);
      break;
    case DType::kFloat32: conv2d_cutlass_tf32(a, stream, launch); break;
  }
}
}  // namespace
#endif

// The limits of the sm90 implicit GEMM (TMA im2col on a 2-D convolution, see
// CollectiveConv::can_implement in cutlass/conv/collective/sm90_implicit_gemm_gmma_ss_warpspecialized.hpp),
// checked here so that the error names the problem instead of "can_implement failed".
void conv2d_cutlass_check(const Conv2dCutlassArgs& a) {
  CONV_CHECK(a.dtype == DType::kFloat16 || a.dtype == DType::kBFloat16 || a.dtype == DType::kFloat32,
             "float16, bfloat16 and float32 (as TF32) are compiled, got an unknown dtype");
  CONV_CHECK(a.N >= 0 && a.C > 0 && a.H > 0 && a.W > 0 && a.K > 0 && a.R > 0 && a.S > 0,
             "sizes must be positive (N may be 0): N=" << a.N << " C=" << a.C << " H=" << a.H << " W=" << a.W
                                                      << " K=" << a.K << " R=" << a.R << " S=" << a.S);
  // 16-byte TMA alignment: every row of channels (x, weight) and of output channels (out,
  // residual) must start on a 16-byte boundary: C and K multiples of 8 two-byte or 4 four-byte elements.
  const int64_t per_16_bytes = a.dtype == DType::kFloat32 ? 4 : 8;
  CONV_CHECK(a.C % per_16_bytes == 0,
             "input channels C=" << a.C << " must be a multiple of " << per_16_bytes << " (16-byte TMA alignment)");
  CONV_CHECK(a.K % per_16_bytes == 0,
             "output channels K=" << a.K << " must be a multiple of " << per_16_bytes << " (16-byte TMA alignment)");
  CONV_CHECK(a.x % 16 == 0 && a.weight % 16 == 0 && a.out % 16 == 0 && (!a.has_residual || a.residual % 16 == 0),
             "x, weight, out and residual must be 16-byte aligned device pointers");
  CONV_CHECK(a.out_pixel_stride >= a.K && a.out_pixel_stride % per_16_bytes == 0,
             "the output's pixel stride " << a.out_pixel_stride << " must be >= K=" << a.K << " and a multiple of "
                                          << per_16_bytes << " (16-byte TMA rows)");
  CONV_CHECK(a.bias % 16 == 0, "bias must be a 16-byte aligned float32 pointer (or none)");
  CONV_CHECK(a.weight != 0, "null weight pointer");
  CONV_CHECK(a.N == 0 || (a.x != 0 && a.out != 0), "null x or out pointer");
  CONV_CHECK(!a.has_residual || a.residual != 0, "has_residual is set but the residual pointer is null");
  CONV_CHECK(a.stride_h >= 1 && a.stride_w >= 1 && a.stride_h <= 8 && a.stride_w <= 8,
             "stride " << a.stride_h << "x" << a.stride_w << " is outside 1..8 (TMA im2col traversal stride)");
  // CUTLASS holds dilation as int (a 1-tap filter passes the extent checks below with any dilation).
  CONV_CHECK(a.dilation_h >= 1 && a.dilation_w >= 1 && a.dilation_h <= 2147483647 && a.dilation_w <= 2147483647,
             "dilation " << a.dilation_h << "x" << a.dilation_w << " is outside 1..2^31-1");
  CONV_CHECK(a.pad_h >= 0 && a.pad_w >= 0 && a.pad_h <= 127 && a.pad_w <= 127,
             "padding " << a.pad_h << "x" << a.pad_w << " is outside 0..127 (TMA im2col corner limit)");
  // Filter offsets of TMA im2col are 8-bit per spatial dimension in 2-D: (R-1)*dilation < 255.
  CONV_CHECK((a.R - 1) * a.dilation_h < 255 && (a.S - 1) * a.dilation_w < 255,
             "dilated filter extent " << (a.R - 1) * a.dilation_h + 1 << "x" << (a.S - 1) * a.dilation_w + 1
                                      << " is too large for TMA im2col (at most 255)");
  // The far corner, pad - (filter-1)*dilation, must stay within [-128, 127].
  CONV_CHECK(a.pad_h - (a.R - 1) * a.dilation_h >= -128 && a.pad_w - (a.S - 1) * a.dilation_w >= -128,
             "dilated filter extent minus padding is too large for TMA im2col");
  // Compared directly: the output-extent division truncates toward zero, so a filter that overhangs
  // by less than the stride would still give P = 1.
  CONV_CHECK(a.H + 2 * a.pad_h >= a.dilation_h * (a.R - 1) + 1 && a.W + 2 * a.pad_w >= a.dilation_w * (a.S - 1) + 1,
             "the dilated filter is larger than the padded input");
  const int64_t P = conv2d_cutlass_out_extent(a.H, a.pad_h, a.stride_h, a.dilation_h, a.R);
  const int64_t Q = conv2d_cutlass_out_extent(a.W, a.pad_w, a.stride_w, a.dilation_w, a.S);
  // CUTLASS's conv problem shape holds extents as int and the GEMM M = N*P*Q as int.
  const int64_t kIntMax = 2147483647;
  CONV_CHECK(a.N * P * Q <= kIntMax && a.N * a.H * a.W <= kIntMax && a.K * a.R * a.S * a.C <= kIntMax,
             "problem too large for 32-bit CUTLASS extents");
  // A forced schedule that does not apply is refused here, at batch 0 too, where nothing runs.
  [[maybe_unused]] const Conv2dCutlassKernel kernel = conv2d_cutlass_kernel(a);
#if defined(CNNFAST_WITH_CUTLASS)
  // Anything these checks missed, CUTLASS's own (host-side) can_implement names before a launch.
  if (a.N > 0) run_kernel(a, kernel, /*stream=*/nullptr, /*launch=*/false);
#endif
}

Conv2dCutlassKernel conv2d_cutlass_kernel(const Conv2dCutlassArgs& a) {
  const bool sixteen_bit = a.dtype != DType::kFloat32;
  const int k = sixteen_bit ? 64 : 32;  // 128 bytes of reduction per stage
  const bool pointwise = a.R == 1 && a.S == 1 && a.stride_h == 1 && a.stride_w == 1 && a.pad_h == 0 && a.pad_w == 0;
  const bool gemm_applies = sixteen_bit && a.relu && a.K > 64 && pointwise;
  const Conv2dCutlassKernel gemm{Conv2dCutlassSchedule::kGemmPingpong, 128, 128, 64};
  if (a.schedule == Conv2dCutlassSchedule::kGemmPingpong) {
    CONV_CHECK(gemm_applies, "the gemm-pingpong kernel runs only 1x1, stride-1, unpadded float16/bfloat16 convs "
                             "with ReLU and K > 64, got "
                                 << a.R << "x" << a.S << " stride " << a.stride_h << "x" << a.stride_w << " padding "
                                 << a.pad_h << "x" << a.pad_w << " K=" << a.K << (a.relu ? "" : " without ReLU")
                                 << (sixteen_bit ? "" : " in float32"));
    return gemm;
  }
  if (sixteen_bit && a.relu && a.K <= 64) return {Conv2dCutlassSchedule::kFprop, 128, 64, k};
  if (gemm_applies && a.schedule == Conv2dCutlassSchedule::kAuto) return gemm;
  return {Conv2dCutlassSchedule::kFprop, 128, 128, k};
}

const char* conv2d_cutlass_schedule_name(Conv2dCutlassSchedule schedule) {
  switch (schedule) {
    case Conv2dCutlassSchedule::kFprop: return "fprop";
    case Conv2dCutlassSchedule::kGemmPingpong: return "gemm-pingpong";
    default: return "auto";
  }
}

void conv2d_cutlass_launch(const Conv2dCutlassArgs& a, cudaStream_t stream) {
#if defined(CNNFAST_WITH_CUTLASS)
  if (a.N > 0) run_kernel(a, conv2d_cutlass_kernel(a), stream, /*launch=*/true);
#else
  (void)a;
  (void)stream;
  throw std::runtime_error(
      "conv2d (cuda): cnnfast._C was built without CUTLASS (nvidia-cutlass was not installed at build time)");
#endif
}

}  // namespace cnnfast
