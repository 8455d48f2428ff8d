// conv2d_cutlass's 1x1 stride-1 ReLU convolutions in float16: the persistent ping-pong GEMM of conv2d_cutlass_gemm.cuh.
#include "conv2d_cutlass_gemm.cuh"

namespace cnnfast {

void conv2d_cutlass_gemm_f16_relu(const Conv2dCutlassArgs& args, cudaStream_t stream, bool launch) {
  cutlass_conv::run_gemm_1x1_relu<cutlass::half_t>(args, stream, launch);
}

}  // namespace cnnfast
