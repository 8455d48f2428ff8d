// conv2d_cutlass's 1x1 stride-1 ReLU convolutions in bfloat16: the persistent ping-pong GEMM of conv2d_cutlass_gemm.cuh.
#include "conv2d_cutlass_gemm.cuh"

namespace cnnfast {

void conv2d_cutlass_gemm_bf16_relu(const Conv2dCutlassArgs& args, cudaStream_t stream, bool launch) {
  cutlass_conv::run_gemm_1x1_relu<cutlass::bfloat16_t>(args, stream, launch);
}

}  // namespace cnnfast
