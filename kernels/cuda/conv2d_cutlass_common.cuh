// What the two CUTLASS kernels of conv2d_cutlass share: the sm90 implicit-GEMM fprop
// (conv2d_cutlass.cuh) and the persistent GEMM that runs 1x1 stride-1 convolutions
// (conv2d_cutlass_gemm.cuh). Both compute an M x N matrix whose rows are output pixels and whose
// columns are output channels, so both take the same epilogue:
//   D = act(alpha * acc + beta * C + bias[k]),   alpha = 1, all in float32,
// with bias one value per GEMM column (LinCombPerColBiasEltAct), beta = 1 and C = the residual when
// there is one, beta = 0 otherwise (CUTLASS then never reads C), and a null bias reading as 0. Both
// device adapters (ConvUniversalAdapter, GemmUniversalAdapter) have can_implement /
// get_workspace_size / initialize / run, so one launcher serves both.
#pragma once

#include <cuda_runtime.h>

#include <sstream>
#include <stdexcept>
#include <string>

#include "cutlass/cutlass.h"
#include "cutlass/epilogue/fusion/operations.hpp"

#include "conv2d_cutlass.h"

namespace cnnfast {
namespace cutlass_conv {

// The epilogue of both kernels. ReLU is cutlass::epilogue::thread::ReLu (max.NaN.f32: it propagates
// NaN as torch.relu does) or Identity, a template parameter; the residual and the bias are runtime
// choices (beta, a null pointer), which cost nothing in the main loop and halve the instantiations.
template <typename Element, template <class> class Activation>
using BiasResidualAct = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<
    Activation, Element, /*ElementCompute=*/float, /*ElementBias=*/float, /*ElementSource=*/Element,
    /*ElementScalar=*/float>;

template <class FusionArguments>
void set_bias_residual(FusionArguments& fusion, const Conv2dCutlassArgs& a) {
  fusion.alpha = 1.f;
  fusion.beta = a.has_residual ? 1.f : 0.f;
  fusion.bias_ptr = reinterpret_cast<const float*>(a.bias);  // nullptr: no bias
}

// The residual the epilogue reads as C; without one, `out` (never read when beta = 0) so that C's
// TMA descriptor is still built from a valid address.
template <typename Element>
const Element* epilogue_source(const Conv2dCutlassArgs& a) {
  return reinterpret_cast<const Element*>(a.has_residual ? a.residual : a.out);
}

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

// launch = false: asks CUTLASS whether it can run these arguments (can_implement: host-side checks
// of the problem shape against the kernel's alignment and TMA limits, no GPU needed; the GEMM's does
// not look at the stride values). launch = true: builds the TMA descriptors (initialize) and
// launches, trusting that check (conv2d_cutlass_check, which the caller runs first), not repeating it.
// The workspace, if the operator needs one, is stream-ordered memory freed on the same stream (also
// when a later step throws), so a CUDA graph capture records it as a memory node instead of failing.
template <class Operator>
void check_or_launch(const typename Operator::Arguments& arguments, cudaStream_t stream, bool launch) {
  if (!launch) {
    const cutlass::Status implementable = Operator::can_implement(arguments);
    if (implementable != cutlass::Status::kSuccess) {
      throw std::invalid_argument(std::string("conv2d (cuda/CUTLASS): the kernel cannot run this problem (can_implement: ") +
                                  cutlass::cutlassGetStatusString(implementable) + ")");
    }
    return;
  }
  Operator op;
  const size_t workspace_bytes = Operator::get_workspace_size(arguments);
  void* workspace = nullptr;
  if (workspace_bytes > 0) check_cuda(cudaMallocAsync(&workspace, workspace_bytes, stream), "workspace allocation");
  struct FreeWorkspace {
    void* p;
    cudaStream_t s;
    ~FreeWorkspace() { if (p) cudaFreeAsync(p, s); }
  } free_workspace{workspace, stream};
  check_cutlass(op.initialize(arguments, workspace, stream), "initialize");
  check_cutlass(op.run(stream), "run");
  check_cuda(cudaGetLastError(), "kernel launch");
}

}  // namespace cutlass_conv
}  // namespace cnnfast
