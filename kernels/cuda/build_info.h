// What the kernels of cnnfast._C were compiled with. bindings.cpp asks these at run time instead of
// reading compile flags of its own: the kernels may come from an archive compiled on another machine
// (CMake's CNNFAST_PREBUILT_KERNELS), and the module reports how that archive was built.
#pragma once

namespace cnnfast {

const char* kernels_cuda_architectures();  // CMAKE_CUDA_ARCHITECTURES of the kernels, e.g. "90a"
int kernels_cuda_runtime_version();        // CUDART_VERSION the kernels were compiled against, e.g. 13000
bool kernels_with_cutlass();               // whether the CUTLASS convolution is compiled in

}  // namespace cnnfast
