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
// The epilogue (bias, residual, ReLU in float32) is BiasResidualAct of conv2d_cutlass_common.cuh.
//
// Schedule: KernelImplicitTmaWarpSpecializedSm90 (one producer warp group issuing TMA, one consumer
// warp group issuing wgmma), a 128 x TileN x 64 tile (128 bytes of reduction per stage), 1x1x1
// cluster, as many smem stages as fit beside the epilogue's shared storage; epilogue
// TmaWarpSpecialized (TMA stores). CUTLASS 4.2 has no persistent (cooperative / ping-pong)
// schedule for conv on sm90 (conv/dispatch_policy.hpp rejects them).
//
// TileN, the tile's width in output channels, is 128, or 64 for K <= 64 (conv2d_cutlass_kernel in
// conv2d_cutlass.cu): a 128-wide tile on ResNet's K = 64 layers would spend half of every wgmma on
// channels that do not exist.
#pragma once

#include <cuda_runtime.h>

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
#include "cutlass/epilogue/thread/activation.h"

#include "conv2d_cutlass_common.cuh"

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
  using Layout = cutlass::layout::TensorNHWC;  // activations NHWC, filter KRSC, output NPQK
  // 128 bytes of reduction per stage: 64 channels of float16/bfloat16, 32 of float32 (TF32). The K mode
  // stays nested (Shape<Int<k>>): CUTLASS then walks one filter tap per k-tile and zero-fills channels
  // past C, which is what makes C < k (the padded C=3 stem) correct; a flat Int<k> tiles the flattened
  // (tap, channel) reduction instead, and for C < k a k-tile then spans several taps.
  using TileShape = Shape<_128, Int<TileN>, Shape<Int<1024 / cutlass::sizeof_bits<Element>::value>>>;
  using ClusterShape = Shape<_1, _1, _1>;

  using FusionOp = BiasResidualAct<Element, Activation>;

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

template <typename Element, template <class> class Activation, int TileN>
void run(const Conv2dCutlassArgs& a, cudaStream_t stream, bool launch) {
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

  typename Conv::Arguments arguments{
      problem,
      {reinterpret_cast<const Element*>(a.x), reinterpret_cast<const Element*>(a.weight)},
      {{}, epilogue_source<Element>(a), stride_c, reinterpret_cast<Element*>(a.out), stride_d}};
  set_bias_residual(arguments.epilogue.thread, a);
  check_or_launch<Conv>(arguments, stream, launch);
}

// The 128-wide tile, both activations.
template <typename Element>
void run_for_activation(const Conv2dCutlassArgs& a, cudaStream_t stream, bool launch) {
  if (a.relu) run<Element, cutlass::epilogue::thread::ReLu, 128>(a, stream, launch);
  else run<Element, cutlass::epilogue::thread::Identity, 128>(a, stream, launch);
}

}  // namespace cutlass_conv
}  // namespace cnnfast
