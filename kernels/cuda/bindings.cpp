// cnnfast._C: the one pybind11 module of the CUDA backend.
//
// Tensors cross this boundary as plain integers (device pointers, sizes and strides in elements,
// the cudaStream_t of torch.cuda.current_stream()), so the module needs pybind11 and the CUDA
// runtime but not libtorch, and one build serves every torch version. The Python launchers in
// cnnfast/ops.py do the user-facing checks; the macros below are the last line of defence
// against a launcher bug, and raise Python exceptions instead of crashing the process.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <sstream>
#include <stdexcept>
#include <string>

#include "add_relu.h"
#include "build_info.h"
#include "conv2d_cutlass.h"
#include "dtype.h"
#include "gap_linear.h"
#include "global_avg_pool.h"

namespace py = pybind11;

#define CNNFAST_CHECK(cond, msg)                                              \
  do {                                                                        \
    if (!(cond)) {                                                            \
      std::ostringstream os_;                                                 \
      os_ << msg;                                                             \
      throw std::invalid_argument(os_.str());                                 \
    }                                                                         \
  } while (0)
#define CHECK_NONNEGATIVE(x) CNNFAST_CHECK((x) >= 0, #x " must be >= 0, got " << (x))
#define CHECK_POINTER(p, what) CNNFAST_CHECK((p) != 0 || (what) == 0, #p " is a null pointer")

namespace {

// Raises RuntimeError (not a crash, not a CUDA error later) when there is no usable GPU.
void require_cuda_device() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear the sticky error so later calls start clean
    throw std::runtime_error(std::string("cnnfast._C: no CUDA device is available (") +
                             (err != cudaSuccess ? cudaGetErrorString(err) : "device count is 0") + ")");
  }
}

cnnfast::Conv2dCutlassSchedule to_schedule(const std::string& name) {
  for (auto schedule : {cnnfast::Conv2dCutlassSchedule::kAuto, cnnfast::Conv2dCutlassSchedule::kFprop,
                        cnnfast::Conv2dCutlassSchedule::kGemmPingpong}) {
    if (name == cnnfast::conv2d_cutlass_schedule_name(schedule)) return schedule;
  }
  CNNFAST_CHECK(false, "unknown conv2d schedule '" << name << "' (auto, fprop, gemm-pingpong)");
  return cnnfast::Conv2dCutlassSchedule::kAuto;
}

cnnfast::DType to_dtype(int code) {
  CNNFAST_CHECK(code >= 0 && code <= 2, "unknown dtype code " << code << " (0=float32, 1=float16, 2=bfloat16)");
  return static_cast<cnnfast::DType>(code);
}

void global_avg_pool(uintptr_t x, uintptr_t out, int dtype, int64_t N, int64_t C, int64_t H, int64_t W,
                     int64_t stride_n, int64_t stride_c, int64_t stride_h, int64_t stride_w,
                     int64_t out_stride_n, int64_t out_stride_c, uintptr_t stream) {
  CHECK_NONNEGATIVE(N);
  CHECK_NONNEGATIVE(C);
  CNNFAST_CHECK(H > 0 && W > 0, "global_avg_pool needs a non-empty H x W, got " << H << " x " << W);
  CHECK_POINTER(x, N * C);
  CHECK_POINTER(out, N * C);
  const cnnfast::DType element_type = to_dtype(dtype);
  require_cuda_device();
  const cnnfast::GlobalAvgPoolArgs args{element_type, x, out, N, C, H, W,
                                        stride_n, stride_c, stride_h, stride_w, out_stride_n, out_stride_c};
  cnnfast::global_avg_pool_nhwc(args, reinterpret_cast<cudaStream_t>(stream));
}

// out (N, O) = mean_{h,w}(x) @ weight^T + bias; pooled is an (N, C) scratch buffer in x's dtype.
void gap_linear(uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t pooled, uintptr_t out, int dtype,
                int64_t N, int64_t C, int64_t H, int64_t W, int64_t O,
                int64_t stride_n, int64_t stride_c, int64_t stride_h, int64_t stride_w, uintptr_t stream) {
  CHECK_NONNEGATIVE(N);
  CHECK_NONNEGATIVE(C);
  CHECK_NONNEGATIVE(O);
  CNNFAST_CHECK(H > 0 && W > 0, "gap_linear needs a non-empty H x W, got " << H << " x " << W);
  CHECK_POINTER(x, N * C);
  CHECK_POINTER(weight, O * C);
  CHECK_POINTER(pooled, N * C);
  CHECK_POINTER(out, N * O);
  const cnnfast::DType element_type = to_dtype(dtype);
  require_cuda_device();
  const cnnfast::GapLinearArgs args{element_type, x, weight, bias, pooled, out, N, C, H, W, O,
                                    stride_n, stride_c, stride_h, stride_w};
  cnnfast::gap_linear(args, reinterpret_cast<cudaStream_t>(stream));
}

using Dims = std::array<int64_t, 4>;

void add_relu(uintptr_t x, uintptr_t y, uintptr_t out, int dtype, const Dims& sizes, const Dims& x_strides,
              const Dims& y_strides, const Dims& out_strides, bool relu, uintptr_t stream) {
  for (int64_t size : sizes) CHECK_NONNEGATIVE(size);
  const int64_t numel = sizes[0] * sizes[1] * sizes[2] * sizes[3];
  CHECK_POINTER(x, numel);
  CHECK_POINTER(y, numel);
  CHECK_POINTER(out, numel);
  const cnnfast::DType element_type = to_dtype(dtype);
  require_cuda_device();
  cnnfast::AddReluArgs args{element_type, x, y, out, {}, {}, {}, {}, relu};
  std::copy(sizes.begin(), sizes.end(), args.sizes);
  std::copy(x_strides.begin(), x_strides.end(), args.x_strides);
  std::copy(y_strides.begin(), y_strides.end(), args.y_strides);
  std::copy(out_strides.begin(), out_strides.end(), args.out_strides);
  cnnfast::add_relu(args, reinterpret_cast<cudaStream_t>(stream));
}

// out = relu?(conv2d(x, weight) + bias + residual) on CUTLASS (sm90 implicit GEMM, or a GEMM for 1x1
// layers; fp16/bf16/tf32).
// x dense NHWC (N, H, W, C), weight dense KRSC (K, R, S, C), bias float32 (K,) or 0, residual dense
// (N, P, Q, K), out (N, P, Q, K) with pixels out_pixel_stride elements apart; pointers 16-byte
// aligned. Padding, stride, dilation as (h, w) pairs.
void conv2d(uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t residual, uintptr_t out,
            int64_t out_pixel_stride, int dtype,
            int64_t N, int64_t C, int64_t H, int64_t W, int64_t K, int64_t R, int64_t S,
            const std::array<int64_t, 2>& padding, const std::array<int64_t, 2>& stride,
            const std::array<int64_t, 2>& dilation, bool relu, uintptr_t stream, const std::string& schedule) {
  CHECK_NONNEGATIVE(N);
  CNNFAST_CHECK(C > 0 && H > 0 && W > 0 && K > 0 && R > 0 && S > 0,
                "conv2d needs positive C, H, W, K, R, S, got C=" << C << " H=" << H << " W=" << W << " K=" << K
                                                                  << " R=" << R << " S=" << S);
  CNNFAST_CHECK(padding[0] >= 0 && padding[1] >= 0, "padding must be >= 0");
  CNNFAST_CHECK(stride[0] > 0 && stride[1] > 0, "stride must be > 0");
  CNNFAST_CHECK(dilation[0] > 0 && dilation[1] > 0, "dilation must be > 0");
  CHECK_POINTER(x, N);
  CHECK_POINTER(weight, 1);
  CHECK_POINTER(out, N);
  const cnnfast::DType element_type = to_dtype(dtype);
  const cnnfast::Conv2dCutlassArgs args{element_type, x, weight, bias, residual, out,
                                        N, C, H, W, K, R, S,
                                        padding[0], padding[1], stride[0], stride[1], dilation[0], dilation[1],
                                        out_pixel_stride, /*has_residual=*/residual != 0, relu,
                                        to_schedule(schedule)};
  if (cnnfast::kernels_with_cutlass()) {  // else the launch says that the build has no CUTLASS
    cnnfast::conv2d_cutlass_check(args);   // argument errors first: they need no GPU
    require_cuda_device();
  }
  cnnfast::conv2d_cutlass_launch(args, reinterpret_cast<cudaStream_t>(stream));
}

// The kernel conv2d runs for these arguments: (schedule name, M, N, K of its CTA tile).
py::tuple conv2d_kernel(int dtype, int64_t K, int64_t R, int64_t S, const std::array<int64_t, 2>& padding,
                        const std::array<int64_t, 2>& stride, bool relu, const std::string& schedule) {
  CNNFAST_CHECK(K > 0 && R > 0 && S > 0, "conv2d_kernel needs positive K, R, S, got K=" << K << " R=" << R << " S=" << S);
  cnnfast::Conv2dCutlassArgs args{};
  args.dtype = to_dtype(dtype);
  args.K = K;
  args.R = R;
  args.S = S;
  args.pad_h = padding[0];
  args.pad_w = padding[1];
  args.stride_h = stride[0];
  args.stride_w = stride[1];
  args.relu = relu;
  args.schedule = to_schedule(schedule);
  const cnnfast::Conv2dCutlassKernel kernel = cnnfast::conv2d_cutlass_kernel(args);
  return py::make_tuple(cnnfast::conv2d_cutlass_schedule_name(kernel.schedule), kernel.m, kernel.n, kernel.k);
}

py::dict build_info() {
  py::dict info;
  const int v = cnnfast::kernels_cuda_runtime_version();
  info["cuda_version"] = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
  info["architectures"] = std::string(cnnfast::kernels_cuda_architectures());
  info["cutlass"] = cnnfast::kernels_with_cutlass();
  if (cnnfast::kernels_with_cutlass()) {
    info["ops"] = py::make_tuple("add_relu", "conv2d", "gap_linear", "global_avg_pool");
  } else {
    info["ops"] = py::make_tuple("add_relu", "gap_linear", "global_avg_pool");
  }
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cnnfast CUDA kernels (raw pointers and strides in, current stream as an integer)";
  m.def("global_avg_pool", &global_avg_pool,
        "Global average pooling of an (N, C, H, W) tensor with any strides into an (N, C) output.",
        py::arg("x"), py::arg("out"), py::arg("dtype"), py::arg("N"), py::arg("C"), py::arg("H"), py::arg("W"),
        py::arg("stride_n"), py::arg("stride_c"), py::arg("stride_h"), py::arg("stride_w"),
        py::arg("out_stride_n"), py::arg("out_stride_c"), py::arg("stream"));
  m.def("gap_linear", &gap_linear,
        "out (N, O) = mean over H, W of x (N, C, H, W, any strides) @ weight^T (weight dense (O, C)) + bias "
        "(float32 (O,) or 0), through the dense (N, C) scratch `pooled`; float32 accumulation.",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("pooled"), py::arg("out"), py::arg("dtype"),
        py::arg("N"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("O"), py::arg("stride_n"),
        py::arg("stride_c"), py::arg("stride_h"), py::arg("stride_w"), py::arg("stream"));
  m.def("add_relu", &add_relu,
        "out = relu?(x + y) over (N, C, H, W) tensors with any strides (sizes and strides as 4-tuples).",
        py::arg("x"), py::arg("y"), py::arg("out"), py::arg("dtype"), py::arg("sizes"), py::arg("x_strides"),
        py::arg("y_strides"), py::arg("out_strides"), py::arg("relu"), py::arg("stream"));
  m.def("conv2d", &conv2d,
        "out = relu?(conv2d(x, weight) + bias + residual), CUTLASS sm90 (conv2d_kernel says which kernel): float16/bfloat16, or "
        "float32 computed as TF32; x NHWC and weight KRSC dense, C and K filling 16-byte rows, groups 1, "
        "bias float32 or 0, residual (dense) or 0, out's pixels out_pixel_stride elements apart. "
        "schedule: 'auto' (conv2d_kernel's rule), or 'fprop' / 'gemm-pingpong' to force one kernel. "
        "Raises ValueError for what it does not support, RuntimeError when built without CUTLASS.",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("residual"), py::arg("out"),
        py::arg("out_pixel_stride"), py::arg("dtype"), py::arg("N"), py::arg("C"), py::arg("H"), py::arg("W"),
        py::arg("K"), py::arg("R"), py::arg("S"), py::arg("padding"), py::arg("stride"), py::arg("dilation"),
        py::arg("relu"), py::arg("stream"), py::arg("schedule") = "auto");
  m.def("conv2d_kernel", &conv2d_kernel,
        "(schedule, M, N, K): the CUTLASS kernel conv2d runs for a dtype code, K output channels (as passed to "
        "conv2d, after any padding), filter R x S, padding, stride and activation, and its CTA tile: 'fprop' "
        "(implicit GEMM; N is 64 where that leaves fewer output channels idle) or 'gemm-pingpong' (1x1 stride-1 "
        "ReLU convs with K > 64 in float16/bfloat16); schedule forces one, as conv2d's does.",
        py::arg("dtype"), py::arg("K"), py::arg("R"), py::arg("S"), py::arg("padding"), py::arg("stride"),
        py::arg("relu"), py::arg("schedule") = "auto");
  m.def("build_info", &build_info, "CUDA runtime version and the GPU architectures compiled in.");
}
