// conv2d_cutlass with a 64-wide tile and the ReLU epilogue, float16 and bfloat16: the kernels
// conv2d_cutlass_kernel picks for K <= 64, where a 128-wide tile would leave half its columns idle.
#include "conv2d_cutlass.cuh"

namespace cnnfast {

void conv2d_cutlass_f16_n64_relu(const Conv2dCutlassArgs& args, cudaStream_t stream, bool launch) {
  cutlass_conv::run<cutlass::half_t, cutlass::epilogue::thread::ReLu, 64>(args, stream, launch);
}

void conv2d_cutlass_bf16_n64_relu(const Conv2dCutlassArgs& args, cudaStream_t stream, bool launch) {
  cutlass_conv::run<cutlass::bfloat16_t, cutlass::epilogue::thread::ReLu, 64>(args, stream, launch);
}

}  // namespace cnnfast
