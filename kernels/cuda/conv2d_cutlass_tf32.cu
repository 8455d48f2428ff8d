// conv2d_cutlass for float32, computed as TF32 on the tensor cores: both activations (ReLU,
// identity) of the sm90 fprop in conv2d_cutlass.cuh. The launcher runs it only where PyTorch's
// convolutions may use TF32 (cnnfast.precision.tf32_allowed), as cuDNN would for the same call.
#include "conv2d_cutlass.cuh"

namespace cnnfast {

void conv2d_cutlass_tf32(const Conv2dCutlassArgs& args, cudaStream_t stream, bool launch) {
  cutlass_conv::run_for_activation<float>(args, stream, launch);
}

}  // namespace cnnfast
