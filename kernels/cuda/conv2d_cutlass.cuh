// The CUTLASS 3 sm90 implicit-GEMM fprop behind conv2d_cutlass, as a template over the element type
// and the activation. Included only by conv2d_cutlass_{f16,bf16,tf32,n64_relu}.cu: each instantiation
// costs a minute of nvcc time, so they are spread over translation units that build in parallel.
//
// How CUTLASS 3 maps fprop to a GEMM (cutlass/conv/detail.hpp, get_transformed_problem_shape_MNKL):
//   M = the output pixels (N, P, Q), N = the output channels K, K = the reduction (C, R, S), L = 1.
// A is the activation, read through TMA im2col; B is the KRSC filter, read through tiled TMA; the
// output D (and the source C) is an M x N matrix whose column index is the output channel k.
// A per-output-channel bias is therefore one value per GEMM *column*, broadcast down the rows:
// fusion::LinCombPerColBiasEltAct (Sm90RowBroadcast of a length-N vector), not PerRowBias.
//
// Epilogue, all in float32 (ElementCompute = float):
//   D = act(alpha * acc + beta * C + bias[k]),   alpha = 1,
//   beta = 1 with C = the residual when there is one, beta = 0 otherwise (CUTLASS then never reads C;
//   C points at `out` only so that its TMA descriptor is built from a valid address),
//   bias = nullptr reads as 0 (Sm90RowBroadcast's null default), act = ReLu or Identity.
// ReLU is a template parameter (cutlass::epilogue::thread::ReLu, which propagates NaN as torch.relu
// does: max.NaN.f32); the residual and the bias are runtime choices (beta, a null pointer), since
// skipping them at run time costs nothing in the main loop and halves the instantiations.
//
// Schedule: KernelImplicitTmaWarpSpecializedSm90 (one producer warp group issuing TMA, one consumer
// warp group issuing wgmma), a 128 x TileN x 64 tile (128 bytes of reduction per stage), 1x1x1
// cluster, as many smem stages as fit beside the epilogue's shared storage; epilogue
// TmaWarpSpecialized (TMA stores). CUTLASS 4.2 has no persistent (cooperative / ping-pong)
// schedule for conv on sm90 (conv/dispatch_policy.hpp rejects them).
//
// TileN, the tile's width in output channels, is 128, or 64 for K <= 64 (conv2d_cutlass_tile in
// conv2d_cutlass.cu): a 128-wide tile on ResNet's K = 64 layers would spend half of every wgmma on
// channels that do not exist.
#pragma once

#include <cuda_runtime.h>

#include <sstream>
#include <stdexcept>
#include <string>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/kernel_hardware_info.hpp"  // before the conv headers, which use it without including it
#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/conv/convnd_problem_shape.hpp"
#include "cutlass/conv/convolution.h"
#include "cutlass/conv/device/conv_universal_adapter.hpp"
#include "cutlass/conv/dispatch_policy.hpp"
#include "cutlass/conv/kernel/conv_universal.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/thread/activation.h"

#include "conv2d_cutlass.h"

namespace cnnfast {
namespace cutlass_conv {

using namespace cute;

template <typename Element, template <class> class Activation, int TileN>
struct Sm90Fprop {
  static constexpr cutlass::conv::Operator kConvOp = cutlass::conv::Operator::kFprop;
  // 16 bytes per TMA access: 8 half / bfloat16 elements or 4 float, so C and K must be multiples of that.
  // float A and B run on the tensor cores as TF32 (wgmma's tf32 kind needs both K-major: NHWC, KRSC).
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;

  using ElementAccumulator = float;
  using ElementCompute = float;
  using ElementBias = float;
  using Layout = cutlass::layout::TensorNHWC;  // activations NHWC, filter KRSC, output NPQK
  // 128 bytes of reduction per stage: 64 channels of float16/bfloat16, 32 of float32 (TF32).
  using TileShape = Shape<_128, Int<TileN>, Shape<Int<1024 / cutlass::sizeof_bits<Element>::value>>>;
  using ClusterShape = Shape<_1, _1, _1>;

  using FusionOp = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<
      Activation, Element, ElementCompute, ElementBias, /*ElementSource=*/Element, /*ElementScalar=*/ElementCompute>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAccumulator, ElementCompute,
      Element, Layout, kAlignment,  // C: the residual
      Element, Layout, kAlignment,  // D: the output
      cutlass::epilogue::TmaWarpSpecialized, FusionOp>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, kConvOp,
      Element, Layout, kAlignment,  // A: activation
      Element, Layout, kAlignment,  // B: filter
      ElementAccumulator, TileShape, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::conv::KernelImplicitTmaWarpSpecializedSm90>::CollectiveOp;

  using ProblemShape = cutlass::conv::ConvProblemShape<kConvOp, CollectiveMainloop::DispatchPolicy::NumSpatialDimensions>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Conv = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
};

inline void check_cutlass(cutlass::Status status, const char* what) {
  if (status == cutlass::Status::kSuccess) return;
  std::ostringstream os;
  os << "conv2d (cuda/CUTLASS): " << what << " failed: " << cutlass::cutlassGetStatusString(status);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) os << " (" << cudaGetErrorString(err) << ")";
  throw std::runtime_error(os.str());
}

inline void check_cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  cudaGetLastError();
  throw std::runtime_error(std::string("conv2d (cuda/CUTLASS): ") + what + " failed: " + cudaGetErrorString(err));
}

template <typename Element, template <class> class Activation, int TileN>
void run(const Conv2dCutlassArgs& a, cudaStream_t stream) {
  using Fprop = Sm90Fprop<Element, Activation, TileN>;
  using Conv = typename Fprop::Conv;
  using ProblemShape = typename Fprop::ProblemShape;

  const ProblemShape problem(
      cutlass::conv::Mode::kCrossCorrelation,
      {static_cast<int>(a.N), static_cast<int>(a.H), static_cast<int>(a.W), static_cast<int>(a.C)},  // nhwc
      {static_cast<int>(a.K), static_cast<int>(a.R), static_cast<int>(a.S), static_cast<int>(a.C)},  // krsc
      {static_cast<int>(a.pad_h), static_cast<int>(a.pad_w)},        // lower padding (h, w)
      {static_cast<int>(a.pad_h), static_cast<int>(a.pad_w)},        // upper padding (h, w)
      {static_cast<int>(a.stride_h), static_cast<int>(a.stride_w)},  // traversal stride
      {static_cast<int>(a.dilation_h), static_cast<int>(a.dilation_w)},
      /*groups=*/1);

  // C (the residual) is dense NPQK and D (the output) NPQK with pixels out_pixel_stride apart: the
  // GEMM M mode is (q, p, n) (innermost first), N is k with stride 1. problem.stride_C holds the
  // dense strides (K, Q*K, P*Q*K for q, p, n), so D's are those / K * out_pixel_stride.
  using StrideC = typename Conv::ConvKernel::StrideC;
  using StrideD = typename Conv::ConvKernel::StrideD;
  StrideC stride_c{};
  StrideD stride_d{};
  cute::for_each(cute::make_seq<cute::rank<0>(StrideC{})>{}, [&](auto i) {
    const auto dense = problem.stride_C[ProblemShape::RankT - 2 - i];
    cute::get<0, i>(stride_c) = dense;
    cute::get<0, i>(stride_d) = dense / a.K * a.out_pixel_stride;
  });

  auto* out = reinterpret_cast<Element*>(a.out);
  const auto* source = a.has_residual ? reinterpret_cast<const Element*>(a.residual) : out;

  typename Conv::Arguments arguments{
      problem,
      {reinterpret_cast<const Element*>(a.x), reinterpret_cast<const Element*>(a.weight)},
      {{}, source, stride_c, out, stride_d}};
  auto& fusion = arguments.epilogue.thread;
  fusion.alpha = 1.f;
  fusion.beta = a.has_residual ? 1.f : 0.f;
  fusion.bias_ptr = reinterpret_cast<const float*>(a.bias);  // nullptr: no bias

  Conv conv;
  check_cutlass(conv.can_implement(arguments), "can_implement (unsupported problem)");
  const size_t workspace_bytes = Conv::get_workspace_size(arguments);
  void* workspace = nullptr;
  if (workspace_bytes > 0) check_cuda(cudaMallocAsync(&workspace, workspace_bytes, stream), "workspace allocation");
  struct FreeWorkspace {
    void* p;
    cudaStream_t s;
    ~FreeWorkspace() { if (p) cudaFreeAsync(p, s); }
  } free_workspace{workspace, stream};
  check_cutlass(conv.initialize(arguments, workspace, stream), "initialize");
  check_cutlass(conv.run(stream), "run");
  check_cuda(cudaGetLastError(), "kernel launch");
}

// The 128-wide tile, both activations.
template <typename Element>
void run_for_activation(const Conv2dCutlassArgs& a, cudaStream_t stream) {
  if (a.relu) run<Element, cutlass::epilogue::thread::ReLu, 128>(a, stream);
  else run<Element, cutlass::epilogue::thread::Identity, 128>(a, stream);
}

}  // namespace cutlass_conv
}  // namespace cnnfast
