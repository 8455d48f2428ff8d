// The 1x1, stride-1, unpadded convolutions of conv2d_cutlass as a plain GEMM on CUTLASS 3's
// persistent ping-pong kernel. Included only by conv2d_cutlass_gemm_{f16,bf16}.cu.
//
// Why a second kernel: such a convolution over dense NHWC is exactly a GEMM,
//   out[m, k] = sum_c x[m, c] * weight[k, c],   m = the pixel (n, h, w), M = N*H*W rows,
// A = x (M x C, row-major, C contiguous), B = the filter (K x C, C contiguous: CUTLASS's column-major
// K x N operand), D = out (M x K, pixels out_pixel_stride elements apart), C = the residual (dense
// M x K). CUTLASS 4.2 builds the convolution kernel only with the non-persistent schedule (one
// consumer warp group; each CTA's epilogue waits for its own main loop), while its GEMMs have the
// persistent ping-pong schedule: two consumer warp groups take turns on successive tiles, so one
// group's epilogue (the residual load, bias, ReLU and the store) overlaps the other's wgmma main
// loop. These layers have short reductions (C = 64 to 2048) and large outputs, where the epilogue
// is a large share of a tile's time. In ResNet-50 they are every reduce and expand conv except the
// K = 64 ones (41 % of its conv FLOPs); in GoogLeNet most of the 1x1 branches (19 %).
//
// Tile 128 x 128 x 64 per consumer warp group (128 accumulators per thread), 1x1x1 cluster, as
// many smem stages as fit beside the epilogue's. The persistent scheduler's raster heuristic walks
// along N when there are at least as many M tiles as N tiles (at all but the smallest batches: M is
// the pixel count), so the CTAs working at one time share their A tiles, the activations, in L2
// and read them from DRAM once.
// Only the ReLU epilogue (conv+BN+ReLU layers, with or without the residual) and float16/bfloat16
// are compiled; conv2d_cutlass_kernel sends every other convolution to the fprop kernel.
#pragma once

#include <cuda_runtime.h>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.hpp"

#include "conv2d_cutlass_common.cuh"

namespace cnnfast {
namespace cutlass_conv {

using namespace cute;

template <typename Element>
struct Sm90Gemm1x1Relu {
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // 16-byte TMA rows
  using ElementAccumulator = float;
  using ElementCompute = float;
  using LayoutA = cutlass::layout::RowMajor;     // x: M x C, C contiguous
  using LayoutB = cutlass::layout::ColumnMajor;  // filter: C x K with C contiguous, i.e. dense (K, C)
  using LayoutD = cutlass::layout::RowMajor;     // out and residual: M x K, K contiguous
  using TileShape = Shape<_128, _128, _64>;
  using ClusterShape = Shape<_1, _1, _1>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAccumulator, ElementCompute,
      Element, LayoutD, kAlignment,  // C: the residual
      Element, LayoutD, kAlignment,  // D: the output
      cutlass::epilogue::TmaWarpSpecialized,  // the ping-pong kernel's epilogue (one warp group per tile)
      BiasResidualAct<Element, cutlass::epilogue::thread::ReLu>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, LayoutA, kAlignment,
      Element, LayoutB, kAlignment,
      ElementAccumulator, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedPingpong>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue,
                                                      cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

template <typename Element>
void run_gemm_1x1_relu(const Conv2dCutlassArgs& a, cudaStream_t stream, bool launch) {
  using Gemm = typename Sm90Gemm1x1Relu<Element>::Gemm;
  using Kernel = typename Gemm::GemmKernel;

  const int64_t M = a.N * a.H * a.W;
  // (row, column, batch) strides; one batch, so the batch strides are never used.
  typename Kernel::StrideA stride_a{a.C, Int<1>{}, M * a.C};
  typename Kernel::StrideB stride_b{a.C, Int<1>{}, a.K * a.C};
  typename Kernel::StrideC stride_c{a.K, Int<1>{}, M * a.K};
  typename Kernel::StrideD stride_d{a.out_pixel_stride, Int<1>{}, M * a.out_pixel_stride};

  // The persistent kernel launches one CTA per SM of the current device (the caller's device
  // guard). can_implement does not read it, so a check needs no GPU.
  cutlass::KernelHardwareInfo hw_info;
  if (launch) {
    check_cuda(cudaGetDevice(&hw_info.device_id), "cudaGetDevice");
    check_cuda(cudaDeviceGetAttribute(&hw_info.sm_count, cudaDevAttrMultiProcessorCount, hw_info.device_id),
               "SM count query");
  }

  typename Gemm::Arguments arguments{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {static_cast<int>(M), static_cast<int>(a.K), static_cast<int>(a.C), 1},
      {reinterpret_cast<const Element*>(a.x), stride_a, reinterpret_cast<const Element*>(a.weight), stride_b},
      {{}, epilogue_source<Element>(a), stride_c, reinterpret_cast<Element*>(a.out), stride_d},
      hw_info};
  set_bias_residual(arguments.epilogue.thread, a);

  check_or_launch<Gemm>(arguments, stream, launch);
}

}  // namespace cutlass_conv
}  // namespace cnnfast
