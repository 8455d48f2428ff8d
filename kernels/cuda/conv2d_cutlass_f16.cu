// conv2d_cutlass for float16: both activations (ReLU, identity) of the sm90 fprop in conv2d_cutlass.cuh.
#include "conv2d_cutlass.cuh"

namespace cnnfast {

void conv2d_cutlass_f16(const Conv2dCutlassArgs& args, cudaStream_t stream, bool launch) {
  cutlass_conv::run_for_activation<cutlass::half_t>(args, stream, launch);
}

}  // namespace cnnfast
